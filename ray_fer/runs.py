"""A training run's layout on storage (local folder or s3:// prefix), and reading it back.

    <run.storage_path>/<run.name>/
      config.yaml                       the resolved config of the latest start
      checkpoint_<date>_<time>/state.pt  Ray Train checkpoints: model, optimizer, history, ...
      model.pt                          the best checkpoint exported as a model bundle
      curves.png, metrics.csv           per-epoch figures (written by `report`)
      checkpoint_manager_snapshot.json  Ray Train's own record; re-running the name resumes

Training writes this layout; evaluation, reports and prediction read it, through this module only.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ray_fer import storage
from ray_fer.config import TrainJobConfig, UserError

if TYPE_CHECKING:
    import ray.train

STATE_FILE = "state.pt"  # inside every Ray Train checkpoint directory
BUNDLE_FILE = "model.pt"  # the exported best model, in the run folder
CONFIG_FILE = "config.yaml"  # the resolved config, in the run folder
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train names them checkpoint_<date>_<time>: name order is time order


def storage_root(cfg: TrainJobConfig) -> str:
    """run.storage_path as Ray Train takes it: an absolute local path or an s3:// prefix."""
    root = cfg.run.storage_path
    return root.rstrip("/") if storage.is_remote(root) else os.path.abspath(os.path.expanduser(root))


def run_dir(cfg: TrainJobConfig) -> str:
    return storage.join(storage_root(cfg), cfg.run.name)


def write_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Save a training state into a (local, temporary) checkpoint folder."""
    torch.save(state, Path(folder) / STATE_FILE)


def load_state(checkpoint: "ray.train.Checkpoint | str") -> dict[str, Any]:
    """The training state of a Ray Train checkpoint, or of a checkpoint folder given as a URI."""
    if isinstance(checkpoint, str):
        data = storage.read_bytes(storage.join(checkpoint, STATE_FILE))
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def checkpoints(run: str) -> list[str]:
    """The run's checkpoint folders that hold a state, oldest first."""
    found = sorted(c for c, is_dir in storage.list_dir(run)
                   if is_dir and storage.basename(c).startswith(CHECKPOINT_PREFIX))
    return [c for c in found if storage.exists(storage.join(c, STATE_FILE))]


def load_run_history(run: str) -> tuple[list[dict[str, Any]], int | None, str]:
    """(history, best epoch or None, source) of a training run folder, local or s3://.

    Reads the exported model bundle when the run has finished, else the state of the latest
    checkpoint (a run still going, or one that stopped early); then the best epoch is None.
    """
    from ray_fer.model import load_bundle

    if not storage.is_dir(run):
        raise UserError(f"run folder {run!r} does not exist; pass <run.storage_path>/<run.name>, e.g. runs/fer")
    bundle_uri = storage.join(run, BUNDLE_FILE)
    if storage.exists(bundle_uri):
        bundle, _ = load_bundle(bundle_uri)
        return bundle.history, bundle.metrics.get("epoch"), bundle_uri
    found = checkpoints(run)
    if found:
        return load_state(found[-1]).get("history", []), None, storage.join(found[-1], STATE_FILE)
    raise UserError(f"{run!r} holds neither {BUNDLE_FILE} nor a {CHECKPOINT_PREFIX}*/{STATE_FILE}; "
                    "is it a run folder written by `ray-fer train`?")


def resolve_model(uri: str) -> str:
    """A model bundle's URI: the path itself, or <run folder>/model.pt when given a run folder."""
    if storage.is_dir(uri):
        inner = storage.join(uri, BUNDLE_FILE)
        if not storage.exists(inner):
            raise UserError(f"{uri!r} is a folder without {BUNDLE_FILE}; pass the model.pt that `ray-fer train` "
                            "wrote (training writes it when the run finishes)")
        return inner
    if not storage.exists(uri):
        raise UserError(f"model {uri!r} does not exist; pass the model.pt that `ray-fer train` wrote "
                        "(<run.storage_path>/<run.name>/model.pt) or its run folder")
    return uri
