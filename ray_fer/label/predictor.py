"""The model call and the Ray Data predictor: decoded uint8 faces in, class probabilities out.

- `predict_probs`: one batch through a model, with test-time views and the precision policy
  (`precision.autocast_dtype`); under bf16 the near-ties are re-computed in exact fp32.
- `fold_batchnorm`: the same network with one pass fewer over every activation (inference only).
- `Predictor`: the Ray Data callable class; loads the model once per actor.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from ray_fer.images import EvalPreset, tta_views
from ray_fer.schema import PREDICTION_COLUMNS
from ray_fer.model import ModelBundle, load_bundle
from ray_fer.label.plan import CPU_CHUNK
from ray_fer.precision import autocast_dtype, exact_fp32

log = logging.getLogger(__name__)


FP32_STAGES = 2  # EfficientNet feature stages (stem, first MBConv) kept fp32 under autocast
# Under autocast, rows whose two most likely classes are closer than this (in probability) are
# computed again in fp32, so bf16 rarely flips a near-tie. Measured on FER2013 val with four weakly
# trained models (weak models have the most near-ties): bf16 alone agreed with fp32 on 99.05-99.64%
# of the labels; with this re-check on 99.92-100%, re-computing 2.5-20% of the rows (~10% slower).
NEAR_TIE = 0.002
# The error of a row whose probabilities are NaN or infinite also in fp32: it gets no label.
NON_FINITE = "non-finite model output (NaN or inf probabilities, also in fp32)"


# --------------------------------------------------------------------------------------------
# The model call


@torch.inference_mode()
def predict_probs(
    model: torch.nn.Module,
    preset: EvalPreset,
    pixels_uint8: torch.Tensor,
    *,
    tta: str = "none",
    autocast_dtype: torch.dtype | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Class probabilities, float32 (B, num_classes) on the model's device, of uint8 faces (B, S, S).

    The pixels move to the model's device first (pin them for a non-blocking copy), so resizing
    and normalising by `preset` (the bundle's EvalPreset) happen there. With a TTA mode the
    probabilities are averaged over `images.tta_views`. The model sees `chunk` rows at a time
    (default: all). `autocast_dtype` (bf16 / fp16) runs the model under autocast, then
    re-computes in fp32, in one more pass over all chunks, the rows whose top two classes are
    closer than NEAR_TIE, where bf16's rounding could flip the label, and the rows whose
    probabilities are not finite (fp16 logits overflow at 65,504): a batch of several chunks
    pays for one such call, not one per chunk. The softmax is always float32; a row can still
    be non-finite in fp32 (callers make it an error, NON_FINITE). `forward` replaces
    the autocast model call (a compiled `_forward` of the same model and dtype, for `chunk` rows;
    see Predictor).
    """
    device = next(model.parameters()).device
    pixels = pixels_uint8.to(device, non_blocking=True)
    step = chunk or max(len(pixels), 1)
    probs = torch.cat([_probs(model, preset, pixels[i:i + step], tta, autocast_dtype, forward)
                       for i in range(0, len(pixels), step)]) if len(pixels) else \
        _probs(model, preset, pixels, tta, autocast_dtype, forward)
    if autocast_dtype is not None and probs.shape[1] > 1:
        top2 = probs.topk(2, dim=1).values
        near = ((top2[:, 0] - top2[:, 1]) < NEAR_TIE) | ~torch.isfinite(probs).all(dim=1)
        if near.any():
            with exact_fp32(device):
                probs[near] = predict_probs(model, preset, pixels[near], tta=tta, chunk=chunk)
    return probs


def _probs(model: torch.nn.Module, preset: EvalPreset, pixels: torch.Tensor, tta: str,
           autocast_dtype: torch.dtype | None, forward: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Probabilities of one chunk, averaged over its test-time views."""
    total: torch.Tensor | None = None
    views = tta_views(pixels, tta)
    for view in views:
        x = preset(view)
        logits = forward(x) if forward is not None else _forward(model, x, autocast_dtype)
        probs = torch.softmax(logits.float(), dim=1)
        total = probs if total is None else total + probs
    assert total is not None
    return total / len(views)


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

    The model sees `chunk` rows per call (default: CPU_CHUNK on CPU, where small calls keep the
    activations in cache, the whole batch on a GPU); under bf16 a batch's near-ties then go
    through the fp32 model in one more call, however many chunks it has.

    With `compile`, the model call is `torch.compile`d at construction for calls of exactly
    `chunk` rows (shorter ones are padded with blank faces, so it never recompiles; if
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
        chunk: int | None = None,
    ) -> None:
        import ray

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        if isinstance(model, (bytes, memoryview)):  # a bundle's bytes (pipeline.open_model, opened before)
            model = ModelBundle.from_bytes(bytes(model))
        if isinstance(model, str):
            model, model_id = load_bundle(model)
        if not isinstance(model, ModelBundle) or model_id is None:
            raise TypeError("Predictor needs a bundle URI, or a ModelBundle or its bytes (or their ObjectRef) with model_id")
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
        self.decode_size = model.decode_size
        self.tta = tta
        self.batch_size = batch_size
        self.chunk = chunk or (batch_size if self.device.type == "cuda" else min(batch_size, CPU_CHUNK))
        self.forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        if compile:
            self._compile(model.decode_size)
        log.info("predictor ready: model %s on %s, autocast %s, tta %s, %d threads%s",
                 model_id, self.device, self.autocast, tta, torch.get_num_threads(), ", compiled" if compile else "")

    def _compile(self, decode_size: int) -> None:
        """torch.compile the model call for `chunk` rows; on failure (e.g. no C++
        compiler for inductor on this node) log why and keep the eager model: same labels."""
        started = time.perf_counter()
        self.forward = torch.compile(
            functools.partial(_forward, self.net, autocast_dtype=self.autocast), dynamic=False)
        try:  # compiles here, on a batch of blank faces, not in the middle of the first real batch
            self._predict(np.zeros((self.chunk, decode_size, decode_size), dtype=np.uint8))
        except Exception as e:  # noqa: BLE001 - inductor raises many types (missing compiler, ...)
            self.forward = None
            log.warning("compile=true failed, labelling with the eager model instead: %s",
                        (str(e).strip().splitlines() or [type(e).__name__])[0][:300])
            return
        log.info("predictor compiled the model in %.0f s", time.perf_counter() - started)

    def _predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (n, classes) of n >= 1 uint8 faces (n, S, S)."""
        n = len(pixels)
        step = self.chunk
        if self.forward is not None and n % step:  # a compiled model sees full chunks only: pad with blank faces
            pixels = np.concatenate([pixels, np.zeros((step - n % step, *pixels.shape[1:]), dtype=pixels.dtype)])
        x = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type == "cuda":
            x = x.pin_memory()  # note: lets the host-to-device copy overlap
        probs = predict_probs(self.net, self.preset, x, tta=self.tta, autocast_dtype=self.autocast,
                              forward=self.forward, chunk=step)
        return probs.cpu().numpy()[:n]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        pixels = batch["image"]
        n = len(pixels)
        errors = batch["error"] if "error" in batch else np.full(n, None, dtype=object)
        ok = no_error(errors)
        probs = np.zeros((n, len(self.classes)), dtype=np.float32)
        if ok.any():
            probs[ok] = self._predict(pixels[ok])
        errors, ok = with_non_finite(errors, ok, probs)
        missing = ~ok
        best = probs.argmax(axis=1)
        columns: dict[str, pa.Array] = {}
        for name, values in batch.items():
            if name in ("image", "error"):
                continue
            if name in PREDICTION_COLUMNS or name in self.prob_columns or name == "model":
                raise ValueError(f"input column {name!r} would be overwritten by the prediction; rename it")
            columns[name] = arrow_column(values)
        columns["label"] = pa.array([None if missing[i] else self.classes[best[i]] for i in range(n)], pa.string())
        columns["confidence"] = pa.array(probs.max(axis=1, initial=0.0), pa.float32(), mask=missing)
        for j, name in enumerate(self.prob_columns):
            columns[name] = pa.array(probs[:, j], pa.float32(), mask=missing)
        columns["error"] = pa.array([None if ok[i] else str(errors[i]) for i in range(n)], pa.string())
        columns["model"] = pa.array([self.model_id] * n, pa.string())
        return pa.table(columns)


def with_non_finite(errors: np.ndarray, ok: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(errors, ok) with NON_FINITE set on the ok rows whose probabilities are not finite, whose
    probabilities are zeroed (in place): such a row gets an error, never a label."""
    bad = ok & ~np.isfinite(probs).all(axis=1)
    if not bad.any():
        return errors, ok
    errors = np.array(errors, dtype=object)
    errors[bad] = NON_FINITE
    probs[bad] = 0.0
    log.warning("%d row(s) with non-finite model output, also in fp32: written as errors", int(bad.sum()))
    return errors, ok & ~bad


def no_error(errors: np.ndarray) -> np.ndarray:
    """True where `error` is unset: None, or NaN where Ray turned an all-null column into floats."""
    errors = np.asarray(errors)
    if errors.dtype.kind == "f":
        return np.isnan(errors)
    return np.array([e is None or (isinstance(e, (float, np.floating)) and np.isnan(e)) for e in errors], dtype=bool)


def arrow_column(values: np.ndarray) -> pa.Array:
    arr = np.asarray(values)
    if arr.ndim > 1:  # a tensor column: Ray's own conversion keeps its shape
        from ray.data.block import BlockAccessor

        return BlockAccessor.batch_to_block({"x": arr}).column("x")
    return pa.array(arr)
