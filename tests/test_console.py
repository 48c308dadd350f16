"""What a user sees: `ray-fer train`, `infer` and `evaluate` run as commands print a short report
(ray-fer's lines, one progress display, the JSON summary last); `-v` brings Ray's own lines back."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ray_fer.console import Progress

REPO = Path(__file__).resolve().parents[1]
MOST_LINES = 15  # what a default run may print, stdout and stderr together
# `ray-fer ARGS`, then one more line: whether the command's own process imported torch
TORCH_PROBE = ("import sys; from ray_fer.cli import main; code = main(sys.argv[1:]); "
               "print('torch imported:', 'torch' in sys.modules); sys.exit(code)")


def _ray_fer(*args: str, cwd: Path, torch_probe: bool = False) -> list[str]:
    """Run `ray-fer ARGS` as a user would (a fresh process, a private local Ray instance); returns
    the lines it printed, stdout and stderr interleaved as on a terminal (with `torch_probe`, and
    then a last line saying whether the process imported torch)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = ["-c", TORCH_PROBE] if torch_probe else ["-m", "ray_fer.cli"]
    done = subprocess.run([sys.executable, *command, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300, env=env, cwd=cwd)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, "\n".join(lines[-60:])
    return lines


def _summary(lines: list[str]) -> dict:
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def trained(fer_root, tmp_path_factory) -> tuple[Path, list[str]]:
    work = tmp_path_factory.mktemp("console")
    lines = _ray_fer("train", "--set", f"data.train={fer_root / 'train'}", "--set", f"data.val={fer_root / 'val'}",
                     "--set", "data.limit_per_class=15", "--set", "data.image_size=48", "--set", "train.epochs=2",
                     "--set", f"run.storage_path={work / 'runs'}", cwd=work)
    return work, lines


@pytest.mark.integration
def test_train_prints_a_header_one_line_per_epoch_and_the_summary(trained):
    work, lines = trained
    text = "\n".join(lines)
    assert len(lines) <= MOST_LINES, text
    assert any(line.startswith("training run fer: 105 train and 105 val images, 1 worker(s) on CPU") for line in lines), text
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split()[1] for e in epochs] == ["1/2", "2/2"], text
    assert all("train loss" in e and "val loss" in e for e in epochs), epochs
    assert _summary(lines)["model"] == str(work / "runs" / "fer" / "model.pt")
    for noise in ("Running Dataset", "Checkpoint successfully created", "Started a local Ray instance",
                  "Reporting training result", "PreemptionWatcher", "Deprecat", "pid="):
        assert noise not in text, noise


@pytest.mark.integration
@pytest.mark.slow  # ~40 s, one more Ray instance; test_console's training run checks the quiet console in make test
def test_infer_prints_one_progress_display_and_worker_logs(trained, fer_root):
    work, _ = trained
    lines = _ray_fer("infer", "--model", str(work / "runs" / "fer" / "model.pt"),
                     "--input", str(fer_root / "val" / "disgust"), "--output", str(work / "labels"), cwd=work,
                     torch_probe=True)
    # the driver leaves torch (~500 MB) to the predictor actors: model_ref.py
    assert lines.pop() == "torch imported: False", "\n".join(lines)
    text = "\n".join(lines)
    assert len(lines) <= MOST_LINES, text
    progress = [line for line in lines if re.match(r"[\d,]+/[\d,]+ files \(", line)]  # with faces: videos too
    assert len(progress) == 1 and progress[0].startswith("56/56 files (100%)"), text
    assert any(line.startswith("predictor ready: model") for line in lines), text  # logged inside an actor
    assert _summary(lines)["images"] == 56
    assert "Running Dataset" not in text and "Execution plan" not in text


@pytest.mark.integration
@pytest.mark.slow  # one more private Ray instance; test_evaluate covers evaluation in the default run
def test_evaluate_prints_progress_and_the_summary(trained, fer_root):
    work, _ = trained
    lines = _ray_fer("evaluate", "--model", str(work / "runs" / "fer"), "--data", str(fer_root / "val"),
                     "--limit-per-class", "4", cwd=work)
    text = "\n".join(lines)
    assert len(lines) <= MOST_LINES, text
    assert any(line.startswith("28/28 images (100%)") for line in lines), text
    assert any(line.startswith("accuracy ") for line in lines), text
    assert _summary(lines)["images"] == 28


@pytest.mark.integration
@pytest.mark.slow  # one more private Ray instance; keeps the default run under 15 minutes
def test_verbose_brings_rays_own_lines_back(trained, fer_root):
    work, _ = trained
    lines = _ray_fer("infer", "-v", "--model", str(work / "runs" / "fer" / "model.pt"),
                     "--input", str(fer_root / "val" / "disgust"), "--output", str(work / "labels-v"), cwd=work)
    text = "\n".join(lines)
    assert "Started a local Ray instance" in text and "Execution plan of Dataset" in text, text
    assert "INFO ray_fer.label.infer: listed 56 files" in text  # ray-fer's lines with level and logger (counted once listed)
    assert _summary(lines)["images"] == 56


def test_progress_off_a_terminal_prints_a_line_now_and_then():
    out = io.StringIO()
    progress = Progress(100, stream=out, log_every=3600)
    progress.update(40)
    progress.update(30)  # a count never goes back
    progress.update(250)  # nor beyond the total (a retried task may report twice)
    assert out.getvalue() == ""  # within log_every: nothing yet
    progress.close()
    line, = out.getvalue().splitlines()
    assert line.startswith("100/100 images (100%), ") and line.endswith(" s"), line


def test_progress_shows_the_time_left():
    progress = Progress(1000, stream=io.StringIO())
    progress.started -= 10  # 10 s in, a quarter done: 30 s to go
    progress.update(250)
    assert progress.text().startswith("250/1,000 images (25%), 25/s, 30 s left"), progress.text()


def test_ray_datas_memory_advice_stays_in_its_log_file():
    """Ray Data's issue detectors print a dozen lines of `memory=...` advice every 30 s of a long
    job (about stages ray-fer sizes itself): the quiet console drops them, not Ray Data's other
    warnings nor the other detectors'. A fresh process, as a command's driver is."""
    probe = ("import logging, sys; from ray_fer import console; console.setup(verbose=False); import ray.data; "
             "console.quiet_ray_in_process(); "
             "detector = logging.getLogger('ray.data._internal.issue_detection.issue_detector_manager'); "
             "detector.warning(\"Operator 'MapBatches(decode_photos)' uses 645.4MiB of memory per\\nworker on "
             "average\"); detector.warning('a task has been running or stuck in scheduling for 600 s'); "
             "logging.getLogger('ray.data._internal.execution.streaming_executor').warning('a real Ray Data warning')")
    done = subprocess.run([sys.executable, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if k != "RAY_FER_VERBOSE"})
    assert done.returncode == 0, done.stdout
    assert "a real Ray Data warning" in done.stdout and "645.4MiB" not in done.stdout, done.stdout
    assert "stuck in scheduling" in done.stdout, done.stdout  # the other detectors still speak
