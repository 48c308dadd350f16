"""Training's driver: `run_training(cfg)` checks every input before Ray starts (config, data
folders, weights), holds the run folder's lease, builds materialised Ray Datasets of decoded uint8
faces (`training_dataset`), runs data-parallel training with Ray Train V2 (gloo on CPU, NCCL on
GPU; each worker runs `loop.train_loop_per_worker`), keeps the best checkpoints by val_loss,
exports the best one as a model bundle and returns a JSON-able summary. Re-running the same
`run.name` resumes it when the settings that shape the weights are unchanged (see
`runs.plan_resume`). With run.tracking=mlflow the run is logged to MLflow as it goes (`tracking`:
the driver and Ray Train's controller log; the workers do not).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from typing import Any

import pyarrow as pa
from ray.train import UserCallback

from ray_fer import cluster, console, tracking
from ray_fer.config import ConfigError, TrainJobConfig
from ray_fer.faces.options import check_detector
from ray_fer.faces.views import faces_of_photos, with_face_views
from ray_fer.label.datasets import image_folder_dataset, list_image_folder
from ray_fer.labels import CLASSES
from ray_fer.model import build_model, save_bundle
from ray_fer.report import write_training_report
from ray_fer.store import storage
from ray_fer.store.lease import Lease, new_run_id
from ray_fer.train.loop import steps_per_epoch, train_loop_per_worker
from ray_fer.train.runs import (BUNDLE_FILE, CONFIG_FILE, STARTS_FILE, Resume, best_state_and_history,
                                bundle_from_state, load_state, plan_resume, record_start, run_dir, storage_root)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The driver


def check_inputs(cfg: TrainJobConfig):
    """Everything that can be checked before Ray starts: data folders and weights.

    Returns the listed (path, label) tables: the training split, the extra training folders
    (`data.extra_train`, one table, None without them) and the validation split."""
    def listed(root: str) -> pa.Table:
        return list_image_folder(root, limit_per_class=cfg.data.limit_per_class, seed=cfg.train.seed)

    train_table = listed(cfg.data.train)
    extra_table = pa.concat_tables([listed(p) for p in cfg.data.extra_train]) if cfg.data.extra_train else None
    val_table = listed(cfg.data.val)
    build_model(cfg.model.weights, stem_stride=cfg.model.stem_stride)  # reads / downloads the weights once: a bad file fails here
    if cfg.train.consistency_view == "face" or cfg.data.faces != "whole":
        check_detector()
    return train_table, extra_table, val_table


def class_counts(train_table: pa.Table, extra_table: pa.Table | None, extra_repeat: int) -> list[int]:
    """Training rows per class as listed (the extra folders counted `extra_repeat` times)."""
    import numpy as np

    counts = np.bincount(train_table["label"].to_numpy(), minlength=len(CLASSES))
    if extra_table is not None:
        counts += extra_repeat * np.bincount(extra_table["label"].to_numpy(), minlength=len(CLASSES))
    return [int(c) for c in counts]


def photos_to_faces(cfg: TrainJobConfig):
    """data.faces=auto: the step that turns a decoded split's photos into their largest face's
    crop (`faces.views.faces_of_photos`: Ray tasks of one CPU each); None: whole."""
    if cfg.data.faces == "whole":
        return None
    return partial(faces_of_photos, size=cfg.data.decode_size)


def training_dataset(cfg: TrainJobConfig, train_table: pa.Table, extra_table: pa.Table | None, cpus: int,
                     columns: tuple[str, ...] = ("image", "label")):
    """The decoded training rows: the training split plus `data.extra_repeat` copies of the extra
    folders' rows (decoded once), shuffled together, with the consistency views when asked.
    `columns` as `data.image_folder_dataset`'s; `cpus` sizes the consistency views' detector pool."""
    def decoded(table: pa.Table):
        return image_folder_dataset(table, decode_size=cfg.data.decode_size, shuffle_seed=cfg.train.seed,
                                    photos_to_faces=photos_to_faces(cfg), columns=columns)

    train_ds = decoded(train_table)
    if extra_table is not None:
        extra = decoded(extra_table)
        train_ds = train_ds.union(*[extra] * cfg.data.extra_repeat).random_shuffle(seed=cfg.train.seed).materialize()
    if cfg.train.consistency_view == "face":
        train_ds = with_face_views(train_ds, cpus=cpus)
    return train_ds


def _resources(cfg: TrainJobConfig, started_here: bool) -> tuple[bool, int]:
    """(use_gpu, CPUs per worker) from the config and the running cluster."""
    import ray

    total = ray.cluster_resources()
    use_gpu = cfg.run.use_gpu if cfg.run.use_gpu != "auto" else total.get("GPU", 0) >= 1
    gpus = int(total.get("GPU", 0))
    if use_gpu and gpus < cfg.run.num_workers:
        if started_here:  # a private local instance has no autoscaler: it would wait for ever
            raise ConfigError(f"run.use_gpu is true with run.num_workers={cfg.run.num_workers}, but this machine "
                              f"has {gpus} GPUs; lower run.num_workers or set run.use_gpu=false")
        log.warning("the cluster has %d GPUs now and the run needs %d: Ray Train waits for the autoscaler "
                    "to add them (on a cluster without one it waits for ever: stop the job and lower "
                    "run.num_workers)", gpus, cfg.run.num_workers)
    cpus = int(total.get("CPU", 0))
    if cfg.run.cpus_per_worker is not None:
        threads = cfg.run.cpus_per_worker
    elif use_gpu:
        threads = 1
    else:
        biggest_node = max(int(n["Resources"].get("CPU", 0)) for n in cluster.alive_nodes())
        threads = max(1, min(biggest_node, cpus // cfg.run.num_workers))
    asked = threads * cfg.run.num_workers
    if asked > cpus:
        if started_here:  # Ray Train would retry placing the workers every minute, for ever
            raise ConfigError(f"run.num_workers={cfg.run.num_workers} workers with {threads} CPU each need {asked} "
                              f"CPUs, but this machine has {cpus}; lower run.num_workers or run.cpus_per_worker")
        log.warning("the run needs %d CPUs and the cluster has %d now: Ray Train waits for the autoscaler to add "
                    "nodes (without one it waits for ever: stop the job and lower run.num_workers)", asked, cpus)
    return use_gpu, threads


def run_training(cfg: TrainJobConfig) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the JSON summary.

    The run folder's lease (store/lease.py) is held throughout: a second start of a live run is
    refused in one line naming it, before Ray starts; the lease of a dead one is taken over."""
    cfg.check()
    tracker = None
    if cfg.run.tracking == "mlflow":  # MLflow installed and its tracker answering, before anything else
        tracker = tracking.tracking_uri(storage_root(cfg))
        tracking.check_tracker(tracker, "run.tracking=mlflow")
    lease = Lease.acquire(run_dir(cfg), new_run_id(), what="run folder",
                          fix="pick another run.name (re-using a name resumes that run)")
    try:
        return _train(cfg, lease, tracker)
    finally:
        lease.release()


def _train(cfg: TrainJobConfig, lease: Lease, tracker: str | None) -> dict[str, Any]:
    resume = plan_resume(cfg)  # a re-used name: refused here when the settings that shape the weights changed
    tracked = None  # the MLflow run, once started: a failure after that ends it FAILED
    try:
        if resume is not None and resume.epochs_done == cfg.train.epochs:  # nothing to train: no Ray, no data
            tracked = _start_tracking(cfg, tracker, resume)  # logs what the tracker missed, if anything
            with lease.fence("export"):
                return export_best(cfg, *best_state_and_history(run_dir(cfg), cfg.run.export), tracked=tracked)
        tables = check_inputs(cfg)
        steps_per_epoch(_train_rows(cfg, tables[0], tables[1]), tables[2].num_rows, cfg)  # before Ray: listed counts
        tracked = _start_tracking(cfg, tracker, resume)
        return _fit(cfg, lease, resume, *tables, tracked=tracked)
    except BaseException as e:
        if tracked is not None:
            tracking.fail_training_run(tracked, e)
        raise


def _train_rows(cfg: TrainJobConfig, train_table: pa.Table, extra_table: pa.Table | None) -> int:
    return train_table.num_rows + (extra_table.num_rows * cfg.data.extra_repeat if extra_table else 0)


def _start_tracking(cfg: TrainJobConfig, tracker: str | None, resume: Resume | None) -> tracking.TrackedRun | None:
    if tracker is None:
        return None
    return tracking.start_training_run(tracker, name=cfg.run.name, experiment=cfg.run.experiment,
                                       run_folder=run_dir(cfg), config=asdict(cfg),
                                       after_epoch=resume.epochs_done if resume else 0)


class TrackEpochs(UserCallback):
    """Logs each epoch's metrics, as rank 0 reported them, to the run's MLflow run. Ray Train calls
    it on its controller, which runs on the driver's node; a tracker that fails costs a warning."""

    def __init__(self, run: tracking.TrackedRun) -> None:
        self.run = run

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or "epoch" not in metrics[0]:
            return
        try:
            tracking.log_epochs(self.run, [metrics[0]])
        except Exception as e:
            log.warning("MLflow did not take epoch %s's metrics (%s); training goes on, and the run's end logs "
                        "what the tracker missed", metrics[0]["epoch"], tracking.short_error(e))


def _fit(cfg: TrainJobConfig, lease: Lease, resume: Resume | None, train_table: pa.Table,
         extra_table: pa.Table | None, val_table: pa.Table, *, tracked: tracking.TrackedRun | None) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    train_rows = _train_rows(cfg, train_table, extra_table)
    started_here = cluster.connect()
    cluster.refuse_local_paths(
        {"run.storage_path": cfg.run.storage_path, "data.train": cfg.data.train, "data.val": cfg.data.val}
        | {f"data.extra_train[{i}]": p for i, p in enumerate(cfg.data.extra_train)},
        shared=cfg.run.shared_storage,
        fix=", or a shared filesystem mounted at the same path on every node and --set run.shared_storage=true",
    )
    use_gpu, threads = _resources(cfg, started_here)
    out_dir = run_dir(cfg)
    log.info("training run %s: %s train and %s val images, %d worker(s) on %s, %d CPU%s each, %d px, %d epochs -> %s",
             cfg.run.name, f"{train_rows:,}", f"{val_table.num_rows:,}", cfg.run.num_workers,
             "GPU" if use_gpu else "CPU", threads, "" if threads == 1 else "s", cfg.data.image_size,
             cfg.train.epochs, out_dir)
    with lease.fence("record the start"):
        record_start(cfg, resume)

    cpus = int(ray.cluster_resources().get("CPU", 1))
    train_ds = training_dataset(cfg, train_table, extra_table, cpus)
    val_ds = image_folder_dataset(val_table, decode_size=cfg.data.decode_size, photos_to_faces=photos_to_faces(cfg))
    steps = steps_per_epoch(train_ds.count(), val_ds.count(), cfg)  # again: undecodable files are left out
    seed_config = ray.data.RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True)
    datasets = {"train": train_ds.randomize_block_order(seed=seed_config), "val": val_ds}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": asdict(cfg),
            "threads": threads,
            "steps_per_epoch": steps,
            "class_counts": class_counts(train_table, extra_table, cfg.data.extra_repeat),
            "fault_marker": storage.join(out_dir, f"fault-injected-epoch-{cfg.train.fail_at_epoch}")
            if cfg.train.fail_at_epoch else None,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": threads}
            | ({"GPU": 1} if use_gpu else {}),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_root(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.checkpoints_to_keep,
                checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min",
            ),
            logging_config=console.train_logging_config(),
            callbacks=[TrackEpochs(tracked)] if tracked is not None else None,
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    best = result.checkpoint if cfg.run.export == "last" else result.get_best_checkpoint("val_loss", "min")
    if best is None or result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run.name!r} finished without a checkpoint")
    with lease.fence("export"):  # a run whose lease was taken over while it trained exports nothing
        return export_best(cfg, load_state(best), load_state(result.checkpoint)["history"], tracked=tracked)


def export_best(cfg: TrainJobConfig, best_state: dict[str, Any], history: list[dict[str, Any]], *,
                tracked: tracking.TrackedRun | None = None) -> dict[str, Any]:
    """Write the best checkpoint's state as the run's model bundle; return the summary. With a
    tracked run, log the end of it (tracking.finish_training_run)."""
    bundle_uri = storage.join(run_dir(cfg), BUNDLE_FILE)
    model_id = save_bundle(bundle_from_state(best_state, history), bundle_uri)
    best_metrics = best_state["metrics"]
    report = write_training_report(run_dir(cfg), history, best_metrics["epoch"])  # curves.png, metrics.csv
    summary = {
        "run": cfg.run.name,
        "epochs": history[-1]["epoch"] if history else 0,
        "best_epoch": best_metrics["epoch"],
        "best_val_loss": round(best_metrics["val_loss"], 6),
        "best_val_acc": round(best_metrics["val_acc"], 6),
        "model": bundle_uri,
        "model_id": model_id,
        "curves": report.get("curves"),
    }
    if tracked is not None:
        folder = run_dir(cfg)
        files = [storage.join(folder, CONFIG_FILE), storage.join(folder, STARTS_FILE), *report.values()]
        tracking.finish_training_run(tracked, history=history, files=files, bundle=bundle_uri, summary=summary)
        summary |= {"mlflow_run_id": tracked.run_id, "mlflow_tracking_uri": tracked.tracking_uri}
    return summary
