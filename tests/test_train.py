"""Training on a real local Ray instance with 2 CPU workers on a FER2013 subset.

One run is trained, then resumed and extended; another survives a real worker kill. Each run
reads the subset straight from ../shared/data/fer2013.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ray_fer.config import TrainJobConfig, load_config
from ray_fer.model import load_bundle
from ray_fer.runs import STATE_FILE
from ray_fer.train import lr_factor, run_training, scaled_lr

pytestmark = pytest.mark.integration


def _cfg(fer_root, storage, name, *extra):
    return load_config(TrainJobConfig, None, [
        f"data.train={fer_root / 'train'}", f"data.val={fer_root / 'val'}",
        "data.limit_per_class=30", "data.image_size=48", "train.batch_size=16", "train.augment=none",
        "train.lr=0.003", "train.scheduler=constant", "run.num_workers=2",
        f"run.storage_path={storage}", f"run.name={name}", *extra,
    ])


def _checkpoint_epochs(run_dir: Path) -> dict[int, float]:
    out = {}
    for d in run_dir.glob("checkpoint_*/"):
        state = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
        out[state["epoch"]] = state["metrics"]["val_loss"]
    return out


@pytest.fixture(scope="module")
def first_run(fer_root, ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cfg = _cfg(fer_root, storage, "subset", "train.epochs=5")
    return cfg, run_training(cfg)


def test_loss_falls_and_the_best_checkpoints_are_kept(first_run):
    cfg, summary = first_run
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    bundle, model_id = load_bundle(summary["model"])
    history = bundle.history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.1, history
    for h in history:
        assert 0 <= h["train_acc"] <= 1 and 0 <= h["val_acc"] <= 1 and h["train_images_per_s"] > 0

    # the summary and the bundle describe the epoch with the lowest val_loss
    best = min(history, key=lambda h: h["val_loss"])
    assert summary["best_epoch"] == best["epoch"] == bundle.metrics["epoch"]
    assert summary["best_val_loss"] == pytest.approx(best["val_loss"], abs=1e-6)
    assert summary["epochs"] == 5 and summary["model_id"] == model_id
    assert (bundle.image_size, bundle.decode_size) == (48, 48)
    assert bundle.config["run"]["name"] == "subset"

    # Ray keeps the 2 best by val_loss, plus the latest (needed to resume)
    kept = _checkpoint_epochs(run_dir)
    top2 = sorted(history, key=lambda h: h["val_loss"])[:2]
    assert set(kept) == {h["epoch"] for h in top2} | {5}
    # the exported weights are the best checkpoint's
    best_dir = next(d for d in run_dir.glob("checkpoint_*/")
                    if torch.load(d / STATE_FILE, weights_only=True)["epoch"] == best["epoch"])
    state = torch.load(best_dir / STATE_FILE, weights_only=True)
    assert all(torch.equal(state["model"][k], bundle.state_dict[k]) for k in state["model"])
    assert (run_dir / "config.yaml").read_text().count("name: subset") == 1
    # training curves and per-epoch metrics are written at the end
    assert summary["curves"] == str(run_dir / "curves.png") and (run_dir / "curves.png").stat().st_size > 10_000
    assert len((run_dir / "metrics.csv").read_text().strip().splitlines()) == 1 + 5


def test_rerunning_the_name_resumes_and_extends(first_run):
    cfg, summary = first_run
    first_history = load_bundle(summary["model"])[0].history
    more = _cfg(Path(cfg.data.train).parent, cfg.run.storage_path, cfg.run.name, "train.epochs=6")
    summary2 = run_training(more)
    history = load_bundle(summary2["model"])[0].history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[:5] == first_history  # epochs 1-5 were not run again
    assert summary2["epochs"] == 6


def test_a_killed_worker_is_restarted_and_the_run_completes(fer_root, ray_local, tmp_path):
    """A real SIGKILL of rank 0 during epoch 2, through the CLI; FailureConfig restarts the group."""
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.run(
        [sys.executable, "-m", "ray_fer.cli", "train",
         "--set", f"data.train={fer_root / 'train'}", "--set", f"data.val={fer_root / 'val'}",
         "--set", "data.limit_per_class=12", "--set", "data.image_size=48", "--set", "train.batch_size=16",
         "--set", "train.epochs=3", "--set", "train.fail_at_epoch=2", "--set", "run.max_failures=1",
         "--set", "run.num_workers=2", "--set", f"run.storage_path={tmp_path}", "--set", "run.name=crash"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # the JSON summary is the last line
    assert summary["epochs"] == 3 and summary["run"] == "crash"
    assert (tmp_path / "crash" / "fault-injected-epoch-2").exists()  # the kill really happened
    assert "resuming run crash after epoch 1" in proc.stdout + proc.stderr
    history = load_bundle(summary["model"])[0].history
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_bad_input_fails_before_any_ray_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ray_fer.cli", "train", "--set", f"data.train={tmp_path / 'nope'}",
         "--set", f"data.val={tmp_path / 'nope'}", "--set", f"run.storage_path={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ray-fer: error: image folder")
    assert "Started a local Ray instance" not in proc.stderr and not (tmp_path / "runs").exists()


def test_lr_rules():
    cfg = load_config(TrainJobConfig, None, ["data.train=a", "data.val=b", "train.batch_size=128",
                                             "train.epochs=10", "train.warmup_epochs=1"])
    assert scaled_lr(cfg, 2) == pytest.approx(0.001 * (256 / 32) ** 0.5)
    assert lr_factor(0, cfg) == pytest.approx(0.5)  # warm-up
    assert lr_factor(1, cfg) == pytest.approx(1.0)
    assert lr_factor(9, cfg) < lr_factor(5, cfg) < 1.0
