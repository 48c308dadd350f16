"""Typed configs: dataclasses with defaults, YAML loading, `--set a.b=c` overrides, validation.

Every config error is a `ConfigError` naming the key, the bad value and the valid choices, raised
before any Ray work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import yaml


class UserError(ValueError):
    """Bad input from the user (config, paths, files): the message names the problem and the fix.

    Entry points print it without a traceback and exit non-zero."""


class ConfigError(UserError):
    """A configuration value that cannot be used; the message says which key and how to fix it."""


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class DataConfig:
    train: str = ""  # image-folder root of the training split (local path or s3://)
    val: str = ""  # image-folder root of the validation split (local path or s3://)
    image_size: int = 224  # model input side in pixels
    decode_size: int = 48  # side the CPU decodes images to (uint8); resized to image_size on the device
    limit_per_class: int | None = None  # cap on images per class and split, for quick runs
    # more labelled image folders added to the training split (e.g. real photos beside FER2013)
    extra_train: list[str] = field(default_factory=list)
    extra_repeat: int = 1  # times each image of extra_train is seen per epoch (a small set oversampled)
    # whole: every image is a face, decoded whole. auto: images bigger than 128 px (photos) are
    # searched for faces and the largest one's aligned crop, cut as the face stage cuts it when
    # labelling, is the training image (no face found: the whole image); smaller ones stay whole
    faces: Literal["whole", "auto"] = "whole"

    def check(self) -> None:
        if not self.train:
            raise ConfigError("data.train is not set: pass --set data.train=PATH (an image folder)")
        if not self.val:
            raise ConfigError("data.val is not set: pass --set data.val=PATH (an image folder)")
        _at_least("data.image_size", self.image_size, 32)
        _at_least("data.decode_size", self.decode_size, 8)
        if self.limit_per_class is not None:
            _at_least("data.limit_per_class", self.limit_per_class, 1)
        _at_least("data.extra_repeat", self.extra_repeat, 1)
        if any(not p for p in self.extra_train):
            raise ConfigError("data.extra_train holds an empty path; give image-folder roots, e.g. "
                              "--set 'data.extra_train=[/data/wild-faces/train]'")


@dataclass
class ModelConfig:
    weights: str = "none"  # imagenet | none | a path or s3:// URI of a state dict or model bundle
    # stride of the stem convolution: 2 is EfficientNet-B0 as published; 1 halves the total stride
    # (32 -> 16) for small faces: a 48-px input keeps a 3x3 final feature map instead of 2x2
    stem_stride: Literal[1, 2] = 2


@dataclass
class TrainConfig:
    epochs: int = 15  # total epochs; raising it on a finished run extends the run
    batch_size: int = 32  # per worker
    lr: float = 0.001  # base learning rate for lr_reference_batch images per step
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"  # how lr grows with the global batch
    lr_reference_batch: int = 32  # global batch at which lr applies unscaled
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    scheduler: Literal["cosine", "constant"] = "cosine"  # learning-rate schedule, updated every step
    warmup_epochs: int = 0  # epochs of per-step linear warm-up before the schedule
    label_smoothing: float = 0.0
    # 0: off. Otherwise logit-adjusted cross-entropy with this tau (1 is the paper's): the loss adds
    # tau * log(class prior of the training rows) to the logits, so the model's own logits are
    # trained as if the classes were balanced (against a drift to FER2013's happy and neutral)
    logit_adjust: float = 0.0
    # 0: off. Otherwise keep an exponential moving average of the weights and BatchNorm statistics,
    # updated after every optimizer step with this decay (0.999 averages over about 1,000 steps):
    # val metrics, the best checkpoint and the exported model are then the average's
    ema_decay: float = 0.0
    augment: Literal["standard", "photo", "flip_rotate", "none"] = "standard"  # named train preset
    # 0: off. Otherwise each face is augmented twice and the loss adds this weight times the
    # Jensen-Shannon divergence of the two predictions (AugMix's consistency loss): labels that
    # change less with framing, at about twice the cost of a step
    consistency: float = 0.0
    # the second view of train.consistency: `augment`, another augmentation of the face; `face`, the
    # face as the face stage cuts a face found in a photo (ray_fer/faces/views.py: detected, aligned
    # by its landmarks), then augmented: labels that agree between FER2013's framing and the face
    # stage's. The detector runs once per run over the training split (75 faces/s on 2 cores)
    consistency_view: Literal["augment", "face"] = "augment"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 (or fp16) on GPU, off on CPU
    channels_last: bool = True  # faster convolutions on CPU and GPU
    compile: bool = False  # torch.compile the model (GPU; measure before relying on it)
    seed: int = 0
    fail_at_epoch: int | None = None  # fault injection: rank 0 kills its own process after this epoch, once

    def check(self) -> None:
        _at_least("train.epochs", self.epochs, 1)
        _at_least("train.batch_size", self.batch_size, 1)
        _at_least("train.lr_reference_batch", self.lr_reference_batch, 1)
        _at_least("train.warmup_epochs", self.warmup_epochs, 0)
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.logit_adjust < 0:
            raise ConfigError(f"train.logit_adjust must be >= 0 (0 turns it off; 1 is usual), got {self.logit_adjust}")
        if self.consistency < 0:
            raise ConfigError(f"train.consistency must be >= 0 (0 turns it off; AugMix uses 12), got {self.consistency}")
        if self.consistency_view == "face" and not self.consistency:
            raise ConfigError("train.consistency_view=face gives each face a second view for train.consistency, "
                              "which is 0 (off); set train.consistency (e.g. 12) or leave train.consistency_view "
                              "at augment")
        if self.consistency and self.augment == "none" and self.consistency_view == "augment":
            raise ConfigError("train.consistency compares two augmentations of each face, and train.augment=none "
                              "makes them the same; choose train.augment=standard, photo or flip_rotate, "
                              "train.consistency_view=face, or train.consistency=0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (0 turns the weight average off; 0.999 is "
                              f"usual), got {self.ema_decay}")


@dataclass
class RunSection:
    name: str = "fer"  # run name; re-running a name resumes it (see `resume`)
    storage_path: str = "./runs"  # where runs live (local folder or s3://)
    shared_storage: bool = False  # local paths (storage_path, data) are on a filesystem every node mounts (NFS)
    num_workers: int = 1  # Ray Train workers
    use_gpu: Literal["auto", True, False] = "auto"  # auto: use GPUs when the cluster has them
    cpus_per_worker: int | None = None  # CPU threads per worker; default: the node's CPUs / workers
    max_failures: int = 2  # worker-group restarts allowed
    checkpoints_to_keep: int = 2  # best checkpoints kept, ranked by val_loss
    # which checkpoint becomes model.pt: "best" (lowest val_loss) or "last" (the last epoch's: for a
    # fine-tune whose goal is not the validation set's own, e.g. real photos beside FER2013 val)
    export: Literal["best", "last"] = "best"
    # auto: a re-used name resumes only if the settings that shape the weights are unchanged;
    # force: resume anyway, training on with the new settings
    resume: Literal["auto", "force"] = "auto"
    # mlflow: log the run to MLflow (MLFLOW_TRACKING_URI, else <storage_path>/mlflow.db): its
    # settings, every epoch's metrics, the report and the model (pip install 'ray-fer[mlflow]')
    tracking: Literal["none", "mlflow"] = "none"
    experiment: str = "ray-fer"  # the MLflow experiment of the run (created when missing)

    def check(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"run.name must be a non-empty name without '/', got {self.name!r}")
        if not self.storage_path:
            raise ConfigError("run.storage_path is empty: pass a local folder or s3:// prefix")
        _at_least("run.num_workers", self.num_workers, 1)
        if self.cpus_per_worker is not None:
            _at_least("run.cpus_per_worker", self.cpus_per_worker, 1)
        _at_least("run.max_failures", self.max_failures, 0)
        _at_least("run.checkpoints_to_keep", self.checkpoints_to_keep, 1)
        if not self.experiment:
            raise ConfigError("run.experiment is empty: name the MLflow experiment, e.g. --set run.experiment=ray-fer")


@dataclass
class TrainJobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunSection = field(default_factory=RunSection)

    def check(self) -> None:
        self.data.check()
        self.train.check()
        self.run.check()


# --------------------------------------------------------------------------------------------
# Labelling


@dataclass
class InferConfig:
    # a packaged model's name (fer2013: ray_fer/models/), or a model.pt that `ray-fer train` wrote
    # (local path, s3:// URI, or its run folder)
    model: str = "fer-photos"
    input: str = ""  # image folder, s3:// prefix, or a .parquet/.csv manifest with a `path` column
    output: str = ""  # local folder or s3:// prefix that receives the Parquet data set
    overwrite: bool = False  # replace an existing output (only files ray-fer writes are deleted)
    skip_existing: bool = False  # label only the images not yet in the output: finishes a crashed job
    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto: one predictor per GPU when the cluster has GPUs
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPUs and on CPUs with native bf16
    tta: Literal["none", "flip", "tencrop"] = "none"  # test-time views whose probabilities are averaged
    batch_size: int | None = None  # images per predictor call; default 512 (with faces: 128 on CPU, 256 on GPU)
    decode_batch_size: int = 2048  # most images per read-and-decode task
    actors: int | None = None  # predictor actors; default: one per GPU, else sized from the cluster's CPUs
    compile: bool = False  # torch.compile each predictor's model: 1.15-1.4x on CPU after a ~1 min compile
    # detect: find, align and label every face (one row per face); whole: label each whole image
    # (stores of face crops); auto: images up to 128 px are face crops, the others are searched
    faces: Literal["auto", "detect", "whole"] = "auto"
    face_detect_size: int = 640  # long side the face detector searches at; raise for small faces (cost ~ its square)
    # videos (.mp4 .m4v .mov .mkv .webm .avi; with faces auto or detect): frames sampled per second
    # of video (0: every frame), and seconds of video per decode task
    fps: float = 2.0
    segment_s: float = 60.0

    def check(self) -> None:
        if not self.model:
            raise ConfigError("model is empty: pass --model fer-photos (the packaged model) or the model.pt "
                              "that `ray-fer train` wrote")
        if not self.input:
            raise ConfigError("input is not set: pass --input PATH (a folder, s3://bucket/prefix or a manifest)")
        if not self.output:
            raise ConfigError("output is not set: pass --output PATH (a local folder or s3://bucket/prefix)")
        if self.overwrite and self.skip_existing:
            raise ConfigError("overwrite and skip_existing exclude each other: pick one")
        if self.batch_size is not None:
            _at_least("batch_size", self.batch_size, 1)
        _at_least("decode_batch_size", self.decode_batch_size, 1)
        if self.actors is not None:
            _at_least("actors", self.actors, 1)
        _at_least("face_detect_size", self.face_detect_size, 64)
        if not 0 <= self.fps <= 240:
            raise ConfigError(f"fps must be in [0, 240] (frames sampled per second of video; 0: every frame), "
                              f"got {self.fps}")
        _at_least("segment_s", self.segment_s, 1)


# --------------------------------------------------------------------------------------------
# Loading


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


C = TypeVar("C")


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Turn ["a.b=1", "c=x"] into {"a.b": 1, "c": "x"}; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} is not of the form key=value (e.g. train.epochs=5)")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | list[str] | None = None,
) -> C:
    """Build a `cls` config from an optional YAML file plus dotted-key overrides, then check it."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist: pass --config PATH to a YAML file")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    cfg = from_dict(cls, raw)
    check = getattr(cfg, "check", None)
    if check is not None:
        check()
    return cfg


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type[C], data: Mapping[str, Any], prefix: str = "") -> C:
    """Build dataclass `cls` from a mapping, checking keys and value types recursively."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown key {prefix}{key!s}; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
                              + ", ".join(names))
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, data[name] if data[name] is not None else {}, key + ".")
        else:
            kwargs[name] = _coerce(key, data[name], tp)
    return cls(**kwargs)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return value
        if isinstance(value, str):  # "True" / "auto" written in any case
            for choice in choices:
                if str(choice).lower() == value.strip().lower():
                    return choice
        raise ConfigError(f"{key}: {value!r} is not valid; choose one of: "
                          + ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} has the wrong type ({tp})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if origin is list:
        if isinstance(value, str):  # one path given where a list is expected
            value = [value]
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in the dataclass, not user input


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict (asdict of a config) as dotted keys: {"train.lr": 0.001, ...}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
