"""Labelling against a troubled store: the loopback S3 server behind a real HTTP proxy that answers
503 SlowDown or resets connections for chosen objects (conftest.FaultyS3Proxy)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path

from ray_fer.store import storage
from ray_fer.config import InferConfig, UserError
from ray_fer.label.infer import label_images
from ray_fer.labels import CLASSES

pytestmark = [pytest.mark.integration, pytest.mark.s3]
REPO = Path(__file__).resolve().parents[1]


def _upload_faces(fer_root: Path, bucket: str, per_class: int) -> list[str]:
    import boto3

    client = boto3.client("s3")
    keys = []
    for name in CLASSES:
        for i, src in enumerate(sorted((fer_root / "val" / name).glob("*.jpg"))[:per_class]):
            keys.append(f"in/{name}-{i}.jpg")
            client.put_object(Bucket=bucket, Key=keys[-1], Body=src.read_bytes())
    return keys


def _rows(dst: str) -> list[dict]:
    fs, path = storage.filesystem(dst)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["path", "label", "error"]).to_pylist()


def test_labelling_outlasts_a_store_that_fails_for_a_while(ray_local, fer_root, s3_bucket, s3_faults, random_bundle):
    keys = _upload_faces(fer_root, s3_bucket, per_class=4)
    troubled = keys[::5]
    s3_faults.fail(s3_bucket, troubled[::2], times=4, how="503")
    s3_faults.fail(s3_bucket, troubled[1::2], times=4, how="reset")
    summary = label_images(InferConfig(model=random_bundle, input=f"s3://{s3_bucket}/in",
                                       output=f"s3://{s3_bucket}/out", precision="fp32"))
    rows = _rows(f"s3://{s3_bucket}/out")
    assert sorted(r["path"] for r in rows) == sorted(f"s3://{s3_bucket}/{k}" for k in keys)  # each once
    assert all(r["error"] is None and r["label"] in CLASSES for r in rows)
    assert summary["errors"] == 0 and summary["images"] == len(keys)
    assert all(s3_faults.failed.get(f"/{s3_bucket}/{k}", 0) >= 4 for k in troubled)  # the faults happened


def test_a_read_or_input_error_in_a_ray_task_reaches_the_user_as_one_line(ray_local, tmp_path):
    """What `stop_on_read_errors` and the console's filter find in a real Ray task's error, raised
    by the package's own functions from the modules where they live now (moving a class to
    another module must not turn the one line back into a traceback; the slow test below runs
    the whole command against a failing store)."""
    from ray_fer.console import _DropReportedErrors
    from ray_fer.label.inputs import _check_manifest

    read = ray.remote(max_retries=0)(storage.read_with_retries)
    with pytest.raises(storage.ReadError) as error:
        with storage.stop_on_read_errors("Nothing was committed"):
            ray.get(read.remote(str(tmp_path), ()))  # a folder: not a missing file, so a ReadError
    assert re.fullmatch(rf"cannot read {re.escape(str(tmp_path))} after 1 attempts: .+\. Nothing was committed",
                        str(error.value)), str(error.value)
    manifest = tmp_path / "m.csv"
    manifest.write_text("file\na.jpg\n")
    with pytest.raises(UserError) as bad:  # the message alone, not Ray's RayTaskError(InputError)
        with storage.stop_on_read_errors("unused"):
            ray.get(ray.remote(max_retries=0)(_check_manifest).remote(str(tmp_path), str(manifest)))
    assert type(bad.value) is UserError, repr(bad.value)
    assert str(bad.value).startswith(f"manifest {str(manifest)!r} has no 'path' column (it has: file)"), str(bad.value)
    try:  # Ray Data's console copy of such an error is dropped; its other errors are kept
        ray.get(read.remote(str(tmp_path), ()))
    except Exception as e:  # noqa: BLE001 - the RayTaskError as Ray raises it
        copy = logging.LogRecord("ray.data", logging.ERROR, __file__, 1, "task failed", None, (type(e), e, None))
    other = logging.LogRecord("ray.data", logging.ERROR, __file__, 1, "task failed", None,
                              (ValueError, ValueError("boom"), None))
    assert not _DropReportedErrors().filter(copy) and _DropReportedErrors().filter(other)


@pytest.mark.slow  # ~45 s, a private Ray instance; the retries themselves run in the test above
def test_a_store_that_keeps_failing_stops_the_run_with_one_line(fer_root, s3_bucket, s3_faults, random_bundle):
    keys = _upload_faces(fer_root, s3_bucket, per_class=2)
    s3_faults.fail(s3_bucket, [keys[3]], times=-1, how="503")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {storage.RETRY_ENV: "0.05"}
    done = subprocess.run([sys.executable, "-m", "ray_fer.cli", "infer", "--model", random_bundle,
                           "--input", f"s3://{s3_bucket}/in", "--output", f"s3://{s3_bucket}/out"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ray-fer: error: cannot read s3://{s3_bucket}/{keys[3]} after 2 attempts: "), last
    assert last.endswith("Nothing was committed and the output is as it was: run again once the store answers")
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # ~65 s, a private Ray instance; make test-all runs it
def test_a_predictor_killed_mid_job_is_replaced_and_every_image_is_labelled_once(fer_root, random_bundle, tmp_path):
    """SIGKILL the predictor actor's process while `ray-fer infer` runs: Ray restarts the actor,
    the batches it held run again, and the output still has exactly one row per image."""
    import signal
    import threading
    import time

    import psutil

    out = tmp_path / "labels"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "ray_fer.cli", "infer", "--model", random_bundle,
                             "--input", str(fer_root / "val"), "--output", str(out), "--set", "batch_size=32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("predictor ready"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(180), "".join(lines)
        time.sleep(2)  # into the run: some batches done, some in the actor
        # Ray names an actor's process after its class, "ray::MapWorker(MapBatches(PredictorActor))"
        # (FacePredictorActor under the default --faces auto); only this command's own (its private Ray
        # instance's processes descend from it)
        actors = [p for p in psutil.Process(proc.pid).children(recursive=True)
                  if re.search(r"MapBatches\((Face)?PredictorActor\)", " ".join(p.cmdline()))]
        assert actors, "no predictor actor process found"
        for actor in actors:
            actor.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    table = pads.dataset(str(out), format="parquet").to_table(columns=["path", "error"])
    paths = table["path"].to_pylist()
    assert len(paths) == len(set(paths)) == 3589  # every val image, once
    assert table["error"].null_count == 3589


@pytest.mark.slow  # ~100 s: a private Ray instance for run A; make test-all runs it
def test_a_stopped_run_that_lost_its_output_commits_nothing(fer_root, random_bundle, tmp_path, ray_local, monkeypatch,
                                                            caplog):
    """From outside the process, as it happens on a real machine: `ray-fer infer` A labels FER2013
    train; a second run on the same output is refused at once (before Ray starts); A's driver is
    then frozen (SIGSTOP) past the lease timeout, run B takes the output over and commits its own
    rows; A is resumed (SIGCONT). A must exit non-zero with one line and change nothing: the
    output is B's."""
    import json
    import shutil
    import signal
    import threading
    import time

    out = tmp_path / "labels"
    small = tmp_path / "small"
    for name in CLASSES:
        (small / name).mkdir(parents=True)
        for src in sorted((fer_root / "val" / name).glob("*.jpg"))[:5]:
            shutil.copy(src, small / name / src.name)
    monkeypatch.setenv("RAY_FER_LEASE_TIMEOUT_S", "8")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    def infer(src: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "ray_fer.cli", "infer", "--model", random_bundle, "--input", str(src),
                "--output", str(out), "--faces", "whole", "--set", "batch_size=32", *extra]

    # A labels FER2013 train (28,709 faces, minutes here): only its driver is frozen below, and its
    # Ray workers go on meanwhile, so val's 3,589 could all be done by the time it wakes
    a = subprocess.Popen(infer(fer_root / "train"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, cwd=REPO)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in a.stdout:
            lines.append(line)
            if line.startswith("predictor ready"):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(180), "".join(lines)
        started = time.monotonic()
        c = subprocess.run(infer(small, "--skip-existing"), capture_output=True, text=True, env=env, cwd=REPO,
                           timeout=60)
        refused_in = time.monotonic() - started
        assert c.returncode == 2, c.stderr[-2000:]
        last = c.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"ray-fer: error: output '{out}' is in use by run \S+ \(host .+, pid {a.pid}, started .+"
                            r"\), last heartbeat \d+ s ago; wait for it to end or pick another --output .+", last), last
        assert "Started a local Ray instance" not in c.stderr and refused_in < 20, refused_in

        a.send_signal(signal.SIGSTOP)  # frozen, heartbeat and all
        time.sleep(9)  # past the lease timeout
        with caplog.at_level(logging.WARNING, logger="ray_fer.store.lease"):  # B: in this process, on the session's Ray
            label_images(InferConfig(input=str(small), output=str(out), model=random_bundle, faces="whole",
                                     overwrite=True, batch_size=32))
        assert "taking over the lease" in caplog.text
        a.send_signal(signal.SIGCONT)
        assert a.wait(timeout=300) != 0, "".join(lines[-40:])
    finally:
        if a.poll() is None:
            a.send_signal(signal.SIGCONT)
            a.kill()
        reader.join(timeout=10)
    assert re.fullmatch(r"ray-fer: error: run \S+ lost its lease on output .+ \(taken over by .+\), so it "
                        r"changes nothing more there: .+", lines[-1].strip()), "".join(lines[-20:])
    assert "images (100%)" not in "".join(lines)  # stopped as soon as it woke, not after labelling the rest
    success = json.loads((out / "_SUCCESS").read_text())
    top = sorted(p.name for p in out.iterdir() if not p.name.startswith("_"))
    assert top == sorted(success["files"]) and success["images"] == 35
    table = pads.dataset(str(out), format="parquet").to_table(columns=["path"])
    assert sorted(table["path"].to_pylist()) == sorted(str(p) for p in small.glob("*/*.jpg"))  # B's rows, each once
