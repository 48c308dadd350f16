"""store/output.py: the output protocol without Ray: refusals, the lease, staging and commit, recovery
after a crash, --skip-existing's choice of rows, on a local folder and on the loopback S3 server.

The rows here are written with pyarrow, as Ray Data's write would write them into the staging
folder; test_infer.py runs the same protocol through real labelling runs."""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from ray_fer.store import storage
from ray_fer.labels import CLASSES
from ray_fer.store.lease import LEASE_TIMEOUT_ENV, LeaseError
from ray_fer.schema import VIDEO_COLUMNS, FACE_COLUMNS, output_schema
from ray_fer.store.output import SUCCESS_FILE, OutputError, OutputRun

from conftest import _lease_timeout, _one_line, _past_lease_timeout

SCHEMA = output_schema(CLASSES)


def _rows(paths: list[str], errors: list[str | None] | None = None, model: str = "m") -> pa.Table:
    errors = errors or [None] * len(paths)
    columns = {f.name: pa.nulls(len(paths), f.type) for f in SCHEMA}
    columns.update(path=pa.array(paths, pa.string()), error=pa.array(errors, pa.string()),
                   label=pa.array([None if e else "happy" for e in errors], pa.string()),
                   model=pa.array([model] * len(paths), pa.string()))
    return pa.table(columns, schema=SCHEMA)


def _write(uri: str, table: pa.Table) -> None:
    fs, path = storage.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def _read(dst: str) -> pa.Table:
    """What a reader sees: the top-level Parquet files as one data set ("_" names skipped)."""
    fs, path = storage.filesystem(dst)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def _names(dst: str) -> list[str]:
    return [storage.basename(uri) for uri, _ in storage.list_dir(dst)]


def _old_output(dst: str) -> bytes:
    """A finished output of two files and its _SUCCESS; returns the _SUCCESS bytes."""
    _write(storage.join(dst, "old-a.parquet"), _rows(["/a.jpg", "/b.jpg"]))
    _write(storage.join(dst, "old-b.parquet"), _rows(["/c.jpg"]))
    storage.write_bytes(storage.join(dst, SUCCESS_FILE), b'{"images": 3}')
    return b'{"images": 3}'


def _stage(run: OutputRun, paths: list[str]) -> None:
    """What the labelling writes: the run's rows in its staging folder."""
    _write(storage.join(run.new_dir, "x_000000.parquet"), _rows(paths))


# --------------------------------------------------------------------------------------------
# Refusals, made before any cluster work


def test_output_checks(tmp_path):
    with OutputRun(str(tmp_path / "new"), overwrite=False, skip_existing=False, model_id="m") as run:
        assert run.done_count == 0
    assert not (tmp_path / "new").exists()  # the lease is gone again, and the folder made for it
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"path": ["/a.jpg"], "model": ["m"]}), out / "part.parquet")
    with pytest.raises(OutputError, match="is not empty \\(1 files\\); pass --overwrite .* --skip-existing"):
        OutputRun(str(out), overwrite=False, skip_existing=False, model_id="m").__enter__()
    with pytest.raises(OutputError, match="labelled by model m, not other; pass the same --model"):
        OutputRun(str(out), overwrite=False, skip_existing=True, model_id="other").__enter__()
    with OutputRun(str(out), overwrite=False, skip_existing=True, model_id="m") as run:
        assert run.done_paths() == ["/a.jpg"]
    (out / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match="holds files ray-fer did not write .*notes.md"):
        OutputRun(str(out), overwrite=True, skip_existing=False, model_id="m").__enter__()
    assert sorted(_names(str(out))) == ["notes.md", "part.parquet"]  # nothing deleted, no lease left
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        OutputRun(str(tmp_path / "file"), overwrite=False, skip_existing=False, model_id="m").__enter__()


# --------------------------------------------------------------------------------------------
# --overwrite: the old output stays whole until the new one is complete


def test_overwrite_replaces_the_output_only_at_the_commit(dst):
    success = _old_output(dst)
    with OutputRun(dst, overwrite=True, skip_existing=False, model_id="m") as run:
        _stage(run, ["/x.jpg", "/y.jpg"])
        # while the run labels, readers see the previous output, finished
        assert sorted(_read(dst)["path"].to_pylist()) == ["/a.jpg", "/b.jpg", "/c.jpg"]
        assert storage.read_bytes(storage.join(dst, SUCCESS_FILE)) == success
        counts = run.check(pa.array(["/x.jpg", "/y.jpg"]))
        assert (counts["images"], counts["errors"], counts["files"]) == (2, 0, ["x_000000.parquet"])
        run.commit({"images": 2})
    assert sorted(_read(dst)["path"].to_pylist()) == ["/x.jpg", "/y.jpg"]
    marker = json.loads(storage.read_bytes(storage.join(dst, SUCCESS_FILE)))
    assert marker == {"images": 2, "run_id": run.run_id, "files": ["x_000000.parquet"]}
    assert sorted(_names(dst)) == [SUCCESS_FILE, "x_000000.parquet"]  # no lease, no staging folder


def test_a_failed_overwrite_leaves_the_previous_output(dst):
    success = _old_output(dst)
    with pytest.raises(RuntimeError, match="the cluster went away"):
        with OutputRun(dst, overwrite=True, skip_existing=False, model_id="m") as run:
            _stage(run, ["/x.jpg"])
            raise RuntimeError("the cluster went away")
    assert sorted(_read(dst)["path"].to_pylist()) == ["/a.jpg", "/b.jpg", "/c.jpg"]
    assert storage.read_bytes(storage.join(dst, SUCCESS_FILE)) == success
    assert sorted(_names(dst)) == [SUCCESS_FILE, "old-a.parquet", "old-b.parquet"]


def test_rows_that_do_not_match_are_not_committed(dst):
    success = _old_output(dst)
    with pytest.raises(OutputError) as e:
        with OutputRun(dst, overwrite=True, skip_existing=False, model_id="m") as run:
            _stage(run, ["/x.jpg", "/x.jpg", "/y.jpg"])  # one path twice: what two writers would leave
            run.check(pa.array(["/x.jpg", "/y.jpg"]))
    assert "wrote 3 rows for 2 distinct paths" in _one_line(e) and "nothing was committed" in str(e.value)
    assert storage.read_bytes(storage.join(dst, SUCCESS_FILE)) == success
    assert sorted(_names(dst)) == [SUCCESS_FILE, "old-a.parquet", "old-b.parquet"]


# --------------------------------------------------------------------------------------------
# One run at a time (the lease itself: test_lease.py)


def test_a_run_that_holds_the_output_refuses_another(tmp_path):
    dst = str(tmp_path / "out")
    with OutputRun(dst, overwrite=False, skip_existing=False, model_id="m") as run:
        with pytest.raises(LeaseError) as e:
            OutputRun(dst, overwrite=False, skip_existing=True, model_id="m").__enter__()
        assert f"is in use by run {run.run_id}" in _one_line(e)
        _stage(run, ["/x.jpg"])
        run.check(pa.array(["/x.jpg"]))
        run.commit({"images": 1})
    assert _read(dst)["path"].to_pylist() == ["/x.jpg"]


# --------------------------------------------------------------------------------------------
# After a crash: the next run finishes a begun commit or deletes what never reached one


def _die(run: OutputRun) -> None:
    """What SIGKILL leaves: the run's files and its lease, no heartbeat any more."""
    run.lease.stop_heartbeat()


def test_a_crash_during_the_commit_is_rolled_forward(dst, monkeypatch, caplog):
    monkeypatch.setenv(LEASE_TIMEOUT_ENV, str(_lease_timeout(dst)))
    _old_output(dst)
    run = OutputRun(dst, overwrite=True, skip_existing=False, model_id="m").__enter__()
    _stage(run, ["/x.jpg", "/y.jpg"])
    run.check(pa.array(["/x.jpg", "/y.jpg"]))
    run.begin_commit({"images": 2})  # the commit point ...
    storage.delete_file(storage.join(dst, SUCCESS_FILE))  # ... and the first steps of applying it
    storage.delete_file(storage.join(dst, "old-a.parquet"))
    _die(run)
    assert run.lease.pending["run_id"] == run.run_id and SUCCESS_FILE not in _names(dst)
    time.sleep(_past_lease_timeout(dst))  # S3's dates have a resolution of one second

    with caplog.at_level(logging.WARNING, logger="ray_fer.store.output"):
        with OutputRun(dst, overwrite=False, skip_existing=True, model_id="m") as nxt:
            assert sorted(nxt.done_paths()) == ["/x.jpg", "/y.jpg"]  # the dead run's rows, committed
            nxt.check(pa.array([], pa.string()))
            nxt.commit({"images": 2})
    assert f"finishing the commit of run {run.run_id}" in caplog.text
    assert sorted(_read(dst)["path"].to_pylist()) == ["/x.jpg", "/y.jpg"]
    assert sorted(_names(dst)) == [SUCCESS_FILE, "x_000000.parquet"]


def test_a_crash_before_the_commit_is_rolled_back(dst, monkeypatch, caplog):
    monkeypatch.setenv(LEASE_TIMEOUT_ENV, str(_lease_timeout(dst)))
    success = _old_output(dst)
    run = OutputRun(dst, overwrite=True, skip_existing=False, model_id="m").__enter__()
    _stage(run, ["/x.jpg"])
    _die(run)
    time.sleep(_past_lease_timeout(dst))  # S3's dates have a resolution of one second
    assert storage.read_bytes(storage.join(dst, SUCCESS_FILE)) == success  # never committed: nothing changed
    with caplog.at_level(logging.WARNING, logger="ray_fer.store.output"):
        with OutputRun(dst, overwrite=True, skip_existing=False, model_id="m") as nxt:
            assert not storage.exists(run.staging)
            _stage(nxt, ["/y.jpg"])
            nxt.check(pa.array(["/y.jpg"]))
            nxt.commit({"images": 1})
    assert "deleting" in caplog.text and run.staging in caplog.text
    assert _read(dst)["path"].to_pylist() == ["/y.jpg"]


def test_skip_existing_keeps_the_rows_a_dead_run_had_staged(dst, monkeypatch, caplog):
    """A job killed before its commit: the next --skip-existing run labels only what is left."""
    monkeypatch.setenv(LEASE_TIMEOUT_ENV, str(_lease_timeout(dst)))
    success = _old_output(dst)  # /a.jpg, /b.jpg, /c.jpg
    run = OutputRun(dst, overwrite=False, skip_existing=True, model_id="m").__enter__()
    _stage(run, ["/x.jpg", "/y.jpg", "/a.jpg"])  # /a.jpg twice: the old row wins
    _die(run)
    time.sleep(_past_lease_timeout(dst))  # S3's dates have a resolution of one second
    assert storage.read_bytes(storage.join(dst, SUCCESS_FILE)) == success
    with caplog.at_level(logging.WARNING, logger="ray_fer.store.output"):
        with OutputRun(dst, overwrite=False, skip_existing=True, model_id="m") as nxt:
            assert sorted(nxt.done_paths()) == ["/a.jpg", "/b.jpg", "/c.jpg", "/x.jpg", "/y.jpg"]
            _stage(nxt, ["/z.jpg"])
            counts = nxt.check(pa.array(["/z.jpg"]))
            nxt.commit({"images": counts["images"]})
    assert f"keeping the 1 files that {run.staging}" in caplog.text
    assert sorted(_read(dst)["path"].to_pylist()) == ["/a.jpg", "/b.jpg", "/c.jpg", "/x.jpg", "/y.jpg", "/z.jpg"]
    assert counts["images"] == 6
    assert not [n for n in _names(dst) if n.startswith("_staging-")]  # the dead run's folder went at the commit


def test_skip_existing_relabels_read_errors_and_keeps_one_row_per_path(dst):
    _write(storage.join(dst, "one.parquet"), _rows(
        ["/a.jpg", "/b.jpg", "/c.jpg", "/d.jpg"],
        [None, "cannot read file: not found", "empty file", "cannot read file: OSError: [Errno 5] I/O error"]))
    _write(storage.join(dst, "two.parquet"), _rows(["/a.jpg", "/e.jpg"]))  # /a.jpg again, as two runs left it
    _write(storage.join(dst, "three.parquet"), _rows(["/f.jpg"]))
    with OutputRun(dst, overwrite=False, skip_existing=True, model_id="m") as run:
        # a content error ("empty file") is the file's answer; a read error is not, so it is labelled again
        assert sorted(run.done_paths()) == ["/a.jpg", "/c.jpg", "/e.jpg", "/f.jpg"]
        _stage(run, ["/b.jpg", "/d.jpg"])
        counts = run.check(pa.array(["/b.jpg", "/d.jpg"]))
        assert (counts["images"], counts["errors"]) == (6, 1)
        run.commit(counts)
    table = _read(dst)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert table.num_rows == len(rows) == 6
    assert rows["/b.jpg"]["error"] is None and rows["/c.jpg"]["error"] == "empty file"
    assert "three.parquet" in _names(dst)  # a file with nothing to drop is not rewritten
    assert "one.parquet" not in _names(dst) and "two.parquet" not in _names(dst)


# --------------------------------------------------------------------------------------------
# --faces detect / auto: several rows per file, counted per file


FACE_SCHEMA = output_schema(CLASSES, faces=True)


def _face_rows(rows: list[tuple[str, int | None, str | None]], model: str = "m") -> pa.Table:
    """(path, face, error) rows: face None with no error is a photo without a face."""
    n = len(rows)
    columns = {f.name: pa.nulls(n, f.type) for f in FACE_SCHEMA}
    columns.update(path=pa.array([p for p, _, _ in rows], pa.string()),
                   face=pa.array([f for _, f, _ in rows], pa.int32()),
                   box_x=pa.array([None if f is None else 10.0 * f for _, f, _ in rows], pa.float32()),
                   error=pa.array([e for _, _, e in rows], pa.string()),
                   label=pa.array([None if f is None else "happy" for _, f, _ in rows], pa.string()),
                   model=pa.array([model] * n, pa.string()))
    return pa.table(columns, schema=FACE_SCHEMA)


PHOTOS = [("/a.jpg", 0, None), ("/a.jpg", 1, None), ("/a.jpg", 2, None), ("/b.jpg", None, None),
          ("/c.jpg", None, "empty file"), ("/d.jpg", 0, None)]


def test_face_schema_has_the_video_and_face_columns_after_the_path():
    names = FACE_SCHEMA.names
    head = ["path", *VIDEO_COLUMNS, *FACE_COLUMNS]
    assert names[:len(head)] == head
    assert names[len(head):] == SCHEMA.names[1:]  # then what a whole-image row holds
    assert FACE_SCHEMA.field("face").type == pa.int32() and FACE_SCHEMA.field("left_eye_x").type == pa.float32()
    assert len(FACE_COLUMNS) == 16  # face, box (4), score, 5 landmarks (10)


def test_faces_are_counted_per_file_and_each_file_checked(tmp_path):
    dst = str(tmp_path / "out")
    with OutputRun(dst, overwrite=False, skip_existing=False, model_id="m", faces=True) as run:
        _write(storage.join(run.new_dir, "x_000000.parquet"), _face_rows(PHOTOS))
        counts = run.check(pa.array(["/a.jpg", "/b.jpg", "/c.jpg", "/d.jpg"]))
        assert {k: counts[k] for k in ("images", "labelled", "errors", "faces", "no_face", "videos")} == \
            {"images": 4, "labelled": 2, "errors": 1, "faces": 4, "no_face": 1, "videos": 0}
        run.commit({"images": counts["images"]})
    assert _read(dst).num_rows == len(PHOTOS)
    # a file whose rows lack its first face, or a path not asked for, is refused before the commit
    for rows, todo in (([("/a.jpg", 1, None)], ["/a.jpg"]), ([("/a.jpg", 0, None), ("/z.jpg", 0, None)], ["/a.jpg"])):
        with OutputRun(str(tmp_path / "bad"), overwrite=False, skip_existing=False, model_id="m", faces=True) as run:
            _write(storage.join(run.new_dir, "x_000000.parquet"), _face_rows(rows))
            with pytest.raises(OutputError, match="nothing was committed"):
                run.check(pa.array(todo))


def test_skip_existing_keeps_every_face_of_a_file_and_refuses_the_other_mode(tmp_path):
    dst = str(tmp_path / "out")
    _write(storage.join(dst, "old.parquet"), _face_rows(PHOTOS + [("/a.jpg", 1, None)]))  # /a.jpg face 1 twice
    with OutputRun(dst, overwrite=False, skip_existing=True, model_id="m", faces=True) as run:
        assert sorted(run.done_paths()) == ["/a.jpg", "/b.jpg", "/c.jpg", "/d.jpg"]  # each path once
        _write(storage.join(run.new_dir, "x_000000.parquet"), _face_rows([("/e.MOV", None, None)]))
        counts = run.check(pa.array(["/e.MOV"]))
        assert (counts["images"], counts["faces"], counts["no_face"], counts["videos"]) == (5, 4, 2, 1)
        run.commit({"images": counts["images"]})
    table = _read(dst)
    assert table.num_rows == len(PHOTOS) + 1  # the repeated face is gone, the new file is in
    assert sorted(f for p, f in zip(table["path"].to_pylist(), table["face"].to_pylist()) if p == "/a.jpg") == [0, 1, 2]
    with pytest.raises(OutputError, match="labelled with --faces detect/auto .* not whole; pass the same --faces"):
        OutputRun(dst, overwrite=False, skip_existing=True, model_id="m").__enter__()
    whole = str(tmp_path / "whole")
    _write(storage.join(whole, "old.parquet"), _rows(["/a.jpg"]))
    with pytest.raises(OutputError, match="labelled with --faces whole .* not detect/auto"):
        OutputRun(whole, overwrite=False, skip_existing=True, model_id="m", faces=True).__enter__()

