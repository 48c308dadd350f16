"""Batch labelling with Ray Data: an image store in, a Parquet table of expressions out.

The chain, each stage declared with its resources:

    list the input (driver) -> read bytes + decode to small uint8 faces (CPU tasks, `data.decode_batch`)
      -> `Predictor` actors (model loaded once each; EvalPreset and model on a GPU, or on CPU threads)
      -> write_parquet -> `_SUCCESS` (counts, model identity, timing), written last.

Every listed file becomes exactly one row; a file that cannot be read or decoded gets `error` set
and the job goes on. Shared with evaluation: `predict_probs` (the model call), `Predictor` (the
actor) and `prediction_dataset` (the lazy chain over a table of paths).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ray_fer import __version__, storage
from ray_fer.config import InferConfig, UserError
from ray_fer.data import DECODE_BATCH, decoded_dataset
from ray_fer.decode import IMAGE_EXTENSIONS
from ray_fer.images import EvalPreset, tta_views
from ray_fer.model import ModelBundle, load_bundle

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS"  # JSON written last: a reader can tell a finished output from a crashed one
MANIFEST_SUFFIXES = (".parquet", ".csv")
ROWS_PER_FILE = 100_000  # target rows per Parquet file: few files, each small enough to stream
# Host memory a predictor actor declares (measured: 1.3 GB RSS at batch 512, 64 px). Declaring it
# also keeps Ray from fusing the decode tasks into the actors, which it does when the two stages
# ask for the same resources (ray-project/ray#54433): decoding must stay on its own CPU tasks.
PREDICTOR_MEMORY = 2 * 1024**3
PREDICTION_COLUMNS = ("label", "confidence")  # plus prob_<class>, error and model; see Predictor


FP32_STAGES = 2  # EfficientNet feature stages (stem, first MBConv) kept fp32 under autocast
# Under autocast, rows whose two most likely classes are closer than this (in probability) are
# computed again in fp32, so bf16 rarely flips a near-tie. Measured on FER2013 val with four weakly
# trained models (weak models have the most near-ties): bf16 alone agreed with fp32 on 99.05-99.64%
# of the labels; with this re-check on 99.92-100%, re-computing 2.5-20% of the rows (~10% slower).
NEAR_TIE = 0.002


class InferError(UserError):
    """An input, output or model that cannot be used; the message names the path and the fix."""


# --------------------------------------------------------------------------------------------
# Precision and the model call


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast is faster.

    Elsewhere autocast emulates bf16 and is slower than fp32. torch's own check
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) says yes for plain AVX-512 too, hence the flags.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device; None means plain fp32.

    auto: bf16 on GPUs that have it (fp16 on older ones) and on CPUs with native bf16, else fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; choose one of: auto, bf16, fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


@torch.inference_mode()
def predict_probs(
    model: torch.nn.Module,
    preset: EvalPreset,
    pixels_uint8: torch.Tensor,
    *,
    tta: str = "none",
    autocast_dtype: torch.dtype | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Class probabilities, float32 (B, num_classes) on the model's device, of uint8 faces (B, S, S).

    The pixels move to the model's device first (pin them for a non-blocking copy), so resizing
    and normalising by `preset` (the bundle's EvalPreset) happen there. With a TTA mode the
    probabilities are averaged over `images.tta_views`. `autocast_dtype` (bf16 / fp16) runs the
    model under autocast, then re-computes in fp32 the rows whose top two classes are closer
    than NEAR_TIE, where bf16's rounding could flip the label; the softmax is always float32. `forward` replaces
    the autocast model call (a compiled `_forward` of the same model and dtype; see Predictor).
    """
    device = next(model.parameters()).device
    pixels = pixels_uint8.to(device, non_blocking=True)
    total: torch.Tensor | None = None
    views = tta_views(pixels, tta)
    for view in views:
        x = preset(view)
        logits = forward(x) if forward is not None else _forward(model, x, autocast_dtype)
        probs = torch.softmax(logits.float(), dim=1)
        total = probs if total is None else total + probs
    assert total is not None
    probs = total / len(views)
    if autocast_dtype is not None and probs.shape[1] > 1:
        top2 = probs.topk(2, dim=1).values
        near = (top2[:, 0] - top2[:, 1]) < NEAR_TIE
        if near.any():
            probs[near] = predict_probs(model, preset, pixels[near], tta=tta)
    return probs


def _forward(model: torch.nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """The model's logits; under autocast the stem and first stage of an EfficientNet stay fp32.

    Rounding errors made at full resolution propagate through every later layer: on FER2013 val,
    full bf16 autocast flipped 0.7% of a trained model's labels, and with these FP32_STAGES in fp32
    0.3%, for about 5% of the model's FLOPs (measured; see bench/bench_infer.py).
    """
    if autocast_dtype is None:
        return model(x)
    autocast = torch.autocast(x.device.type, dtype=autocast_dtype)
    features = getattr(model, "features", None)
    if not isinstance(features, torch.nn.Sequential) or not hasattr(model, "classifier"):
        with autocast:
            return model(x)
    x = features[:FP32_STAGES](x)
    with autocast:  # the rest of torchvision's EfficientNet.forward
        x = features[FP32_STAGES:](x)
        return model.classifier(torch.flatten(model.avgpool(x), 1))


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each eval-mode BatchNorm into the convolution before it (in place; returns the model).

    The same function with one pass fewer over every activation: about 1.2-1.5x faster
    EfficientNet-B0 inference on CPU (measured at 64 px). torchvision's Conv2dNormActivation
    blocks hold every conv + batch-norm pair.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    assert not model.training, "fold the batch norms of a model in eval mode only"
    for module in model.modules():
        if (isinstance(module, torch.nn.Sequential) and len(module) >= 2
                and isinstance(module[0], torch.nn.Conv2d) and isinstance(module[1], torch.nn.BatchNorm2d)):
            module[0] = fuse_conv_bn_eval(module[0], module[1])
            module[1] = torch.nn.Identity()
    return model


# --------------------------------------------------------------------------------------------
# The predictor actor


class Predictor:
    """Ray Data callable class: decoded faces in, labels and probabilities out; the model loads once.

    `model` is a bundle URI, a ModelBundle, or an ObjectRef to a ModelBundle (give `model_id`
    with the last two). A batch holds `image` (uint8 B,S,S) and `error` (None where decoded);
    the result is a pyarrow Table with every other column passed through unchanged, then
    `label` (string), `confidence` (float32), `prob_<class>` (float32), `error` and `model` (the
    bundle's identity). Rows with an error get null label, confidence and probabilities, and
    never reach the model. The `image` column is consumed.

    With `compile`, the model call is `torch.compile`d at construction for batches of exactly
    `batch_size` (shorter batches are padded with blank faces, so it never recompiles; if
    compiling fails, a warning says why and the eager model is used). On a
    2-core CPU the first compilation on a machine takes about a minute (inductor caches it on
    disk: later actors take seconds); the model call is then 1.15-1.4x faster (measured in
    the pipeline and alone). Worth it for stores of a few hundred thousand images and more.
    """

    def __init__(
        self,
        model: Any,
        *,
        model_id: str | None = None,
        tta: str = "none",
        precision: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        compile: bool = False,
        batch_size: int = 128,
    ) -> None:
        import ray

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        if isinstance(model, str):
            model, model_id = load_bundle(model)
        if not isinstance(model, ModelBundle) or model_id is None:
            raise TypeError("Predictor needs a bundle URI, or a ModelBundle (or its ObjectRef) with model_id")
        tta_views(torch.zeros(1, 2, 2, dtype=torch.uint8), tta)  # unknown modes fail here, not per batch
        if threads:
            torch.set_num_threads(threads)
        use_gpu = device == "gpu" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.net = fold_batchnorm(model.build_model()).to(self.device, memory_format=torch.channels_last)
        self.preset = model.eval_preset(channels_last=True)
        self.autocast = autocast_dtype(precision, self.device)
        self.classes = tuple(model.classes)
        self.prob_columns = tuple(f"prob_{name}" for name in self.classes)
        self.model_id = model_id
        self.tta = tta
        self.batch_size = batch_size
        self.forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        if compile:
            self._compile(model.decode_size)
        log.info("predictor ready: model %s on %s, autocast %s, tta %s, %d threads%s",
                 model_id, self.device, self.autocast, tta, torch.get_num_threads(), ", compiled" if compile else "")

    def _compile(self, decode_size: int) -> None:
        """torch.compile the model call for batches of batch_size; on failure (e.g. no C++
        compiler for inductor on this node) log why and keep the eager model: same labels."""
        started = time.perf_counter()
        self.forward = torch.compile(
            functools.partial(_forward, self.net, autocast_dtype=self.autocast), dynamic=False)
        try:  # compiles here, on a batch of blank faces, not in the middle of the first real batch
            self._predict(np.zeros((self.batch_size, decode_size, decode_size), dtype=np.uint8))
        except Exception as e:  # noqa: BLE001 - inductor raises many types (missing compiler, ...)
            self.forward = None
            log.warning("compile=true failed, labelling with the eager model instead: %s",
                        (str(e).strip().splitlines() or [type(e).__name__])[0][:300])
            return
        log.info("predictor compiled the model in %.0f s", time.perf_counter() - started)

    def _predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (n, classes) of n >= 1 uint8 faces (n, S, S)."""
        n = len(pixels)
        step = self.batch_size if self.forward is not None else n
        if n % step:  # a compiled model sees full batches only: pad with blank faces
            pixels = np.concatenate([pixels, np.zeros((step - n % step, *pixels.shape[1:]), dtype=pixels.dtype)])
        out = []
        for i in range(0, len(pixels), step):
            x = torch.from_numpy(np.ascontiguousarray(pixels[i:i + step]))
            if self.device.type == "cuda":
                x = x.pin_memory()  # note: lets the host-to-device copy overlap
            out.append(predict_probs(self.net, self.preset, x, tta=self.tta, autocast_dtype=self.autocast,
                                     forward=self.forward).cpu().numpy())
        return np.concatenate(out)[:n]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        pixels = batch["image"]
        n = len(pixels)
        errors = batch["error"] if "error" in batch else np.full(n, None, dtype=object)
        ok = _no_error(errors)
        probs = np.zeros((n, len(self.classes)), dtype=np.float32)
        if ok.any():
            probs[ok] = self._predict(pixels[ok])
        missing = ~ok
        best = probs.argmax(axis=1)
        columns: dict[str, pa.Array] = {}
        for name, values in batch.items():
            if name in ("image", "error"):
                continue
            if name in PREDICTION_COLUMNS or name in self.prob_columns or name == "model":
                raise ValueError(f"input column {name!r} would be overwritten by the prediction; rename it")
            columns[name] = _arrow_column(values)
        columns["label"] = pa.array([None if missing[i] else self.classes[best[i]] for i in range(n)], pa.string())
        columns["confidence"] = pa.array(probs.max(axis=1, initial=0.0), pa.float32(), mask=missing)
        for j, name in enumerate(self.prob_columns):
            columns[name] = pa.array(probs[:, j], pa.float32(), mask=missing)
        columns["error"] = pa.array([None if ok[i] else str(errors[i]) for i in range(n)], pa.string())
        columns["model"] = pa.array([self.model_id] * n, pa.string())
        return pa.table(columns)


def _no_error(errors: np.ndarray) -> np.ndarray:
    """True where `error` is unset: None, or NaN where Ray turned an all-null column into floats."""
    errors = np.asarray(errors)
    if errors.dtype.kind == "f":
        return np.isnan(errors)
    return np.array([e is None or (isinstance(e, (float, np.floating)) and np.isnan(e)) for e in errors], dtype=bool)


def _arrow_column(values: np.ndarray) -> pa.Array:
    arr = np.asarray(values)
    if arr.ndim > 1:  # a tensor column: Ray's own conversion keeps its shape
        from ray.data.block import BlockAccessor

        return BlockAccessor.batch_to_block({"x": arr}).column("x")
    return pa.array(arr)


# --------------------------------------------------------------------------------------------
# The chain


@dataclass(frozen=True)
class PredictorPlan:
    """Where predictor actors run and how big they are, sized from the cluster's resources."""

    device: str  # "gpu" or "cpu"
    actors: int  # actor pool size
    num_cpus: float  # CPUs each actor reserves (fractional: leaves whole CPUs to the decode tasks)
    num_gpus: int  # GPUs each actor reserves
    threads: int  # torch threads per actor
    batch_size: int  # images per predictor call
    tasks_in_flight: int  # batches queued per actor, so decode output is waiting when a batch ends
    memory: int  # host memory each actor declares: torch, the model and a batch's activations
    decode_cpus: float  # CPUs each read-and-decode task reserves


def plan_predictors(
    resources: dict[str, float], *, device: str = "auto", actors: int | None = None, batch_size: int | None = None
) -> PredictorPlan:
    """Size the predictor pool so that it never takes every CPU: the decode tasks that feed it
    need one, and an actor pool holding all CPUs waits for ever (RAY-NOTES)."""
    cpus = float(resources.get("CPU", 0))
    gpus = int(resources.get("GPU", 0))
    if cpus < 1:
        raise InferError(f"the Ray cluster has {cpus:g} CPUs; labelling needs at least 1 for reading and decoding")
    decode_cpus = 1.0 if cpus >= 2 else 0.5
    # declare at most half the cluster's memory across the pool: a small laptop must not wait for ever
    memory_total = float(resources.get("memory", 0)) or 2.0 * PREDICTOR_MEMORY * max(gpus, 1)
    if device == "gpu" and gpus == 0:
        raise InferError("device=gpu but the Ray cluster has no GPUs; use --set device=auto or device=cpu")
    if device != "cpu" and gpus > 0:
        n = actors or gpus
        if n > gpus:
            raise InferError(f"actors={n} but the Ray cluster has {gpus} GPUs; each GPU actor takes one GPU")
        # one CPU per actor for its host-side work, unless that would leave none for decoding
        return PredictorPlan(device="gpu", actors=n, num_cpus=min(1.0, cpus / (2 * n)), num_gpus=1,
                             threads=2, batch_size=batch_size or 512, tasks_in_flight=4,
                             memory=int(min(PREDICTOR_MEMORY, memory_total / (2 * n))), decode_cpus=decode_cpus)
    # CPU: the model costs ~10x the decode per image, so actors get the CPUs less one for decoding;
    # on small machines the reservation is a scheduling share while the torch threads use every core.
    usable = cpus - decode_cpus
    n = actors or max(1, int(usable // 2) if usable >= 4 else 1)
    threads = max(1, round(cpus / n)) if cpus <= 4 else max(1, int(usable // n))
    return PredictorPlan(device="cpu", actors=n, num_cpus=min(usable / n, float(threads)), num_gpus=0,
                         threads=threads, batch_size=batch_size or 128, tasks_in_flight=2,
                         memory=int(min(PREDICTOR_MEMORY, memory_total / (2 * n))), decode_cpus=decode_cpus)


def prediction_dataset(
    table: pa.Table,
    model: str | ModelBundle,
    *,
    model_id: str | None = None,
    tta: str = "none",
    precision: str = "auto",
    device: str = "auto",
    batch_size: int | None = None,
    decode_batch_size: int = DECODE_BATCH,
    actors: int | None = None,
    compile: bool = False,
) -> "ray.data.Dataset":
    """The lazy Ray Dataset of predictions for a table with a `path` column (local or s3://).

    Extra columns of `table` (e.g. a true label) are passed through. Stages: read and decode on
    CPU tasks (`data.decode_batch`, one row per file, `error` set where it fails) -> `Predictor`
    actors sized by `plan_predictors`. Nothing runs until the dataset is consumed (write_parquet,
    iter_batches); results stream, nothing is collected on the driver. Starts Ray if needed.
    With `compile` each actor torch.compiles its model once before its first batch.
    """
    import ray

    if "path" not in table.column_names:
        raise ValueError(f"the table of inputs needs a 'path' column; it has: {', '.join(table.column_names)}")
    if isinstance(model, str):
        model, model_id = load_bundle(model)
    if model_id is None:
        raise ValueError("pass model_id (the bundle's identity from load_bundle) with a ModelBundle")
    if not ray.is_initialized():
        ray.init()
    plan = plan_predictors(ray.cluster_resources(), device=device, actors=actors, batch_size=batch_size)
    log.info("predictors: %d actor(s) on %s, %d thread(s) and %g CPU each, batch %d",
             plan.actors, plan.device, plan.threads, plan.num_cpus, plan.batch_size)
    ds = decoded_dataset(table, decode_size=model.decode_size, keep_errors=True,
                         decode_batch_size=decode_batch_size, num_cpus=plan.decode_cpus)
    return ds.map_batches(
        Predictor,
        fn_constructor_args=(ray.put(model),),
        fn_constructor_kwargs={"model_id": model_id, "tta": tta, "precision": precision,
                               "device": plan.device, "threads": plan.threads, "compile": compile,
                               "batch_size": plan.batch_size},
        batch_size=plan.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors, max_tasks_in_flight_per_actor=plan.tasks_in_flight),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, memory=plan.memory,
    )


def output_schema(classes: tuple[str, ...]) -> pa.Schema:
    """The Parquet schema of a labelled output, identical in every file."""
    return pa.schema(
        [("path", pa.string()), ("label", pa.string()), ("confidence", pa.float32())]
        + [(f"prob_{name}", pa.float32()) for name in classes]
        + [("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("model", pa.string())]
    )


def _to_output(table: pa.Table, *, schema: pa.Schema) -> pa.Table:
    """Predictor output -> the output schema: columns in order, no size for undecoded files."""
    failed = pc.is_valid(table["error"])
    columns = []
    for field in schema:
        col = table[field.name]
        if field.name in ("width", "height"):
            col = pc.if_else(failed, pa.scalar(None, col.type), col)
        columns.append(col.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


# --------------------------------------------------------------------------------------------
# Inputs


def list_inputs(src: str) -> pa.Table:
    """The images to label as a table with one `path` column, unique, in listing order.

    `src` is a folder or s3:// prefix (listed recursively for IMAGE_EXTENSIONS) or a .parquet /
    .csv manifest with a `path` column (relative paths are taken from the manifest's folder).
    Raises InferError naming the path and the fix when it is missing, unreadable or empty.
    """
    import pyarrow.fs as pafs

    try:
        _check_bucket(src, "input")
        kind = storage.info(src).type
    except InferError:
        raise
    except (OSError, ValueError) as e:
        raise InferError(f"cannot read input {src!r}: {_short(e)}; check the path{_S3_HINT if storage.is_remote(src) else ''}")

    if kind == pafs.FileType.File:
        if not src.lower().endswith(MANIFEST_SUFFIXES):
            raise InferError(f"input {src!r} is a file; pass a folder, an s3:// prefix, or a .parquet or .csv "
                             "manifest with a 'path' column")
        return _read_manifest(src)
    if kind == pafs.FileType.NotFound and not storage.is_remote(src):
        raise InferError(f"input {src!r} does not exist; pass a folder, an s3://bucket/prefix, or a .parquet or "
                         ".csv manifest with a 'path' column")
    try:
        paths = storage.list_files(src, IMAGE_EXTENSIONS)
    except FileNotFoundError:
        paths = []
    except (OSError, ValueError) as e:
        raise InferError(f"cannot list input {src!r}: {_short(e)}; check the path{_S3_HINT if storage.is_remote(src) else ''}")
    if not paths:
        raise InferError(f"no images under {src!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively); "
                         "check the path" + (" and the prefix" if storage.is_remote(src) else ""))
    log.info("listed %d images under %s", len(paths), src)
    return pa.table({"path": pa.array(paths, pa.string())})


def _read_manifest(src: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(src)
    try:
        if src.lower().endswith(".csv"):
            with fs.open_input_stream(path) as f:
                table = pacsv.read_csv(f)
        else:
            table = pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        raise InferError(f"cannot read manifest {src!r}: {_short(e)}")
    if "path" not in table.column_names:
        raise InferError(f"manifest {src!r} has no 'path' column (it has: {', '.join(table.column_names)}); "
                         "add one with an image path or s3:// URI per row")
    paths = table["path"].cast(pa.string())
    if paths.null_count or pc.any(pc.equal(pc.utf8_trim_whitespace(paths), "")).as_py():
        raise InferError(f"manifest {src!r} has empty paths; give every row an image path")
    base = src.rsplit("/", 1)[0] if "/" in src else "."
    resolved = [p if storage.is_remote(p) or os.path.isabs(p) else storage.join(base, p)
                for p in paths.to_pylist()]
    if not storage.is_remote(src):
        resolved = [p if storage.is_remote(p) else os.path.abspath(p) for p in resolved]
    unique = list(dict.fromkeys(resolved))
    if len(unique) < len(resolved):
        log.warning("manifest %s lists %d paths more than once; each is labelled once",
                    src, len(resolved) - len(unique))
    if not unique:
        raise InferError(f"manifest {src!r} lists no images")
    log.info("manifest %s lists %d images", src, len(unique))
    return pa.table({"path": pa.array(unique, pa.string())})


# --------------------------------------------------------------------------------------------
# Outputs


def _output_files(dst: str) -> list[str]:
    try:
        return storage.list_files(dst)
    except FileNotFoundError:
        return []


def prepare_output(dst: str, *, overwrite: bool, skip_existing: bool, model_id: str) -> pa.Array:
    """Check the output before any cluster work; returns the paths already labelled there.

    An empty or missing output is fine. A non-empty one is refused unless `overwrite` (its
    ray-fer files are deleted; anything else there is refused) or `skip_existing` (its rows are
    kept, and must come from the same model). `_SUCCESS` is removed first either way: from here on
    the output is unfinished until a new one is written.
    """
    import pyarrow.fs as pafs

    try:
        _check_bucket(dst, "output")
        kind = storage.info(dst).type
        files = _output_files(dst) if kind == pafs.FileType.Directory else []
    except InferError:
        raise
    except (OSError, ValueError) as e:
        raise InferError(f"cannot read output {dst!r}: {_short(e)}; check the path{_S3_HINT if storage.is_remote(dst) else ''}")
    if kind == pafs.FileType.File:
        raise InferError(f"output {dst!r} is a file; pass a folder or s3:// prefix for the Parquet data set")
    if not files:
        return pa.array([], pa.string())
    if not overwrite and not skip_existing:
        raise InferError(f"output {dst!r} is not empty ({len(files)} files); pass --overwrite to replace it, "
                         "--skip-existing to label only images not yet in it, or another --output")
    foreign = [f for f in files if not _is_ours(f)]
    if overwrite:
        if foreign:
            raise InferError(f"output {dst!r} holds files ray-fer did not write (e.g. {foreign[0]!r}); "
                             "--overwrite only replaces a labelled output: pick an empty or new --output")
        log.info("--overwrite: deleting the %d files in %s", len(files), dst)
        _remove_success(dst)
        for f in files:
            if storage.basename(f) != SUCCESS_FILE:
                storage.delete_file(f)
        return pa.array([], pa.string())
    _remove_success(dst)
    return _existing_paths(dst, [f for f in files if f.endswith(".parquet")], model_id)


def _is_ours(uri: str) -> bool:
    name = storage.basename(uri)
    return name.endswith(".parquet") or name == SUCCESS_FILE or ".tmp-" in name


def _remove_success(dst: str) -> None:
    marker = storage.join(dst, SUCCESS_FILE)
    if storage.exists(marker):
        storage.delete_file(marker)


def _existing_paths(dst: str, files: list[str], model_id: str) -> pa.Array:
    """Paths in an output's Parquet files; a file a crashed write left unreadable is deleted."""
    import pyarrow.parquet as pq

    chunks: list[pa.ChunkedArray] = []
    models: set[str] = set()
    for uri in files:
        fs, path = storage.filesystem(uri)
        try:
            names = pq.read_schema(path, filesystem=fs).names
        except pa.ArrowInvalid as e:  # not OSError: a network error must not delete anything
            log.warning("deleting %s: not a readable Parquet file (%s), left by a crashed write; "
                        "its images are labelled again", uri, _short(e))
            storage.delete_file(uri)
            continue
        if "path" not in names or "model" not in names:
            raise InferError(f"{uri!r} is not a ray-fer output file (no path and model columns); "
                             "--skip-existing resumes a labelled output: pick another --output")
        part = pq.read_table(path, columns=["path", "model"], filesystem=fs)
        chunks.append(part["path"])
        models.update(v for v in pc.unique(part["model"]).to_pylist() if v is not None)
    others = models - {model_id}
    if others:
        raise InferError(f"output {dst!r} was labelled by model {sorted(others)[0]}, not {model_id}; "
                         "pass the same --model to resume, or --overwrite to relabel everything")
    if not chunks:
        return pa.array([], pa.string())
    return pa.chunked_array([c for ch in chunks for c in ch.chunks], pa.string()).combine_chunks()


def count_output(dst: str) -> dict[str, Any]:
    """Rows and errors in an output's Parquet files, read from their footers (no data read)."""
    import pyarrow.parquet as pq

    rows = errors = 0
    files = [f for f in _output_files(dst) if f.endswith(".parquet")]
    for uri in files:
        fs, path = storage.filesystem(uri)
        meta = pq.read_metadata(path, filesystem=fs)
        col = meta.schema.names.index("error")
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            stats = group.column(col).statistics
            if stats is not None and stats.has_null_count:
                errors += group.num_rows - stats.null_count
            else:  # no statistics: read the one column
                errors += pq.read_table(path, columns=["error"], filesystem=fs)["error"].drop_null().length()
                break
    return {"images": rows, "labelled": rows - errors, "errors": errors,
            "files": [storage.basename(f) for f in files]}


_S3_HINT = ", the bucket name, AWS credentials and AWS_ENDPOINT_URL (for S3-compatible stores)"


def _check_bucket(uri: str, role: str) -> None:
    import pyarrow.fs as pafs

    if not storage.is_remote(uri):
        return
    bucket = uri[len("s3://"):].split("/", 1)[0]
    if storage.info(f"s3://{bucket}").type == pafs.FileType.NotFound:
        raise InferError(f"{role} bucket s3://{bucket} does not exist; check the bucket name"
                         + (", or create it" if role == "output" else "")
                         + " (and AWS_ENDPOINT_URL for S3-compatible stores)")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


# --------------------------------------------------------------------------------------------
# The library call


def label_images(cfg: InferConfig) -> dict[str, Any]:
    """Label every image under `cfg.input` into a Parquet data set at `cfg.output`.

    Checks the model, the input and the output before any cluster work. Returns the summary that
    `_SUCCESS` also holds: images, labelled and errors (the whole output), processed and skipped
    (this run), output, model, seconds and images_per_s (this run's images over its wall time).
    """
    cfg.check()
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    bundle, model_id = load_bundle(cfg.model)
    inputs = list_inputs(cfg.input)
    done = prepare_output(cfg.output, overwrite=cfg.overwrite, skip_existing=cfg.skip_existing, model_id=model_id)
    todo = inputs.filter(pc.invert(pc.is_in(inputs["path"], value_set=done))) if len(done) else inputs
    skipped = inputs.num_rows - todo.num_rows
    if skipped:
        log.info("--skip-existing: %d of %d images are already in %s", skipped, inputs.num_rows, cfg.output)
    if todo.num_rows:
        ds = prediction_dataset(
            todo, bundle, model_id=model_id, tta=cfg.tta, precision=cfg.precision, device=cfg.device,
            batch_size=cfg.batch_size, decode_batch_size=cfg.decode_batch_size, actors=cfg.actors,
            compile=cfg.compile,
        )
        # half a CPU for the cheap write stage, so it fits beside decode tasks and actors on any cluster
        ds = ds.map_batches(_to_output, fn_kwargs={"schema": output_schema(bundle.classes)},
                            batch_format="pyarrow", batch_size=None, num_cpus=0.5)
        ds.write_parquet(cfg.output, min_rows_per_file=ROWS_PER_FILE, ray_remote_args={"num_cpus": 0.5})
    counts = count_output(cfg.output)
    expected = len(done) + todo.num_rows
    if counts["images"] != expected:  # a bug or a concurrent writer, not bad input: no _SUCCESS
        raise RuntimeError(f"{cfg.output} holds {counts['images']} rows, expected {expected}; "
                           "it is left without _SUCCESS: run again with --overwrite")
    seconds = time.perf_counter() - t0
    summary = {
        "images": counts["images"], "labelled": counts["labelled"], "errors": counts["errors"],
        "processed": todo.num_rows, "skipped": skipped, "output": cfg.output, "model": model_id,
        "seconds": round(seconds, 2), "images_per_s": round(todo.num_rows / seconds, 1),
    }
    success = summary | {
        "model_uri": cfg.model, "input": cfg.input, "files": counts["files"],
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ray_fer_version": __version__, "config": asdict(cfg),
    }
    storage.write_bytes(storage.join(cfg.output, SUCCESS_FILE), json.dumps(success, indent=2).encode())
    log.info("labelled %d images (%d errors) into %s in %.1f s", todo.num_rows, counts["errors"], cfg.output, seconds)
    return summary
