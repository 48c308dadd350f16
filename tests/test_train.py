"""Training on a real local Ray instance with 2 CPU workers on a FER2013 subset, and the
schedule and data checks it relies on.

One run is trained, then resumed and extended, refused with changed settings, resumed with them
when forced, and exported again; another survives a real worker kill. Each run reads the subset
straight from ../shared/data/fer2013.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ray_fer import cluster
from ray_fer.config import ConfigError, TrainJobConfig, load_config
from ray_fer.images import EvalPreset, TrainPreset
from ray_fer.model import load_bundle
from ray_fer.train.runs import STATE_FILE, read_starts
from ray_fer.train.loop import consistency_loss, lr_factor, scaled_lr, steps_per_epoch, train_one_epoch
from ray_fer.train.trainer import run_training

from conftest import _fer_pixels



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


@pytest.mark.integration
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
    assert [s["after_epoch"] for s in read_starts(str(run_dir))] == [0]
    # training curves and per-epoch metrics are written at the end
    assert summary["curves"] == str(run_dir / "curves.png") and (run_dir / "curves.png").stat().st_size > 10_000
    assert len((run_dir / "metrics.csv").read_text().strip().splitlines()) == 1 + 5


@pytest.mark.integration
def test_rerunning_the_name_resumes_and_extends(first_run, caplog):
    cfg, summary = first_run
    first_history = load_bundle(summary["model"])[0].history
    more = _cfg(Path(cfg.data.train).parent, cfg.run.storage_path, cfg.run.name, "train.epochs=6")
    with caplog.at_level(logging.INFO, logger="ray_fer"):
        summary2 = run_training(more)
    assert "run subset resumes after epoch 5 with changed settings: train.epochs 5 -> 6" in caplog.text
    history = load_bundle(summary2["model"])[0].history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[:5] == first_history  # epochs 1-5 were not run again
    assert summary2["epochs"] == 6


@pytest.mark.integration
def test_a_changed_setting_is_refused_before_any_ray_work(first_run, monkeypatch):
    cfg, _ = first_run
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    config_before = (run_dir / "config.yaml").read_text()
    monkeypatch.setattr(cluster, "connect", lambda: pytest.fail("Ray was reached"))
    changed = _cfg(Path(cfg.data.train).parent, cfg.run.storage_path, cfg.run.name, "train.epochs=6",
                   "train.lr=0.006", "train.augment=standard")
    with pytest.raises(ConfigError, match=r"has trained 6 epoch\(s\) with other settings: train.lr 0.003 -> 0.006, "
                                          r"train.augment none -> standard; pass a new run.name .*run.resume=force"):
        run_training(changed)
    assert (run_dir / "config.yaml").read_text() == config_before and len(read_starts(str(run_dir))) == 2


@pytest.mark.integration
def test_a_forced_resume_trains_on_with_the_new_settings(first_run):
    """The new settings include the face stage's crops as second views (train.consistency_view=face):
    computed before the workers start, and trained on by both of them."""
    cfg, _ = first_run
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    forced = _cfg(Path(cfg.data.train).parent, cfg.run.storage_path, cfg.run.name, "train.epochs=7",
                  "train.lr=0.006", "train.consistency=6", "train.consistency_view=face", "run.resume=force")
    summary = run_training(forced)  # the views are made before the 2 workers take both CPUs: no hang
    bundle = load_bundle(summary["model"])[0]
    # the new lr, not the one the optimizer state was saved with (2 workers x 16 = the reference batch)
    assert [h["lr"] for h in bundle.history] == pytest.approx([0.003] * 6 + [0.006])
    assert read_starts(str(run_dir))[-1]["changed"] == {
        "train.epochs": [6, 7], "train.lr": [0.003, 0.006], "train.consistency": [0.0, 6.0],
        "train.consistency_view": ["augment", "face"]}
    best_dir = next(d for d in run_dir.glob("checkpoint_*/")
                    if torch.load(d / STATE_FILE, weights_only=True)["epoch"] == summary["best_epoch"])
    assert bundle.config == torch.load(best_dir / STATE_FILE, weights_only=True)["config"]


@pytest.mark.integration
def test_a_finished_run_is_exported_again_with_the_same_model_id(first_run, caplog, monkeypatch):
    """The forced start's settings are now the run's own (no run.resume=force needed), and a safe
    change (run.max_failures) with no epoch left to train re-exports without starting Ray."""
    cfg, _ = first_run
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    before = load_bundle(str(run_dir / "model.pt"))
    (run_dir / "model.pt").unlink()
    monkeypatch.setattr(cluster, "connect", lambda: pytest.fail("Ray was reached"))
    same = _cfg(Path(cfg.data.train).parent, cfg.run.storage_path, cfg.run.name, "train.epochs=7",
                "train.lr=0.006", "train.consistency=6", "train.consistency_view=face", "run.max_failures=3")
    with caplog.at_level(logging.INFO, logger="ray_fer"):
        summary = run_training(same)
    assert "run subset has trained all 7 epochs already: nothing to train" in caplog.text
    after = load_bundle(summary["model"])
    assert summary["epochs"] == 7 and summary["model_id"] == after[1] == before[1]
    assert after[0].history == before[0].history and after[0].metrics == before[0].metrics


@pytest.mark.integration
@pytest.mark.slow  # ~80 s; resuming a run from its checkpoints is tested in make test (test_rerunning_the_name_resumes_and_extends)
def test_a_killed_worker_is_restarted_and_the_run_completes(fer_root, ray_local, tmp_path):
    """A real SIGKILL of rank 0 during epoch 2, through the CLI; FailureConfig restarts the group."""
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.run(
        [sys.executable, "-m", "ray_fer.cli", "train",
         "--set", f"data.train={fer_root / 'train'}", "--set", f"data.val={fer_root / 'val'}",
         "--set", "data.limit_per_class=12", "--set", "data.image_size=48", "--set", "train.batch_size=16",
         "--set", "train.epochs=3", "--set", "train.warmup_epochs=1",
         "--set", "train.fail_at_epoch=2", "--set", "run.max_failures=1",
         "--set", "train.ema_decay=0.5",
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
    # the schedule continued exactly after the restart: each epoch's last-step lr (84 images: 2 steps an epoch)
    cfg = load_config(TrainJobConfig, None, ["data.train=a", "data.val=b", "train.epochs=3", "train.warmup_epochs=1",
                                             "train.batch_size=16", "run.num_workers=2"])
    steps = steps_per_epoch(84, 84, cfg)
    assert steps == 2
    assert [h["lr"] for h in history] == pytest.approx([0.001 * lr_factor(e * steps - 1, steps, cfg) for e in (1, 2, 3)])

    # the weight average (train.ema_decay) came back with the restart: 3 epochs of 2 steps averaged, not the
    # 4 since it; it is what was scored as val_* and exported, beside the trained weights' own raw_val_*
    bundle = load_bundle(summary["model"])[0]
    states = [torch.load(d / STATE_FILE, weights_only=True) for d in (tmp_path / "crash").glob("checkpoint_*/")]
    assert max(s["ema_updates"] for s in states) == 3 * steps
    best = next(s for s in states if s["epoch"] == summary["best_epoch"])
    assert all(torch.equal(best["ema"][k], bundle.state_dict[k]) for k in best["ema"])
    assert any(not torch.equal(best["ema"][k], best["model"][k]) for k in best["model"] if best["model"][k].is_floating_point())
    assert all({"raw_val_loss", "raw_val_acc"} <= set(h) for h in history)
    assert any(h["raw_val_loss"] != pytest.approx(h["val_loss"], abs=1e-6) for h in history)


def test_bad_input_fails_before_any_ray_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ray_fer.cli", "train", "--set", f"data.train={tmp_path / 'nope'}",
         "--set", f"data.val={tmp_path / 'nope'}", "--set", f"run.storage_path={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ray-fer: error: image folder")
    assert "Started a local Ray instance" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_workers_a_local_instance_cannot_place_fail_at_once(fer_root, tmp_path):
    """Ray Train would retry placing 4 one-CPU workers on this 2-CPU machine every minute, for ever."""
    import time

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ray_fer.cli", "train", "--set", f"data.train={fer_root / 'train'}",
         "--set", f"data.val={fer_root / 'val'}", "--set", "data.limit_per_class=10", "--set", "train.batch_size=4",
         "--set", "run.num_workers=4", "--set", "run.cpus_per_worker=1", "--set", "run.use_gpu=false",
         "--set", f"run.storage_path={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert time.monotonic() - started < 60
    assert re.fullmatch(r"ray-fer: error: run.num_workers=4 workers with 1 CPU each need 4 CPUs, but this machine "
                        r"has [0-3]; lower run.num_workers or run.cpus_per_worker", proc.stderr.strip().splitlines()[-1])


def test_zero_step_epochs_fail_before_any_ray_work(fer_root, tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "connect", lambda: pytest.fail("Ray was reached"))
    cfg = _cfg(fer_root, tmp_path, "tiny", "data.limit_per_class=3", "train.batch_size=16")  # 21 images, 2 workers
    with pytest.raises(ConfigError, match=r"^train.batch_size=16 is larger than each worker's share of the training "
                                          r"data \(10 images: 21 over 2 worker\(s\)\), so an epoch would have no step; "
                                          r"lower train.batch_size or run.num_workers$"):
        run_training(cfg)
    assert not (tmp_path / "tiny").exists()


@pytest.mark.integration
def test_a_live_run_name_is_refused_at_once_and_a_dead_ones_lease_taken_over(fer_root, tmp_path, monkeypatch, caplog):
    """One writer per run folder: a second start of a live run is refused in one line naming the
    holder, before any Ray work; once the holder is dead, its lease is taken over."""
    import time

    from ray_fer.store.lease import LEASE_FILE, LEASE_TIMEOUT_ENV, Lease, LeaseError
    from ray_fer.train.runs import run_dir

    monkeypatch.setenv(LEASE_TIMEOUT_ENV, "0.6")
    monkeypatch.setattr(cluster, "connect", lambda: pytest.fail("Ray was reached"))
    cfg = _cfg(fer_root, tmp_path, "live", "data.limit_per_class=3", "train.batch_size=16")
    holder = Lease.acquire(run_dir(cfg), "run-live", what="run folder")  # as a running `ray-fer train` holds it
    started = time.monotonic()
    with pytest.raises(LeaseError) as e:
        run_training(cfg)
    assert time.monotonic() - started < 5
    assert re.fullmatch(rf"run folder '{run_dir(cfg)}' is in use by run run-live \(host .+, pid {os.getpid()}, started "
                        r".+\), last heartbeat \d+ s ago; wait for it to end or pick another run.name .+", str(e.value))
    holder.stop_heartbeat()  # the holder dies
    time.sleep(0.9)
    with caplog.at_level(logging.WARNING, logger="ray_fer.store.lease"):
        with pytest.raises(ConfigError, match="would have no step"):  # past the lease: the run's own checks
            run_training(cfg)
    assert "taking over the lease" in caplog.text and "run run-live" in caplog.text
    assert not (Path(run_dir(cfg)) / LEASE_FILE).exists()  # released on the way out


def test_steps_per_epoch_follow_the_equal_split_and_drop_last():
    def cfg(batch, workers):
        return load_config(TrainJobConfig, None, ["data.train=a", "data.val=b", f"train.batch_size={batch}",
                                                  f"run.num_workers={workers}"])

    assert steps_per_epoch(84, 84, cfg(16, 2)) == 2  # 42 rows each: 2 full batches
    assert steps_per_epoch(100, 3, cfg(10, 3)) == 3  # 33 rows each
    assert steps_per_epoch(64, 1, cfg(64, 1)) == 1
    with pytest.raises(ConfigError, match=r"train.batch_size=64 is larger .* \(40 images: 80 over 2 worker"):
        steps_per_epoch(80, 80, cfg(64, 2))
    with pytest.raises(ConfigError, match="data.val has 1 image\\(s\\) for 2 workers"):
        steps_per_epoch(80, 1, cfg(8, 2))


def test_lr_rules():
    cfg = load_config(TrainJobConfig, None, ["data.train=a", "data.val=b", "train.batch_size=128",
                                             "train.epochs=3", "train.warmup_epochs=1"])
    assert scaled_lr(cfg, 2) == pytest.approx(0.001 * (256 / 32) ** 0.5)
    factors = [lr_factor(step, 4, cfg) for step in range(12)]  # 4 steps an epoch, 3 epochs
    assert factors[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # per-step warm-up, then the cosine
    assert all(a > b for a, b in zip(factors[4:], factors[5:])) and factors[-1] == pytest.approx(0.02, abs=0.05)
    constant = load_config(TrainJobConfig, None, ["data.train=a", "data.val=b", "train.scheduler=constant",
                                                  "train.warmup_epochs=2"])
    assert [lr_factor(step, 2, constant) for step in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_train_one_epoch_sets_the_lr_of_every_step():
    """The first steps of a run with one warm-up epoch of 3 steps, as the worker loop drives them,
    split over two epochs: the lr rises per step, and the second epoch continues the sequence."""
    cfg = load_config(TrainJobConfig, None, ["data.train=a", "data.val=b", "train.epochs=2",
                                             "train.warmup_epochs=1"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 7))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, *_: seen.append(opt.param_groups[0]["lr"]))
    batches = [{"image": torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8), "label": torch.arange(4)}] * 3
    preset = EvalPreset(image_size=32, channels_last=False)
    for epoch in (1, 2):
        first = (epoch - 1) * 3
        sums = train_one_epoch(model, batches, preset, optimizer, device=torch.device("cpu"),
                               lr_at=lambda i: 0.1 * lr_factor(first + i, 3, cfg))
        assert sums["count"] == 12
    assert seen == pytest.approx([0.1 * f for f in (1 / 3, 2 / 3, 1.0)] + [0.1 * lr_factor(s, 3, cfg) for s in (3, 4, 5)])
    assert seen[3] == pytest.approx(0.1) and seen[3] > seen[4] > seen[5]


def test_logit_adjusted_loss_learns_the_classes_as_if_balanced():
    """On faces that say nothing of their class (all gray), plain cross-entropy learns the prior:
    its logits favour the frequent class. The logit-adjusted loss (tau 1) leaves the model's own
    logits near equal: the prior lives in the loss, not in the model."""
    from ray_fer.train.loop import logit_adjustment

    counts = [60, 5, 5, 20, 10, 0, 0]
    assert logit_adjustment(counts, 1.0).exp().sum().item() == pytest.approx(1.0, abs=0.02)  # an empty class as 1 row
    assert logit_adjustment(counts, 2.0) == pytest.approx(2 * logit_adjustment(counts, 1.0))
    labels = torch.tensor(sum(([c] * n for c, n in enumerate(counts)), []))
    gray = torch.full((len(labels), 48, 48), 128, dtype=torch.uint8)
    batches = [{"image": gray, "label": labels}] * 300
    preset = EvalPreset(image_size=32, channels_last=False)

    def trained_logits(bias) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 7))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.002)  # ~0.5 on the logits: the input's norm is ~15
        train_one_epoch(model, batches, preset, optimizer, device=torch.device("cpu"), logit_bias=bias)
        with torch.no_grad():
            return model(preset(gray[:1]))[0]

    plain = trained_logits(None).softmax(0)
    adjusted = trained_logits(logit_adjustment(counts, 1.0)).softmax(0)
    assert plain[0] > 0.5 and plain.argmax() == 0  # the prior: 60 of 100
    present = adjusted[:5]  # the classes with rows: near 1/5 each
    assert present.max() - present.min() < 0.05, adjusted


def test_consistency_loss_is_the_jensen_shannon_divergence():
    a = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    assert consistency_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    b = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    p, q = a.softmax(1), b.softmax(1)
    m = (p + q) / 2
    kl = lambda x, y: (x * (x / y).log()).sum(1)  # noqa: E731
    expected = (0.5 * (kl(p, m) + kl(q, m))).mean()
    assert consistency_loss(a, b).item() == pytest.approx(expected.item(), rel=1e-5)
    assert consistency_loss(a, b).item() == pytest.approx(consistency_loss(b, a).item())
    far = torch.tensor([[50.0, 0.0, 0.0]]), torch.tensor([[0.0, 50.0, 0.0]])
    assert consistency_loss(*far).item() == pytest.approx(math.log(2), rel=1e-4)  # its bound


def test_consistency_makes_the_two_views_agree(fer_root):
    """The same steps on 64 FER2013 faces with and without train.consistency: with it, the model's
    predictions on two augmentations of a face differ less, and the epoch's sums stay the
    cross-entropy's and the count of faces (not of views)."""
    faces, labels = _fer_pixels(fer_root, "val", per_class=10)
    order = torch.randperm(len(faces), generator=torch.Generator().manual_seed(0))[:64]
    faces, labels = faces[order], labels[order]
    preset = TrainPreset(image_size=32, channels_last=False, rotation=15.0, scale=0.2, translate=0.1)
    batches = [{"image": faces[i:i + 32], "label": labels[i:i + 32]} for i in (0, 32)] * 15

    def divergence(weight: float) -> tuple[float, dict]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 7))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.002)
        sums = train_one_epoch(model, batches, preset, optimizer, device=torch.device("cpu"), consistency=weight)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            views = [model(preset(faces, generator)) for _ in range(2)]
        return consistency_loss(*views).item(), sums

    plain, plain_sums = divergence(0.0)
    agreeing, sums = divergence(10.0)
    assert agreeing < 0.6 * plain, (agreeing, plain)  # measured: 0.034 against 0.068
    assert sums["count"] == plain_sums["count"] == 30 * 32
    # the cross-entropy, not the weighted sum (10 times the divergence would add 0.3-0.7):
    # measured 1.94 against 1.97 without the loss
    ce, plain_ce = sums["loss_sum"] / sums["count"], plain_sums["loss_sum"] / plain_sums["count"]
    assert 0 < ce < 10 and abs(ce - plain_ce) < 0.15, (ce, plain_ce)


@pytest.mark.integration
def test_photos_in_the_training_set_become_their_faces_crops(fer_root, wild_root, ray_local, tmp_path):
    """data.faces=auto: FER2013's 48-px crops stay whole; the wild-faces photos (350 px) become
    their largest face's aligned crop, as the face stage cuts faces when labelling; the extra
    folder is decoded once and seen data.extra_repeat times."""
    import numpy as np

    from ray_fer.label.datasets import decode_image
    from ray_fer.train.trainer import check_inputs, training_dataset

    cfg = _cfg(fer_root, tmp_path, "photos", "data.limit_per_class=4", f"data.extra_train=[{wild_root / 'train'}]",
               "data.extra_repeat=3", "data.faces=auto")
    train_table, extra_table, _ = check_inputs(cfg)
    assert extra_table.num_rows == 28  # 4 of each class, fear included
    rows = training_dataset(cfg, train_table, extra_table, cpus=2,
                            columns=("image", "label", "path", "photo", "face_found")).take_all()
    assert len(rows) == 28 + 3 * 28
    by_path: dict[str, list] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    assert all(len(v) == 3 for p, v in by_path.items() if "wild-faces" in p)
    fer = [v[0] for p, v in by_path.items() if "fer2013" in p]
    assert len(fer) == 28 and all(r["photo"] == False and r["face_found"] == False for r in fer)  # noqa: E712
    for r in fer:  # a crop is trained on as it is
        assert np.array_equal(r["image"], decode_image(Path(r["path"]).read_bytes(), 48)[0])
    wild = [v[0] for p, v in by_path.items() if "wild-faces" in p]
    found = [r for r in wild if r["face_found"]]
    assert len(found) >= 24, f"a face was found in {len(found)} of 28 wild faces"
    # each is the crop the face stage cuts from that photo, computed here without Ray: the photo
    # decoded for detection, its largest face found, aligned by its landmarks, cut from the gray copy
    from ray_fer.faces.detector import FaceDetector
    from ray_fer.faces.views import largest_face_crops
    from ray_fer.label.datasets import decode_photos

    paths = [r["path"] for r in found]
    [block] = list(decode_photos({"path": np.array(paths, dtype=object)}, decode_size=48, detect_size=640,
                                 faces="auto"))
    expected, here_found = largest_face_crops(block, FaceDetector("cpu"), 48)
    assert here_found.all()
    for r, want in zip(found, expected):
        assert r["image"].shape == (48, 48) and np.abs(r["image"].astype(float) - want).mean() < 2, r["path"]
