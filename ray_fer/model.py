"""EfficientNet-B0 with a 7-class head, and the model bundle that carries what inference needs.

A bundle is one `torch.save`d dict of plain types (loadable with `weights_only=True`): the weights
of the unwrapped model, the class names, decode and input sizes, normalisation, architecture, the
resolved training config and the best metrics. Loading it never needs the training flags.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import urllib.error
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models import EfficientNet_B0_Weights, efficientnet_b0

from ray_fer.store import storage
from ray_fer.images import IMAGENET_MEAN, IMAGENET_STD, EvalPreset
from ray_fer.labels import CLASSES, NUM_CLASSES
from ray_fer.model_ref import ModelLoadError, not_loadable, packaged_model, read_model_file

log = logging.getLogger(__name__)

ARCHITECTURE = "efficientnet_b0"
BUNDLE_FORMAT = "ray-fer-bundle/1"
def build_model(weights: str = "none", num_classes: int = NUM_CLASSES, stem_stride: int = 2) -> nn.Module:
    """EfficientNet-B0 with a fresh `num_classes` head.

    weights: "none" (random init), "imagenet" (torchvision's ImageNet-1k weights; downloaded once
    into the torch hub cache), a packaged model's name (fine-tuning from it), or a path / s3:// URI
    of a state dict or model bundle.
    stem_stride: 2 as published; 1 for small inputs (same weights, a 2x larger feature map throughout).
    A bundle's weights must be used with the stem stride they were trained with.
    """
    return set_stem_stride(_build(weights, num_classes, stem_stride), stem_stride)


def set_stem_stride(model: nn.Module, stride: int) -> nn.Module:
    """Set the stride of EfficientNet-B0's first convolution; the weights' shapes do not change."""
    stem = model.features[0][0]
    stem.stride = (stride, stride)
    return model


def _build(weights: str, num_classes: int, stem_stride: int) -> nn.Module:
    if weights == "none":
        model = efficientnet_b0(weights=None, num_classes=num_classes)
        _reset_head(model.classifier[1])
        return model
    if weights == "imagenet":
        return _imagenet_model(num_classes)
    weights = packaged_model(weights) or weights
    state, trained_stride = _state_dict_from_file(weights)
    if trained_stride is not None and trained_stride != stem_stride:
        raise ModelLoadError(f"{weights!r} was trained with model.stem_stride={trained_stride}; set "
                             f"model.stem_stride={trained_stride} (and its data.image_size) to start from it")
    head = state.get("classifier.1.weight")
    if head is None:
        raise ModelLoadError(f"{weights!r} holds no EfficientNet-B0 weights (no 'classifier.1.weight' key)")
    model = efficientnet_b0(weights=None, num_classes=head.shape[0])
    _load_state(model, state, weights)
    if head.shape[0] != num_classes:  # e.g. a local copy of the ImageNet weights: keep the body
        model.classifier[1] = nn.Linear(model.classifier[1].in_features, num_classes)
        _reset_head(model.classifier[1])
    return model


def _reset_head(linear: nn.Linear) -> None:
    # torchvision's uniform(+-1/sqrt(7)) head starts with huge logits and stalls training (ML-NOTES);
    # a zero head starts at the uniform-guess loss ln(7) and learns at once.
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


def _imagenet_model(num_classes: int) -> nn.Module:
    try:
        model = efficientnet_b0(weights=EfficientNet_B0_Weights.IMAGENET1K_V1)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        url = EfficientNet_B0_Weights.IMAGENET1K_V1.url
        raise ModelLoadError(
            f"could not download the ImageNet weights ({type(e).__name__}: {e}). This machine seems "
            f"offline: download {url} where the network allows, then pass model.weights=/path/to/"
            f"{url.rsplit('/', 1)[-1]} (or put the file in $TORCH_HOME/hub/checkpoints/), "
            "or use model.weights=none to train from scratch"
        ) from None
    model.classifier[1] = nn.Linear(model.classifier[1].in_features, num_classes)
    _reset_head(model.classifier[1])
    return model


def _torch_load(data: bytes, source: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and unpickler errors alike
        raise not_loadable(source, f"{type(e).__name__}: {str(e)[:200]}") from None


def _state_dict_from_file(uri: str) -> tuple[dict[str, torch.Tensor], int | None]:
    """The weights in a bundle or state dict file, and the stem stride a bundle was trained with."""
    obj = _torch_load(read_model_file(uri), uri)
    if isinstance(obj, dict) and obj.get("format") == BUNDLE_FORMAT:
        return obj["state_dict"], int(obj.get("stem_stride", 2))
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise ModelLoadError(f"{uri!r} is neither a ray-fer model bundle nor a state dict of tensors")


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f"{source!r} does not match {ARCHITECTURE}: {str(e)[:300]}") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# --------------------------------------------------------------------------------------------
# The model bundle


@dataclass
class ModelBundle:
    state_dict: dict[str, torch.Tensor]
    image_size: int
    decode_size: int
    classes: tuple[str, ...] = CLASSES
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    architecture: str = ARCHITECTURE
    stem_stride: int = 2  # 1: the small-input variant (see ModelConfig.stem_stride)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved training config
    metrics: dict[str, Any] = field(default_factory=dict)  # the best epoch's metrics
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch metrics of the run
    class_counts: list[int] | None = None  # training rows per class: the prior `ray-fer calibrate` shifts along
    calibration: dict[str, Any] = field(default_factory=dict)  # what `ray-fer calibrate` folded into the head

    def build_model(self) -> nn.Module:
        """The model in eval mode on the CPU, weights loaded."""
        if self.architecture != ARCHITECTURE:
            raise ModelLoadError(f"bundle architecture {self.architecture!r} is not supported ({ARCHITECTURE})")
        model = efficientnet_b0(weights=None, num_classes=len(self.classes))
        _load_state(model, self.state_dict, "model bundle")
        return set_stem_stride(model, self.stem_stride).eval()

    def half(self) -> "ModelBundle":
        """The same bundle with its floating-point tensors stored as float16 (half the bytes).

        Models always run in float32 or autocast: `build_model` copies the weights into a float32
        model, so only the stored values are rounded (`ray-fer export --half` checks the labels)."""
        state = {k: v.half() if v.is_floating_point() else v for k, v in self.state_dict.items()}
        return dataclasses.replace(self, state_dict=state)

    def eval_preset(self, channels_last: bool = True) -> EvalPreset:
        return EvalPreset(image_size=self.image_size, mean=self.mean, std=self.std, channels_last=channels_last)

    def to_bytes(self) -> bytes:
        payload = {
            "format": BUNDLE_FORMAT,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict.items()},
            "image_size": self.image_size,
            "decode_size": self.decode_size,
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
            "architecture": self.architecture,
            "stem_stride": self.stem_stride,
            "config": self.config,
            "metrics": self.metrics,
            "history": self.history,
            "class_counts": self.class_counts,
            "calibration": self.calibration,
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "model bundle") -> "ModelBundle":
        obj = _torch_load(data, source)
        if not isinstance(obj, dict) or obj.get("format") != BUNDLE_FORMAT:
            raise ModelLoadError(
                f"{source!r} is not a ray-fer model bundle; pass the model.pt that `ray-fer train` wrote "
                "(a plain state dict can be used as model.weights for training instead)"
            )
        return cls(
            state_dict=obj["state_dict"],
            image_size=int(obj["image_size"]),
            decode_size=int(obj["decode_size"]),
            classes=tuple(obj["classes"]),
            mean=tuple(obj["mean"]),
            std=tuple(obj["std"]),
            architecture=obj["architecture"],
            stem_stride=int(obj.get("stem_stride", 2)),
            config=obj.get("config", {}),
            metrics=obj.get("metrics", {}),
            history=obj.get("history", []),
            class_counts=obj.get("class_counts"),
            calibration=obj.get("calibration", {}),
        )


def save_bundle(bundle: ModelBundle, uri: str) -> str:
    """Write the bundle to a local path or s3:// URI; returns its identity (see `model_id`)."""
    storage.write_bytes(uri, bundle.to_bytes())
    return model_id(bundle)


def load_bundle(uri: str) -> tuple[ModelBundle, str]:
    """Read a bundle from a local path or s3:// URI; returns (bundle, identity)."""
    bundle = ModelBundle.from_bytes(read_model_file(uri), uri)
    return bundle, model_id(bundle)


def model_id(bundle: ModelBundle) -> str:
    """A model's identity: the first 16 hex digits of a SHA-256 over what decides its predictions.

    That is the weights, the classes, the preprocessing (decode and input size, mean, std) and
    the architecture (with the stem stride); not the config, metrics or history, so re-exporting the same weights
    keeps the id (labelled outputs name the model that wrote them) and any other weights get
    a new one. Computed from the content, so bundles written before this rule get an id too.
    """
    h = hashlib.sha256()
    header = {"architecture": bundle.architecture, "classes": list(bundle.classes),
              "image_size": bundle.image_size, "decode_size": bundle.decode_size,
              "mean": [float(m) for m in bundle.mean], "std": [float(s) for s in bundle.std]}
    if bundle.stem_stride != 2:  # only where it differs, so ids of bundles from before it stay the same
        header["stem_stride"] = bundle.stem_stride
    h.update(json.dumps(header, sort_keys=True).encode() + b"\0")
    for name in sorted(bundle.state_dict):
        t = bundle.state_dict[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes (bf16 has no numpy dtype), no copy
    return h.hexdigest()[:16]
