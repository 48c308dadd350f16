"""The per-worker side of training: what each Ray Train worker runs (`train_loop_per_worker`),
one epoch of steps (`train_one_epoch`), evaluation, the losses (logit adjustment, consistency),
the optimiser and its schedule, and the state a checkpoint carries to resume a worker exactly.
The driver that starts the workers is `trainer`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import tempfile
import time
import warnings
from dataclasses import asdict
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ray_fer.config import ConfigError, TrainJobConfig, from_dict
from ray_fer.images import EvalPreset, train_preset
from ray_fer.model import build_model, unwrap
from ray_fer.precision import autocast_dtype
from ray_fer.store import storage
from ray_fer.train.runs import load_state, write_state

log = logging.getLogger(__name__)

SHUFFLE_BUFFER = 2048  # rows in each worker's local shuffle buffer, on top of random block order


# --------------------------------------------------------------------------------------------
# The per-epoch steps


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    preset: EvalPreset,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    label_smoothing: float = 0.0,
    consistency: float = 0.0,
    logit_bias: torch.Tensor | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    lr_at: Callable[[int], float] | None = None,
    after_step: Callable[[], None] | None = None,
    fail_after_first_step: bool = False,
) -> dict[str, float]:
    """One pass over `batches` of uint8 images; returns this worker's loss sum, correct and count.

    lr_at(i) is the learning rate of the epoch's i-th step (0-based); None keeps the optimizer's.
    after_step() runs after every optimizer step (the weight average's update). With
    `consistency` > 0 each face is augmented twice, the second time from the batch's `view` where it
    has one (the face stage's crop of the face), and the loss adds that weight times the
    Jensen-Shannon divergence of the model's two predictions (`consistency_loss`); the loss sum
    and accuracy stay the cross-entropy's and the first view's, comparable with a run without it.
    `logit_bias` (one value per class) is added to the logits inside the loss only: logit-adjusted
    cross-entropy (`logit_adjustment`); the accuracy is the model's own."""
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for step, batch in enumerate(batches):
        if lr_at is not None:
            set_lr(optimizer, lr_at(step))
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        if consistency:  # the second view: the face stage's crop of the face (faces/views.py), or the face again
            views = batch["view"].to(device, non_blocking=True) if "view" in batch else images
            x = torch.cat([preset(images), preset(views)])
        else:
            x = preset(images)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x).float()
            shift = 0.0 if logit_bias is None else logit_bias
            if consistency:
                logits, again = logits.chunk(2)
                ce = 0.5 * (F.cross_entropy(logits + shift, labels, label_smoothing=label_smoothing)
                            + F.cross_entropy(again + shift, labels, label_smoothing=label_smoothing))
                loss = ce + consistency * consistency_loss(logits, again)
            else:
                ce = loss = F.cross_entropy(logits + shift, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if after_step is not None:
            after_step()
        # note: accumulate on the device; reading .item() here would sync the GPU every step
        loss_sum += ce.detach().double() * labels.shape[0]
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        if fail_after_first_step:
            _kill_self()
    return {"loss_sum": loss_sum.item(), "correct": float(correct.item()), "count": float(seen)}


def logit_adjustment(class_counts: list[int], tau: float) -> torch.Tensor:
    """tau * log(prior) per class, from the training rows' class counts (Menon et al. 2021,
    "Long-tail learning via logit adjustment"): added to the logits in the loss, it lets the
    model's own logits learn the classes as if they were balanced, so that the drift towards the
    training set's frequent classes (FER2013: happy, neutral) does not follow the model to photos
    whose classes are spread differently. A class without rows counts as one row."""
    counts = torch.tensor([max(1, c) for c in class_counts], dtype=torch.float32)
    return tau * torch.log(counts / counts.sum())


def consistency_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """The batch mean of the Jensen-Shannon divergence between the softmax of two views' logits
    (AugMix's consistency loss): 0 where the model predicts the same for both views."""
    p, q = F.softmax(logits_a, dim=1), F.softmax(logits_b, dim=1)
    mean = (0.5 * (p + q)).clamp(min=1e-7).log()
    return 0.5 * (F.kl_div(mean, p, reduction="batchmean") + F.kl_div(mean, q, reduction="batchmean"))


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    preset: EvalPreset,
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Loss sum, correct and count of this worker's share of the validation split (no augmentation)."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(preset(images))
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        correct += (logits.argmax(1) == labels).sum()
        seen += labels.shape[0]
    return {"loss_sum": loss_sum.item(), "correct": float(correct.item()), "count": float(seen)}


def _all_reduce(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum per-worker totals over the worker group (no-op for one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _means(prefix: str, sums: dict[str, float]) -> dict[str, float]:
    """`<prefix>_loss` and `<prefix>_acc` from the summed totals of `train_one_epoch` / `evaluate`."""
    count = max(1.0, sums["count"])
    return {f"{prefix}_loss": sums["loss_sum"] / count, f"{prefix}_acc": sums["correct"] / count}


def _kill_self() -> None:
    log.warning("fault injection: killing this training worker (pid %d)", os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# Optimiser and schedule


def scaled_lr(cfg: TrainJobConfig, world_size: int) -> float:
    """train.lr scaled from lr_reference_batch to the global batch (sqrt rule by default)."""
    ratio = cfg.train.batch_size * world_size / cfg.train.lr_reference_batch
    factor = {"sqrt": math.sqrt(ratio), "linear": ratio, "none": 1.0}[cfg.train.lr_scaling]
    return cfg.train.lr * factor


def make_optimizer(model: nn.Module, cfg: TrainJobConfig, lr: float) -> torch.optim.Optimizer:
    params = model.parameters()
    wd = cfg.train.weight_decay
    if cfg.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)


def lr_factor(step: int, epoch_steps: int, cfg: TrainJobConfig) -> float:
    """Multiplier of the base lr at the run's 0-based optimizer `step` (`epoch_steps` an epoch): a
    linear warm-up over train.warmup_epochs that reaches 1 at its last step, then cosine (to 2%)
    or constant.

    A function of the step alone, so a resumed run continues the schedule exactly; it reads the
    current config, so raising train.epochs on resume stretches the rest of the cosine."""
    warm = cfg.train.warmup_epochs * epoch_steps
    if step < warm:
        return (step + 1) / warm
    if cfg.train.scheduler == "constant":
        return 1.0
    span = max(1, cfg.train.epochs * epoch_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))  # floor: the last steps still learn


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def steps_per_epoch(train_rows: int, val_rows: int, cfg: TrainJobConfig) -> int:
    """Optimizer steps per epoch on every worker, or a ConfigError for an epoch of none.

    Ray Train gives each worker rows // num_workers rows of every split (an equal split) and
    training drops the last incomplete batch."""
    workers, batch = cfg.run.num_workers, cfg.train.batch_size
    share = train_rows // workers
    if share < batch:
        raise ConfigError(f"train.batch_size={batch} is larger than each worker's share of the training data "
                          f"({share} images: {train_rows} over {workers} worker(s)), so an epoch would have no "
                          "step; lower train.batch_size or run.num_workers")
    if val_rows < workers:
        raise ConfigError(f"data.val has {val_rows} image(s) for {workers} workers, and every worker needs at "
                          "least one; add validation images or lower run.num_workers")
    return share // batch


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of `model`'s weights and buffers (BatchNorm statistics), or
    None when train.ema_decay is 0. Its first update copies the model; each later one moves it
    1 - decay of the way to the model's current weights."""
    if decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def grad_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 autocast, whose small range underflows gradients; None otherwise."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


# --------------------------------------------------------------------------------------------
# The worker loop


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainJobConfig, config["cfg"])
    # Ray hands the batches over as read-only NumPy arrays; the step reads them, never writes, so
    # torch's "array is not writable" warning says nothing a user could act on
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config["threads"])
    torch.manual_seed(cfg.train.seed + rank)
    random.seed(cfg.train.seed + rank)

    model = build_model(cfg.model.weights, stem_stride=cfg.model.stem_stride)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    if cfg.train.compile:
        model = torch.compile(model)
    base_lr = scaled_lr(cfg, world)
    optimizer = make_optimizer(model, cfg, base_lr)
    steps = config["steps_per_epoch"]
    amp_dtype = autocast_dtype(cfg.train.amp, device, training=True)
    scaler = grad_scaler(amp_dtype, device)

    history: list[dict[str, Any]] = []
    start_epoch = 1
    checkpoint = ray.train.get_checkpoint()
    state = load_state(checkpoint) if checkpoint is not None else None
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        _restore_optimizer(optimizer, state, cfg, log_it=rank == 0)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if rank < len(state["rng"]):  # a rank added since keeps its fresh seed
            _set_rng_state(state["rng"][rank])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        if rank == 0:
            log.info("resuming run %s after epoch %d", cfg.run.name, state["epoch"])
    # every rank keeps the same average (DDP keeps the weights equal); rank 0's is checkpointed.
    # A run resumed with the average newly turned on starts it from the resumed weights.
    ema = weight_average(unwrap(model), cfg.train.ema_decay)
    if ema is not None and state is not None and "ema" in state:
        ema.module.load_state_dict(state["ema"])
        ema.n_averaged.fill_(int(state["ema_updates"]))

    augment = train_preset(cfg.train.augment, image_size=cfg.data.image_size, channels_last=cfg.train.channels_last)
    plain = EvalPreset(image_size=cfg.data.image_size, channels_last=cfg.train.channels_last)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    on_gpu = device.type == "cuda"
    # uint8 faces travel to the device as they are (48x48 = 2.3 KB); pinned for async copies on GPUs
    dtypes = {"image": torch.uint8, "label": torch.int64}
    batch_kwargs = dict(dtypes=dtypes, device="cpu", pin_memory=on_gpu, prefetch_batches=4 if on_gpu else 1)
    face_views = cfg.train.consistency_view == "face"  # the config refuses it without train.consistency
    train_kwargs = {**batch_kwargs, "dtypes": dtypes | ({"view": torch.uint8} if face_views else {})}
    fault_marker = config.get("fault_marker")
    logit_bias = (logit_adjustment(config["class_counts"], cfg.train.logit_adjust).to(device)
                  if cfg.train.logit_adjust else None)

    def val_batches():
        return val_shard.iter_torch_batches(batch_size=max(64, cfg.train.batch_size), **batch_kwargs)

    for epoch in range(start_epoch, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        inject = (cfg.train.fail_at_epoch == epoch and rank == 0 and fault_marker is not None
                  and not storage.exists(fault_marker))
        if inject:
            # wait until the controller has registered the last report, so the restart resumes from it
            ray.train.get_all_reported_checkpoints(timeout_s=120)
            storage.write_bytes(fault_marker, f"killed during epoch {epoch}\n".encode())
        first_step = (epoch - 1) * steps
        tr = train_one_epoch(
            model,
            train_shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True,
                                           local_shuffle_buffer_size=SHUFFLE_BUFFER, **train_kwargs),
            augment, optimizer, device=device, label_smoothing=cfg.train.label_smoothing,
            consistency=cfg.train.consistency, logit_bias=logit_bias,
            amp_dtype=amp_dtype, scaler=scaler, fail_after_first_step=inject,
            lr_at=lambda i: base_lr * lr_factor(first_step + i, steps, cfg),
            after_step=None if ema is None else lambda: ema.update_parameters(unwrap(model)),
        )
        if tr["count"] == 0:  # the driver checks the row counts; this catches a split that differs
            raise RuntimeError(f"epoch {epoch} ran no training step on rank {rank}: train.batch_size="
                               f"{cfg.train.batch_size} is larger than this worker's share of the training data; "
                               "lower train.batch_size or run.num_workers")
        train_s = time.perf_counter() - t0
        # with a weight average, val_* are the average's (what is exported) and raw_val_* the model's
        va = evaluate(model if ema is None else ema.module, val_batches(), plain, device=device, amp_dtype=amp_dtype)
        va = _all_reduce(va, device)
        if ema is not None:
            raw = _all_reduce(evaluate(model, val_batches(), plain, device=device, amp_dtype=amp_dtype), device)
        current_lr = optimizer.param_groups[0]["lr"]  # the epoch's last step
        tr = _all_reduce(tr, device)
        metrics = {
            "epoch": epoch,
            **_means("train", tr),
            **_means("val", va),
            "lr": current_lr,
            **({} if ema is None else _means("raw_val", raw)),
            "epoch_s": time.perf_counter() - t0,
            "train_images_per_s": tr["count"] / max(train_s, 1e-9),
        }
        if on_gpu:
            metrics["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        history.append(metrics)
        rng_states = _gather_rng_states(world)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                write_state(tmp, {
                    "model": unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "epoch": epoch,
                    "rng": rng_states,
                    "history": history,
                    "metrics": metrics,
                    "config": asdict(cfg),
                    "class_counts": config.get("class_counts"),  # the training prior, for `ray-fer calibrate`
                    **({} if ema is None else {"ema": ema.module.state_dict(),
                                               "ema_updates": int(ema.n_averaged.item())}),
                })
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if rank == 0:
            log.info("epoch %d/%d  train loss %.4f acc %.3f  val loss %.4f acc %.3f  lr %.2e  %.0fs  %.0f img/s",
                     epoch, cfg.train.epochs, metrics["train_loss"], metrics["train_acc"], metrics["val_loss"],
                     metrics["val_acc"], current_lr, metrics["epoch_s"], metrics["train_images_per_s"])
    return {"epochs_run": max(0, cfg.train.epochs - start_epoch + 1)}


def _restore_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], cfg: TrainJobConfig,
                       log_it: bool) -> None:
    """Take the checkpoint's per-parameter state (Adam's moments, SGD's momentum) but keep this
    start's hyperparameters: the saved param groups hold the lr and weight decay of the start
    that wrote them. Another kind of optimizer (a forced resume) starts its state afresh."""
    before = state["config"]["train"]["optimizer"]
    if before != cfg.train.optimizer:
        if log_it:
            log.warning("train.optimizer changed from %s to %s: its state starts afresh", before, cfg.train.optimizer)
        return
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state["optimizer"]["state"], "param_groups": groups})


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state, so a resumed worker continues its own random stream."""
    mine = _rng_state()
    if world == 1 or not dist.is_initialized():
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine)
    return states
