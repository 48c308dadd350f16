"""The model as the driver of a labelling job holds it: the file a --model names, and a reference
to its bundle, opened in a Ray task. The driver never imports torch.

torch's import alone is about 500 MB of a process's memory (measured: 506 MB RSS after `import
torch`, 163 MB after `import ray.data`). A driver that loaded the bundle itself peaked at 1,070 MB
labelling 1,000,000 files (docs/scale.md). The driver needs only what the bundle says about
itself: its identity, classes and sizes (`ModelRef`). The predictor actors get the bundle through
the object store; they import torch anyway.

    ModelFile.read(model)      driver, before any cluster work: which file (packaged name, run
                               folder, path or s3:// URI), its bytes, and that they are a torch.save
                               archive
    pipeline.open_model(file)  a Ray task loads the bundle (weights_only): its ModelRef; what the
                               driver needs of it is kept on the driver's disk (`remember`), so a
                               later run of the same bundle skips the task and the actors open
                               the bytes themselves
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ray_fer.store import storage
from ray_fer.config import UserError

# Models that ship inside the package (ray_fer/models/<name>.pt), usable by name as --model
PACKAGED_MODELS = {
    "fer-photos": "the default: fer2013 fine-tuned on FER2013 and real news and film faces (wild-faces/train), "
                  "blended with fer2013 and calibrated (docs/training.md#labels-on-real-photos)",
    "fer2013": "trained by `ray-fer train --config jobs/fer2013-cpu.yaml` on FER2013 train alone",
}
DEFAULT_MODEL = "fer-photos"
BUNDLE_FILE = "model.pt"  # a training run's exported best model, in its run folder (train/runs.py)
MLFLOW_SCHEMES = ("runs:/", "models:/")  # MLflow model URIs (ray_fer.tracking)
OPEN_CPUS = 0.25  # the task that opens a bundle: a moment of one core, before any labelling


class ModelLoadError(UserError):
    """A weights or bundle file that cannot be used; the message names the file and the fix."""


def packaged_model(name: str) -> str | None:
    """The file of a model shipped in the package (see PACKAGED_MODELS), or None for other names."""
    if name not in PACKAGED_MODELS:
        return None
    from importlib.resources import files

    path = files("ray_fer") / "models" / f"{name}.pt"
    if not path.is_file():
        raise ModelLoadError(f"this installation lacks the packaged model {name!r} ({path}); reinstall ray-fer, "
                             "or pass --model with a model.pt that `ray-fer train` wrote")
    return str(path)


def resolve_model(uri: str) -> str:
    """A model bundle's URI: the file of a packaged model given by name (e.g. "fer2013"), the path
    itself, <run folder>/model.pt when given a run folder, or for an MLflow model URI
    (runs:/<run id>/model, models:/<name>/<version>) its model.pt downloaded from the tracker
    (`tracking.download_model`). A packaged model's name wins over a local file or folder of that
    name: write ./fer2013 for those."""
    packaged = packaged_model(uri)
    if packaged is not None:
        return packaged
    if uri.startswith(MLFLOW_SCHEMES):
        from ray_fer.tracking import download_model

        return download_model(uri)
    if storage.is_dir(uri):
        inner = storage.join(uri, BUNDLE_FILE)
        if not storage.exists(inner):
            raise UserError(f"{uri!r} is a folder without {BUNDLE_FILE}; pass the model.pt that `ray-fer train` "
                            "wrote (training writes it when the run finishes)")
        return inner
    if not storage.exists(uri):
        raise UserError(f"model {uri!r} does not exist; pass the model.pt that `ray-fer train` wrote "
                        "(<run.storage_path>/<run.name>/model.pt), its run folder, an MLflow model URI "
                        "(runs:/<run id>/model, models:/<name>/<version>), or a packaged model: "
                        + ", ".join(PACKAGED_MODELS))
    return uri


def read_model_file(uri: str) -> bytes:
    """The bytes of a model file (local path or s3:// URI); ModelLoadError where it cannot be read."""
    try:
        return storage.read_bytes(uri)
    except (FileNotFoundError, OSError) as e:
        raise ModelLoadError(f"cannot read model file {uri!r}: {e}; check the path or URI") from None


def not_loadable(uri: str, reason: str) -> ModelLoadError:
    """The error for a file torch cannot load (checked here on the driver, and by model.py's load)."""
    return ModelLoadError(
        f"{uri!r} is not a loadable PyTorch weights file ({reason}); "
        "pass a model bundle written by `ray-fer train` or a state dict saved with torch.save"
    )


@dataclass(frozen=True)
class ModelRef:
    """A model bundle in the object store, and what the driver needs to know of it."""

    model_id: str  # model.model_id: names the model in every output row
    classes: tuple[str, ...]
    image_size: int
    decode_size: int
    bundle: Any  # ray.ObjectRef of the model.ModelBundle, or of its bytes: Predictor takes either as its model


@dataclass(frozen=True)
class ModelFile:
    """A model file read on the driver, checked as far as that needs no torch."""

    uri: str
    data: bytes

    @classmethod
    def read(cls, model: str) -> ModelFile:
        """Resolve --model (`resolve_model`) and read it. A file that is not a torch.save archive
        (a zip with a data.pkl, as torch has written since 1.6) fails here, before any cluster
        work; whether it is a ray-fer bundle is known once `pipeline.open_model` loads it."""
        uri = resolve_model(model)
        data = read_model_file(uri)
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                pickled = any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
        except zipfile.BadZipFile:
            raise not_loadable(uri, "not a zip archive, as torch.save writes") from None
        if not pickled:
            raise not_loadable(uri, "a zip archive without the data.pkl that torch.save writes")
        return cls(uri, data)


# What the driver needs of a bundle (`ModelRef` less the bundle), kept per bundle on the driver's
# disk: opening a bundle takes a Ray task that imports torch (~6 CPU-seconds, a few seconds before
# any labelling starts on a small machine), and the same bundle gives the same answers. An entry is
# named by the SHA-256 of the bundle's bytes and of model.py, whose code computes the answers.
CACHE_ENV = "RAY_FER_CACHE"  # the folder; default $XDG_CACHE_HOME/ray-fer or ~/.cache/ray-fer
INFO_KEYS = tuple(f.name for f in fields(ModelRef) if f.name != "bundle")


def cache_entry(data: bytes) -> Path:
    """The file that keeps what the driver needs of a bundle of these bytes (`remembered`, `remember`)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "ray-fer")
    code = (Path(__file__).with_name("model.py")).read_bytes()
    key = hashlib.sha256(hashlib.sha256(data).digest() + hashlib.sha256(code).digest()).hexdigest()
    return Path(root) / "models" / f"{key}.json"


def remembered(entry: Path) -> dict[str, Any] | None:
    """What `remember` kept in `entry`, or None (the bundle never opened here, or unreadable)."""
    try:
        info = json.loads(entry.read_text())
        out = {k: info[k] for k in INFO_KEYS}
        out["classes"] = tuple(out["classes"])
        return out
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(entry: Path, info: dict[str, Any]) -> None:
    """Keep `info` (INFO_KEYS) in `entry`; a cache that cannot be written is skipped."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=entry.parent, suffix=".tmp", delete=False) as f:
            json.dump({k: info[k] for k in INFO_KEYS}, f)
        os.replace(f.name, entry)  # whole or not at all, whatever runs at the same time
    except OSError:
        pass
