"""infer.py: batch labelling end to end on a local Ray instance over FER2013 images, generated odd
files and a loopback S3 server, and the `infer` command."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ray_fer.store import storage
from ray_fer.cli import main
from ray_fer.config import InferConfig, UserError
from ray_fer.label.decode import decode_image
from ray_fer.label.infer import label_images
from ray_fer.labels import CLASSES, PROB_COLUMNS
from ray_fer.model import load_bundle
from ray_fer.store.lease import LEASE_FILE, LEASE_TIMEOUT_ENV
from ray_fer.store.output import STAGING_PREFIX, SUCCESS_FILE
from ray_fer.precision import autocast_dtype
from ray_fer.label.predictor import predict_probs
from test_decode import corrupt_jpeg, encode, halves, png_header_only

REPO = Path(__file__).resolve().parents[1]


def _direct_probs(uri: str, files: list[str], precision: str = "fp32") -> np.ndarray:
    """The same bundle called in this process on the same files, without Ray."""
    bundle, _ = load_bundle(uri)
    net = bundle.build_model()
    pixels = torch.from_numpy(np.stack([decode_image(Path(f).read_bytes(), bundle.decode_size)[0] for f in files]))
    dtype = autocast_dtype(precision, torch.device("cpu"))
    return predict_probs(net, bundle.eval_preset(channels_last=False), pixels, autocast_dtype=dtype).numpy()


# --------------------------------------------------------------------------------------------
# CLI


RAY_WORKER_LINE = re.compile(r"^(\x1b\[\d+m)?\([\w.()]+ pid=\d+(, ip=[\d.]+)?\)")


def _one_line_error(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    # leave out lines Ray forwards from the workers of an earlier test's run in this process
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not RAY_WORKER_LINE.match(line)]
    assert code == 2
    assert len(lines) == 1, "\n".join(lines)
    return lines[0]


def test_cli_errors_are_one_line(capsys, tmp_path, tiny_bundle):
    err = _one_line_error(capsys, ["infer", "--model", tiny_bundle, "--ouput", str(tmp_path / "o")])
    assert "unrecognized arguments: --ouput" in err and "did you mean --output?" in err
    # the hint comes from the subcommand's own options: train has no --output to suggest
    err = _one_line_error(capsys, ["train", "--ouput", str(tmp_path / "o")])
    assert "unrecognized arguments: --ouput" in err and "did you mean" not in err
    err = _one_line_error(capsys, ["train", "--overwrite"])  # no far-fetched --verbose either
    assert "unrecognized arguments: --overwrite" in err and "did you mean" not in err
    err = _one_line_error(capsys, ["infer", "--model", tiny_bundle, "--input", str(tmp_path / "missing"),
                                   "--output", str(tmp_path / "o")])
    assert f"input '{tmp_path}/missing' does not exist" in err
    err = _one_line_error(capsys, ["infer", "--model", str(tmp_path / "nope.pt"), "--input", str(tmp_path),
                                   "--output", str(tmp_path / "o")])
    assert "nope.pt" in err and "does not exist" in err and "packaged model: fer-photos, fer2013" in err
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    err = _one_line_error(capsys, ["infer", "--model", str(tmp_path / "junk.pt"), "--input", str(tmp_path),
                                   "--output", str(tmp_path / "o")])
    assert "junk.pt" in err and "not a loadable PyTorch weights file" in err
    err = _one_line_error(capsys, ["infer", "--model", tiny_bundle, "--input", str(tmp_path),
                                   "--output", str(tmp_path / "o"), "--set", "batchsize=3"])
    assert "unknown key batchsize; valid keys:" in err
    err = _one_line_error(capsys, ["infer", "--model", "", "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert "model is empty: pass --model fer-photos (the packaged model)" in err
    # without --model the packaged model is used: the next problem is the input's
    err = _one_line_error(capsys, ["infer", "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert "no images under" in err


# --------------------------------------------------------------------------------------------
# Real runs on a local Ray instance

BAD = {  # generated files that must become error rows, with a word of the expected reason
    "odd/corrupt.jpg": "cannot decode",
    "odd/truncated.jpg": "truncated",
    "odd/empty.jpg": "empty file",
    "odd/notes.jpg": "not an image",
    "odd/bomb.png": "decompression bomb",
}


def _odd_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Write the bad files above and some odd but good ones; returns the good ones' (width, height)."""
    (folder / "odd" / "deeper").mkdir(parents=True)
    face = encode(Image.effect_noise((64, 64), 64), "JPEG")
    (folder / "odd/corrupt.jpg").write_bytes(corrupt_jpeg())
    (folder / "odd/truncated.jpg").write_bytes(face[: len(face) // 2])
    (folder / "odd/empty.jpg").write_bytes(b"")
    (folder / "odd/notes.jpg").write_text("this is a text file renamed to .jpg\n")
    (folder / "odd/bomb.png").write_bytes(png_header_only(30_000, 30_000))
    (folder / "odd/readme.txt").write_text("not listed: not an image extension")
    rgba = Image.new("RGBA", (50, 40), (200, 10, 10, 128))
    (folder / "odd/rgba.png").write_bytes(encode(rgba, "PNG"))
    big = Image.radial_gradient("L").resize((4000, 3000)).convert("RGB")
    (folder / "odd/deeper/big.jpg").write_bytes(encode(big, "JPEG", quality=80))
    (folder / "odd/deeper/cmyk.jpg").write_bytes(encode(halves((60, 60), 0, 255, "RGB").convert("CMYK"), "JPEG"))
    exif = Image.Exif()
    exif[0x0112] = 6
    (folder / "odd/rotated.jpg").write_bytes(encode(halves((80, 40), 0, 255, "RGB"), "JPEG", exif=exif))
    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1)))
    (folder / "odd/gray16.png").write_bytes(encode(ramp, "PNG"))
    return {"odd/rgba.png": (50, 40), "odd/deeper/big.jpg": (4000, 3000), "odd/deeper/cmyk.jpg": (60, 60),
            "odd/rotated.jpg": (40, 80), "odd/gray16.png": (32, 32)}


def _fer_folder(fer_root: Path, folder: Path, per_class: int, start: int = 0) -> list[Path]:
    """Copy a few FER2013 val images per class into a temporary folder (never into the repo)."""
    copied = []
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for src in sorted((fer_root / "val" / name).glob("*.jpg"))[start:start + per_class]:
            copied.append(Path(shutil.copy(src, folder / name / src.name)))
    return copied


def _read_output(dst: str) -> pa.Table:
    fs, path = storage.filesystem(dst)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


@pytest.mark.integration
def test_fer_images_and_odd_files_one_row_each(ray_local, fer_root, random_bundle, tmp_path):
    folder = tmp_path / "images"
    faces = _fer_folder(fer_root, folder, per_class=40)
    good_sizes = _odd_files(folder)
    out = tmp_path / "labels"
    # whole: every file's own image is labelled (--faces auto would search the big gradient for faces)
    cfg = InferConfig(model=random_bundle, input=str(folder), output=str(out), precision="fp32",
                      decode_batch_size=64, faces="whole")
    summary = label_images(cfg)

    n_files = len(faces) + len(good_sizes) + len(BAD)
    assert (summary["images"], summary["errors"], summary["labelled"]) == (n_files, len(BAD), n_files - len(BAD))
    table = _read_output(str(out))
    assert table.num_rows == n_files
    rows = {Path(r["path"]).relative_to(folder).as_posix(): r for r in table.to_pylist()}
    assert len(rows) == n_files  # each file exactly once
    errors = {k: r["error"] for k, r in rows.items() if r["error"] is not None}
    assert set(errors) == set(BAD)
    for name, word in BAD.items():
        assert word in errors[name], (name, errors[name])
        assert rows[name]["label"] is None and rows[name]["width"] is None
    for name, size in good_sizes.items():
        assert (rows[name]["width"], rows[name]["height"]) == size and rows[name]["label"] in CLASSES

    good = table.filter(pa.compute.is_null(table["error"]))
    probs = np.stack([good[c].to_numpy() for c in PROB_COLUMNS], axis=1)
    assert probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(good["confidence"].to_numpy(), probs.max(axis=1))
    assert len(set(good["label"].to_pylist())) > 1  # a model that tells faces apart

    # the same bundle called directly in this process on the same files gives the same answers
    paths = good["path"].to_pylist()
    direct = _direct_probs(random_bundle, paths)
    assert good["label"].to_pylist() == [CLASSES[i] for i in direct.argmax(axis=1)]
    assert np.allclose(probs, direct, atol=1e-3)  # batch-norm folding changes the rounding only

    # the _SUCCESS file, written last, holds the counts, the model identity and the timing
    success = json.loads((out / SUCCESS_FILE).read_text())
    assert success["images"] == n_files and success["errors"] == len(BAD)
    assert success["model"] == load_bundle(random_bundle)[1] == summary["model"]
    assert set(table["model"].to_pylist()) == {summary["model"]}
    assert success["seconds"] > 0 and success["files"] and all(f.endswith(".parquet") for f in success["files"])
    # readable without further work: one schema, and pandas sees floats and nulls
    assert table.schema.field("width").type == pa.int32() and table.schema.field("label").type == pa.string()
    df = pq.read_table(out).to_pandas()
    assert len(df) == n_files and df["error"].notna().sum() == len(BAD)


@pytest.mark.integration
def test_a_state_dict_as_model_fails_with_one_line_before_any_labelling(ray_local, fer_root, random_bundle, tmp_path):
    # a torch.save archive passes the driver's own check (model_ref.ModelFile); the Ray task that
    # opens it finds it is not a bundle, and its error reaches the user as itself, not a RayTaskError
    state = tmp_path / "weights.pt"
    torch.save(load_bundle(random_bundle)[0].state_dict, state)
    inputs = tmp_path / "in"
    _fer_folder(fer_root, inputs, per_class=1)
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        label_images(InferConfig(model=str(state), input=str(inputs), output=str(out), faces="whole"))
    assert type(e.value).__name__ == "ModelLoadError"
    assert str(e.value).startswith(f"{str(state)!r} is not a ray-fer model bundle; pass the model.pt")
    assert not out.exists()  # checked before the output was touched


@pytest.mark.integration
def test_overwrite_refusal_and_skip_existing_resume(ray_local, fer_root, random_bundle, tiny_bundle, tmp_path):
    folder = tmp_path / "images"
    _fer_folder(fer_root, folder, per_class=4)
    (folder / "broken.jpg").write_bytes(b"")
    out = tmp_path / "labels"
    cfg = InferConfig(model=random_bundle, input=str(folder), output=str(out))
    first = label_images(cfg)
    assert (first["images"], first["errors"]) == (29, 1)

    with pytest.raises(UserError, match="is not empty .* pass --overwrite"):
        label_images(cfg)
    again = label_images(InferConfig(model=random_bundle, input=str(folder), output=str(out), overwrite=True))
    assert (again["images"], again["processed"]) == (29, 29)
    assert _read_output(str(out)).num_rows == 29  # replaced, not appended

    # a crashed job: more images arrived, _SUCCESS is gone and a write left half a file behind
    _fer_folder(fer_root, folder, per_class=2, start=4)
    (out / SUCCESS_FILE).unlink()
    (out / "crashed_000001.parquet").write_bytes(b"PAR1 half a file")
    resumed = label_images(InferConfig(model=random_bundle, input=str(folder), output=str(out), skip_existing=True))
    assert (resumed["processed"], resumed["skipped"], resumed["images"], resumed["errors"]) == (14, 29, 43, 1)
    table = _read_output(str(out))
    assert table.num_rows == 43 and len(set(table["path"].to_pylist())) == 43
    assert not (out / "crashed_000001.parquet").exists()
    assert json.loads((out / SUCCESS_FILE).read_text())["images"] == 43

    # nothing left to do: no cluster work, the same counts
    done = label_images(InferConfig(model=random_bundle, input=str(folder), output=str(out), skip_existing=True))
    assert (done["processed"], done["images"]) == (0, 43)
    # resuming with another model would mix two models in one table
    with pytest.raises(UserError, match="labelled by model .*pass the same --model"):
        label_images(InferConfig(model=tiny_bundle, input=str(folder), output=str(out), skip_existing=True))
    assert not (out / LEASE_FILE).exists() and not list(out.glob(STAGING_PREFIX + "*"))


@pytest.mark.integration
@pytest.mark.s3
@pytest.mark.slow  # ~55 s; labelling from S3 runs in make test in test_faults (a store that fails for a while)
def test_s3_round_trip_with_the_model_on_s3(ray_local, s3_bucket, fer_root, random_bundle, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    local = tmp_path / "images"
    faces = _fer_folder(fer_root, local, per_class=3)
    for path in faces:
        s3.upload_file(str(path), s3_bucket, f"in/{path.parent.name}/{path.name}")
    s3.put_object(Bucket=s3_bucket, Key="in/odd/notes.jpg", Body=b"not an image")
    s3.put_object(Bucket=s3_bucket, Key="in/odd/readme.md", Body=b"not listed")
    s3.upload_file(random_bundle, s3_bucket, "models/model.pt")

    dst = f"s3://{s3_bucket}/out/labels"
    summary = label_images(InferConfig(model=f"s3://{s3_bucket}/models/model.pt", input=f"s3://{s3_bucket}/in",
                                       output=dst))
    assert (summary["images"], summary["errors"]) == (len(faces) + 1, 1)
    assert summary["model"] == load_bundle(random_bundle)[1]
    table = _read_output(dst)
    assert table.num_rows == len(faces) + 1
    assert all(p.startswith(f"s3://{s3_bucket}/in/") for p in table["path"].to_pylist())
    marker = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/labels/_SUCCESS")["Body"].read())
    assert marker["images"] == len(faces) + 1
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in json.dumps(marker) and secret not in json.dumps(summary)

    with pytest.raises(UserError, match="is not empty"):
        label_images(InferConfig(model=random_bundle, input=f"s3://{s3_bucket}/in", output=dst))
    again = label_images(InferConfig(model=random_bundle, input=f"s3://{s3_bucket}/in", output=dst, overwrite=True))
    replaced = _read_output(dst)
    assert again["images"] == replaced.num_rows == len(set(replaced["path"].to_pylist())) == len(faces) + 1
    # no lease and no staging folder left (pyarrow's empty "folder/" marker objects aside)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="out/labels/")["Contents"]
            if not o["Key"].endswith("/")]
    names = sorted(k.rsplit("/", 1)[1] for k in keys if k.endswith(".parquet"))
    assert sorted(keys) == sorted([f"out/labels/{n}" for n in names] + ["out/labels/_SUCCESS"]), keys
    marker2 = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/labels/_SUCCESS")["Body"].read())
    assert marker2["run_id"] != marker["run_id"] and marker2["files"] == names
    with pytest.raises(UserError, match=f"no images under 's3://{s3_bucket}/nothing'"):
        label_images(InferConfig(model=random_bundle, input=f"s3://{s3_bucket}/nothing", output=dst + "2"))
    with pytest.raises(UserError, match="input bucket s3://no-such-bucket-here does not exist"):
        label_images(InferConfig(model=random_bundle, input="s3://no-such-bucket-here/in", output=str(tmp_path / "o")))


@pytest.mark.integration
@pytest.mark.slow  # ~35 s; relabelling read errors is also tested on the output protocol alone (test_output)
def test_skip_existing_labels_read_errors_again(ray_local, fer_root, random_bundle, tmp_path):
    """A read error says nothing about the image: --skip-existing labels it again, one row per path.
    A content error (an empty file) is the file's answer and stays."""
    folder = tmp_path / "images"
    faces = _fer_folder(fer_root, folder, per_class=2)
    late, empty = folder / "late.jpg", folder / "empty.jpg"  # late: listed before it is there
    empty.write_bytes(b"")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"{p}\n" for p in [*faces, late, empty]))
    out = tmp_path / "labels"
    first = label_images(InferConfig(model=random_bundle, input=str(manifest), output=str(out)))
    assert (first["images"], first["errors"]) == (len(faces) + 2, 2)
    rows = {r["path"]: r for r in _read_output(str(out)).to_pylist()}
    assert rows[str(late)]["error"].startswith("cannot read file")

    shutil.copy(faces[0], late)
    again = label_images(InferConfig(model=random_bundle, input=str(manifest), output=str(out), skip_existing=True))
    assert (again["processed"], again["skipped"], again["images"], again["errors"]) == (1, len(faces) + 1,
                                                                                       len(faces) + 2, 1)
    table = _read_output(str(out))
    rows = {r["path"]: r for r in table.to_pylist()}
    assert table.num_rows == len(rows) == len(faces) + 2  # the old error row is gone
    assert rows[str(late)]["error"] is None and rows[str(late)]["label"] in CLASSES
    assert rows[str(empty)]["error"] == "empty file"


@pytest.mark.integration
@pytest.mark.slow
def test_list_once_then_label_and_top_up_from_the_manifest(ray_local, fer_root, random_bundle, tmp_path):
    """`ray-fer list` writes a manifest folder; labelling reads it; after the store grows, a new
    listing and --skip-existing label only the new files (the anti-join), and one more run adds
    no rows."""
    from ray_fer.label.inputs import write_manifest

    folder = tmp_path / "images"
    faces = _fer_folder(fer_root, folder, per_class=3)
    manifest, out = str(tmp_path / "manifest"), str(tmp_path / "labels")
    assert write_manifest(str(folder), manifest)["images"] == len(faces)
    first = label_images(InferConfig(model=random_bundle, input=manifest, output=out, faces="whole"))
    assert (first["images"], first["processed"]) == (len(faces), len(faces))
    more = _fer_folder(fer_root, folder, per_class=2, start=3)
    write_manifest(str(folder), manifest, overwrite=True)
    cfg = InferConfig(model=random_bundle, input=manifest, output=out, faces="whole", skip_existing=True)
    topped = label_images(cfg)
    assert (topped["processed"], topped["skipped"], topped["images"]) == (len(more), len(faces), len(faces) + len(more))
    again = label_images(cfg)
    assert (again["processed"], again["images"]) == (0, len(faces) + len(more))
    table = _read_output(out)
    assert sorted(table["path"].to_pylist()) == sorted(str(p) for p in faces + more)  # each exactly once


def _children(pid: int) -> list:
    import ray  # noqa: F401 - puts Ray's bundled psutil on sys.path
    import psutil

    return psutil.Process(pid).children(recursive=True)


@pytest.mark.integration
@pytest.mark.slow  # ~60 s; the commit's crash safety is covered step by step in test_lease and test_output
def test_a_killed_run_leaves_the_output_whole_and_skip_existing_finishes(
        ray_local, fer_root, random_bundle, tmp_path, monkeypatch, caplog):
    """`ray-fer infer --overwrite` killed with SIGKILL mid-job: the previous output and its
    _SUCCESS stay; a second run is refused while the first lives; once the dead run's lease is
    stale, --skip-existing labels every image exactly once."""
    folder = tmp_path / "images"
    _fer_folder(fer_root, folder, per_class=10)
    out = tmp_path / "labels"
    label_images(InferConfig(model=random_bundle, input=str(folder), output=str(out)))
    before, success = _read_output(str(out)).sort_by("path"), (out / SUCCESS_FILE).read_bytes()
    _fer_folder(fer_root, folder, per_class=40, start=10)
    every = sorted(str(p) for p in folder.rglob("*.jpg"))
    assert len(every) == 350

    cmd = [sys.executable, "-m", "ray_fer.cli", "infer", "--model", random_bundle, "--input", str(folder),
           "--output", str(out), "--overwrite", "--set", "batch_size=8", "--set", "precision=fp32"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    ray_processes: list = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not (out / LEASE_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (out / LEASE_FILE).exists(), "".join(lines)[-3000:]
        other = json.loads((out / LEASE_FILE).read_text())
        with pytest.raises(UserError, match=f"is in use by run {other['run_id']} .*pid {proc.pid}"):
            label_images(InferConfig(model=random_bundle, input=str(folder), output=str(out), skip_existing=True))
        # kill it once its predictors label, its first Parquet file is there, or a few seconds on
        deadline = time.monotonic() + 5
        while (not any("predictor ready" in line for line in lines) and not list(out.glob("_staging-*/new/*"))
               and proc.poll() is None and time.monotonic() < deadline):
            time.sleep(0.05)
        ray_processes = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:  # its private Ray instance outlives a killed driver: stop what this test started
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in ray_processes:
            try:
                child.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]

    # the killed --overwrite run changed nothing that readers see
    assert _read_output(str(out)).sort_by("path").equals(before)
    assert (out / SUCCESS_FILE).read_bytes() == success
    assert (out / LEASE_FILE).exists()

    # its lease goes stale (the timeout lowered for the test) and the next run takes over
    monkeypatch.setenv(LEASE_TIMEOUT_ENV, "2")
    heartbeat = datetime.fromisoformat(json.loads((out / LEASE_FILE).read_text())["heartbeat"])
    time.sleep(max(0.0, 2.2 - (datetime.now(timezone.utc) - heartbeat).total_seconds()))
    with caplog.at_level(logging.WARNING, logger="ray_fer.store.output"):
        resumed = label_images(InferConfig(model=random_bundle, input=str(folder), output=str(out),
                                           skip_existing=True))
    assert f"taking over the lease on {out} from run {other['run_id']}" in caplog.text
    assert (resumed["skipped"], resumed["processed"], resumed["images"]) == (70, 280, 350)
    table = _read_output(str(out))
    assert table.num_rows == 350 and sorted(table["path"].to_pylist()) == every  # each exactly once
    assert json.loads((out / SUCCESS_FILE).read_text())["images"] == 350
    assert not (out / LEASE_FILE).exists() and not list(out.glob(STAGING_PREFIX + "*"))


@pytest.mark.integration
@pytest.mark.slow  # a private Ray instance of its own; test_console's infer run covers the same in the default run
def test_cli_as_a_user_runs_it(fer_root, random_bundle, tmp_path):
    """`ray-fer infer` in its own process (its own Ray): the last stdout line is the JSON summary."""
    folder = tmp_path / "images"
    faces = _fer_folder(fer_root, folder, per_class=2)
    out = tmp_path / "labels"
    cmd = [sys.executable, "-m", "ray_fer.cli", "infer", "--model", random_bundle, "--input", str(folder),
           "--output", str(out), "--set", "batch_size=8"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["images"] == len(faces) and summary["output"] == str(out)
    assert {"images", "labelled", "errors", "output", "seconds", "images_per_s", "model"} <= set(summary)


@pytest.mark.integration
def test_a_bundle_opened_before_is_opened_by_the_actors_with_the_same_labels(ray_local, fer_root, random_bundle,
                                                                             tmp_path, monkeypatch):
    """The first run of a bundle opens it in a Ray task and keeps what the driver needs on disk; a
    second run of the same bytes hands the actors the bytes (no task) and labels exactly alike."""
    import ray

    from ray_fer.label.pipeline import open_model
    from ray_fer.model import ModelBundle
    from ray_fer.model_ref import CACHE_ENV, ModelFile

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    file = ModelFile.read(random_bundle)
    opened = open_model(file)
    assert isinstance(ray.get(opened.bundle), ModelBundle)  # by the task
    assert len(list((tmp_path / "cache" / "models").glob("*.json"))) == 1
    again = open_model(file)
    assert ray.get(again.bundle) == file.data  # the bytes, for the actors to open
    about = ("model_id", "classes", "image_size", "decode_size")
    assert [getattr(again, k) for k in about] == [getattr(opened, k) for k in about]

    folder = tmp_path / "images"
    _fer_folder(fer_root, folder, per_class=2)
    runs = []
    for name in ("first", "second"):  # the first run's bundle is opened as above: by the task once more
        monkeypatch.setenv(CACHE_ENV, str(tmp_path / ("fresh" if name == "first" else "cache")))
        label_images(InferConfig(model=random_bundle, input=str(folder), output=str(tmp_path / name), faces="whole"))
        runs.append(_read_output(str(tmp_path / name)).sort_by("path"))
    assert runs[0].num_rows == 14 and runs[0].equals(runs[1])
