"""A training run's layout on storage (local folder or s3:// prefix), and reading it back.

    <run.storage_path>/<run.name>/
      config.yaml                       the resolved config of the latest start
      starts.jsonl                      one line per start: time, epochs done, changed settings, config
      checkpoint_<date>_<time>/state.pt  Ray Train checkpoints: model, optimizer, history, ...
      model.pt                          the best checkpoint exported as a model bundle
      curves.png, metrics.csv           per-epoch figures (written by `report`)
      checkpoint_manager_snapshot.json  Ray Train's own record; re-running the name resumes

Training writes this layout; evaluation, reports and prediction read it, through this module only.
Re-using a run name resumes the run; `plan_resume` decides first whether the new settings allow it.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from ray_fer.store import storage
from ray_fer.config import ConfigError, TrainJobConfig, UserError, flatten, to_yaml
from ray_fer.metrics import best_epoch_of, clean_history
from ray_fer.model_ref import BUNDLE_FILE  # the exported best model, in the run folder

if TYPE_CHECKING:
    import ray.train

    from ray_fer.model import ModelBundle

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"  # inside every Ray Train checkpoint directory
CONFIG_FILE = "config.yaml"  # the resolved config, in the run folder
STARTS_FILE = "starts.jsonl"  # the history of starts, in the run folder
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train names them checkpoint_<date>_<time>: name order is time order


def storage_root(cfg: TrainJobConfig) -> str:
    """run.storage_path as Ray Train takes it: an absolute local path or an s3:// prefix."""
    root = cfg.run.storage_path
    return root.rstrip("/") if storage.is_remote(root) else os.path.abspath(os.path.expanduser(root))


def run_dir(cfg: TrainJobConfig) -> str:
    return storage.join(storage_root(cfg), cfg.run.name)


def write_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Save a training state into a (local, temporary) checkpoint folder."""
    import torch  # here, not at the top: a labelling driver resolves --model through this module

    torch.save(state, Path(folder) / STATE_FILE)


def load_state(checkpoint: "ray.train.Checkpoint | str") -> dict[str, Any]:
    """The training state of a Ray Train checkpoint, or of a checkpoint folder given as a URI."""
    import torch

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


def best_state_and_history(run: str, export: str = "best") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The state of the run's best checkpoint (lowest val_loss; with `export` "last", its latest)
    and the history of its latest, read from storage: what Ray Train's result gives at the end of
    a run, without starting it. Ray keeps the best checkpoints by val_loss and the latest, so the
    best of them all is among those stored."""
    best: dict[str, Any] | None = None
    latest: dict[str, Any] | None = None
    for uri in checkpoints(run):  # one state in memory at a time, besides the two kept
        state = load_state(uri)
        if best is None or state["metrics"]["val_loss"] < best["metrics"]["val_loss"]:
            best = state
        if latest is None or state["epoch"] > latest["epoch"]:
            latest = state
    if best is None or latest is None:
        raise UserError(f"{run!r} holds no {CHECKPOINT_PREFIX}*/{STATE_FILE}; is it a run folder written by "
                        "`ray-fer train`?")
    return (latest if export == "last" else best), latest["history"]


def bundle_from_state(state: dict[str, Any], history: list[dict[str, Any]]) -> "ModelBundle":
    """A checkpoint's training state as a model bundle.

    The preprocessing and config are the checkpoint's own, the settings its weights were trained
    with: after a forced resume they can differ from the current config. A run that keeps a weight
    average (train.ema_decay) exports the average: its val metrics are the average's."""
    from ray_fer.model import ModelBundle

    data = state["config"]["data"]
    return ModelBundle(state_dict=state.get("ema", state["model"]), image_size=int(data["image_size"]),
                       decode_size=int(data["decode_size"]),
                       stem_stride=int(state["config"].get("model", {}).get("stem_stride", 2)),
                       config=state["config"], metrics=state["metrics"],
                       history=history, class_counts=state.get("class_counts"))


# --------------------------------------------------------------------------------------------
# Resuming a run: what may change, and the record of starts

# Settings that may change when a run resumes: how long it trains and how and where it runs
# (precision, memory format, compilation, workers, device, threads, restarts, checkpoints kept).
# run.num_workers changes the global batch, so the lr follows it by train.lr_scaling, as it
# would at a start; the optimiser's moments do not depend on it. Every other setting (data,
# preprocessing, model, optimiser, lr, schedule, augmentation, seed) shapes the weights: a
# change is refused unless run.resume=force.
RESUMABLE = frozenset({
    "train.epochs", "train.fail_at_epoch", "train.ema_decay", "train.amp", "train.channels_last", "train.compile",
    "run.num_workers", "run.use_gpu", "run.cpus_per_worker", "run.max_failures", "run.checkpoints_to_keep", "run.export",
    "run.shared_storage", "run.tracking", "run.experiment",
})
# Not settings of the run: its folder (the same by definition) and how this start treats it
_NOT_COMPARED = ("run.name", "run.storage_path", "run.resume")
_PATH_KEYS = ("data.train", "data.val", "model.weights")  # compared as paths: ./a and /abs/a are one folder
_PATH_LIST_KEYS = ("data.extra_train",)


@dataclass
class Resume:
    """A re-used run name: the run folder holds a checkpoint to continue from."""

    epochs_done: int  # the epoch of the latest checkpoint
    changes: dict[str, tuple[Any, Any]]  # dotted key -> (previous, new) for every setting that differs
    source: str  # the file the previous settings were read from


def plan_resume(cfg: TrainJobConfig) -> Resume | None:
    """Decide, before any Ray work, whether `cfg` may resume the run folder it names.

    None when the folder holds no checkpoint: a fresh start. Otherwise logs one line listing the
    changed settings (previous -> new) and returns what is resumed; raises ConfigError when
    train.epochs is below the epochs already trained, or when a setting outside RESUMABLE
    changed and run.resume is not `force`.
    """
    folder = run_dir(cfg)
    found = checkpoints(folder) if storage.is_dir(folder) else []
    if not found:
        return None
    latest = load_state(found[-1])
    previous, source = _previous_config(folder, latest["config"], found[-1])
    log.debug("run %s: comparing the config with the previous one in %s", cfg.run.name, source)
    resume = Resume(epochs_done=int(latest["epoch"]), changes=config_changes(previous, asdict(cfg)), source=source)
    _check_resume(cfg, resume, folder)
    return resume


def _previous_config(folder: str, checkpoint_config: dict[str, Any], checkpoint: str) -> tuple[dict[str, Any], str]:
    """The settings of the run's latest start: its config.yaml, else those of the latest checkpoint."""
    uri = storage.join(folder, CONFIG_FILE)
    if storage.exists(uri):
        try:
            loaded = yaml.safe_load(storage.read_bytes(uri))
        except yaml.YAMLError:
            loaded = None
        if isinstance(loaded, dict):
            return loaded, uri
        log.warning("%s is not a config written by ray-fer; comparing with the latest checkpoint's settings", uri)
    return checkpoint_config, storage.join(checkpoint, STATE_FILE)


def config_changes(previous: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every setting of `new` that differs from `previous`, as dotted key -> (previous, new).

    A key that `previous` lacks (written before the key existed) counts as its default; a key
    only `previous` has no longer means anything and is ignored."""
    before, after, defaults = flatten(previous), flatten(new), flatten(asdict(TrainJobConfig()))
    changes = {}
    for key, value in after.items():
        was = before.get(key, defaults.get(key))
        if key not in _NOT_COMPARED and not _same(key, was, value):
            changes[key] = (was, value)
    return changes


def _same(key: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if key in _PATH_KEYS and isinstance(a, str) and isinstance(b, str):
        return _normal_path(a) == _normal_path(b)
    if key in _PATH_LIST_KEYS and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_normal_path(x) == _normal_path(y) for x, y in zip(a, b))
    return False


def _normal_path(p: str) -> str:
    return p.rstrip("/") if storage.is_remote(p) else os.path.abspath(os.path.expanduser(p))


def _check_resume(cfg: TrainJobConfig, resume: Resume, folder: str) -> None:
    done, name = resume.epochs_done, cfg.run.name
    if cfg.train.epochs < done:
        raise ConfigError(f"train.epochs={cfg.train.epochs} is below the {done} epochs run {name!r} has trained "
                          f"already ({folder}); pass train.epochs={done} or more to resume it, or a new run.name")
    refused = {k: v for k, v in resume.changes.items() if k not in RESUMABLE}
    if refused and cfg.run.resume != "force":
        bundle = storage.join(folder, BUNDLE_FILE)
        weights = f" (add model.weights={bundle} to start from its best weights)" if storage.exists(bundle) else ""
        raise ConfigError(f"run {name!r} ({folder}) has trained {done} epoch(s) with other settings: "
                          f"{describe_changes(refused)}; pass a new run.name to train with them{weights}, "
                          "or --set run.resume=force to resume this run with them")
    if resume.changes:
        log.log(logging.WARNING if refused else logging.INFO, "run %s resumes after epoch %d with changed settings%s: %s",
                name, done, " (run.resume=force)" if refused else "", describe_changes(resume.changes))
    if cfg.train.epochs == done:
        log.info("run %s has trained all %d epochs already: nothing to train, its best checkpoint is exported "
                 "again without starting Ray (raise train.epochs to train more)", name, done)


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """The changes as one line: `train.lr 0.001 -> 0.01, data.image_size 48 -> 64`."""
    return ", ".join(f"{key} {_show(old)} -> {_show(new)}" for key, (old, new) in changes.items())


def _show(value: Any) -> str:
    """As --set takes it: null, true, false."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def record_start(cfg: TrainJobConfig, resume: Resume | None) -> None:
    """Write config.yaml (the resolved config of this start) and add this start to starts.jsonl.

    Called by starts that train; a start with nothing left to train only exports, and leaves
    the record as it was."""
    folder = run_dir(cfg)
    storage.write_bytes(storage.join(folder, CONFIG_FILE), to_yaml(cfg).encode())
    entry = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "after_epoch": resume.epochs_done if resume else 0,
        "changed": {k: [old, new] for k, (old, new) in resume.changes.items()} if resume else {},
        "config": asdict(cfg),
    }
    uri = storage.join(folder, STARTS_FILE)
    earlier = storage.read_bytes(uri) if storage.exists(uri) else b""  # object stores cannot append
    storage.write_bytes(uri, earlier + (json.dumps(entry) + "\n").encode())


def read_starts(run: str) -> list[dict[str, Any]]:
    """The run's starts, oldest first (see `record_start`); empty for runs from before the record."""
    uri = storage.join(run, STARTS_FILE)
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]


def report_run(run: str) -> dict[str, Any]:
    """`ray-fer report RUN`: write curves.png and metrics.csv into the run folder; returns a summary."""
    history, best, source = load_run_history(run)
    if not history:
        raise UserError(f"{source!r} holds no per-epoch metrics yet; wait for the first epoch to finish")
    if best is None:
        best = best_epoch_of(history)
    from ray_fer.report import write_training_report

    paths = write_training_report(run, history, best)
    rows = clean_history(history)
    best_row = next((r for r in rows if r["epoch"] == best), rows[-1])
    return {"run": run, "epochs": len(rows), "best_epoch": best,
            "best_val_acc": best_row.get("val_acc"), "best_val_loss": best_row.get("val_loss"), **paths}
