"""--skip-existing at any size: what an output holds already, which rows stay, the anti-join.

`plan_resume` scans the old Parquet files (the top level, and those dead runs had staged) with
one Ray task each: schema, model, read errors, and every row's 128-bit key (store/pathsets.py). One
task then sorts the keys to find repeated rows, another the kept paths' keys into the sorted
array that the labelling stream is filtered against (`drop_done`: a streaming anti-join, no
shuffle). Files that lose rows (read errors, repeats) are rewritten, by tasks, into the run's
staging folder. The driver holds per-file figures and object references only.

Which rows stay, as before: every row but read errors ("cannot read file: ...", which say
nothing about the image, so it is labelled again) and repeats (a path's row, with faces a
(path, face) row, that an earlier file or row already has: older versions let two runs write
one output). A file that is not readable Parquet (a crashed write of an older version) is
replaced and its images labelled again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_fer import cluster

from ray_fer.store import pathsets, storage
from ray_fer.config import UserError
from ray_fer.schema import READ_ERROR_PREFIX

log = logging.getLogger(__name__)


class ResumeError(UserError):
    """An output that --skip-existing cannot extend; the message names the file and the fix."""


@dataclass
class FileScan:
    """What a scan task learns about one old file."""

    uri: str
    rows: int = 0
    read_errors: int = 0  # rows whose error is a read error
    models: list[str] = field(default_factory=list)
    unreadable: str | None = None  # why it is not readable Parquet
    columns: list[str] = field(default_factory=list)


@dataclass
class ResumePlan:
    """What a --skip-existing run keeps: files as they are, rewritten copies, and the anti-join's
    sorted keys of the paths whose rows stay (an ObjectRef where Ray runs, else the array)."""

    keep: list[str] = field(default_factory=list)  # top-level files that stay as they are
    adopted: list[str] = field(default_factory=list)  # dead runs' staged files that stay as they are
    kept: list[str] = field(default_factory=list)  # staged copies of files less their dropped rows
    replace: list[str] = field(default_factory=list)  # top-level files the commit deletes
    done: Any = None  # sorted distinct keys of the paths whose rows stay
    done_count: int = 0  # how many paths that is


def plan_resume(dst: str, files: list[str], *, salvaged: set[str], faces: bool, model_id: str,
                kept_dir: str) -> ResumePlan:
    """Scan the old files (top-level ones first, then `salvaged`: a path's first row wins, so an
    old row beats a salvaged one), check them, and stage rewritten copies into `kept_dir`.
    Raises ResumeError for a file that is not a ray-fer output, another model, or another
    --faces mode."""
    plan = ResumePlan()
    scans = [cluster.submit(scan_file, uri, i, faces, num_returns=3) for i, uri in enumerate(files)]
    infos: list[FileScan] = cluster.fetch([s[0] for s in scans])
    readable = []
    for i, info in enumerate(infos):
        if info.unreadable is not None:
            log.warning("%s is not a readable Parquet file (%s), left by a crashed write: it is deleted at the "
                        "commit and its images labelled again", info.uri, info.unreadable)
            if info.uri not in salvaged:  # those go with their dead run's folder
                plan.replace.append(info.uri)
            continue
        _check_file(dst, info, faces)
        readable.append(i)
    models = sorted({m for i in readable for m in infos[i].models} - {model_id})
    if models:
        raise ResumeError(f"output {dst!r} was labelled by model {models[0]}, not {model_id}; "
                          "pass the same --model to resume, or --overwrite to relabel everything")
    if not readable:
        plan.done = np.empty(0, pathsets.KEY)
        return plan
    repeats = cluster.submit(pathsets.find_repeats, *[scans[i][1] for i in readable])
    plan.done = cluster.submit(pathsets.unique_sorted, *[scans[i][2] for i in readable])
    plan.done_count, repeated = cluster.fetch([cluster.submit(_size, plan.done), cluster.submit(_third, repeats)])
    read_errors = sum(infos[i].read_errors for i in readable)
    if read_errors:
        log.info("--skip-existing: %d rows with a read error are labelled again", read_errors)
    if repeated:
        log.warning("--skip-existing: dropping %d repeated rows (left by two runs on one output)", repeated)
    drops = cluster.fetch([cluster.submit(_drops, scans[i][1], repeats) for i in readable]) if repeated \
        else [0] * len(readable)
    rewrites = []
    for i, dropped in zip(readable, drops):
        uri = infos[i].uri
        if not dropped and not infos[i].read_errors:
            (plan.adopted if uri in salvaged else plan.keep).append(uri)
            continue
        copy = storage.join(kept_dir, f"{len(rewrites):06d}.parquet")
        rewrites.append((copy, cluster.submit(rewrite_file, uri, i, faces, repeats, copy)))
        if uri not in salvaged:
            plan.replace.append(uri)
    for (copy, rows) in zip([c for c, _ in rewrites], cluster.fetch([r for _, r in rewrites])):
        if rows:
            plan.kept.append(copy)
    return plan


def _third(repeats: tuple[Any, Any, int]) -> int:
    return repeats[2]


def _size(keys: np.ndarray) -> int:
    return len(keys)


def _check_file(dst: str, info: FileScan, faces: bool) -> None:
    if "path" not in info.columns or "model" not in info.columns:
        raise ResumeError(f"{info.uri!r} is not a ray-fer output file (no path and model columns); "
                          "--skip-existing resumes a labelled output: pick another --output")
    if ("face" in info.columns) != faces:
        was, now = ("detect/auto", "whole") if "face" in info.columns else ("whole", "detect/auto")
        raise ResumeError(f"output {dst!r} was labelled with --faces {was} (e.g. {info.uri!r}), not {now}; "
                          "pass the same --faces to resume, or --overwrite to relabel everything")


# --------------------------------------------------------------------------------------------
# Per-file tasks


def _rows_of(table: pa.Table, faces: bool, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For one file's rows: which are read errors, and of the others their keys, positions
    (index << 32 | row) and whether each is its file's first row (face 0 or null)."""
    n = table.num_rows
    errors = table["error"] if "error" in table.column_names else pa.nulls(n, pa.string())
    read_error = pc.fill_null(pc.starts_with(errors, READ_ERROR_PREFIX), False).to_numpy(zero_copy_only=False)
    ok = np.flatnonzero(~read_error)
    paths = table["path"].take(pa.array(ok))
    if faces:
        face = table["face"].take(pa.array(ok))
        keys = pathsets.face_keys(paths, face)
        first = pc.fill_null(pc.equal(face, 0), True).to_numpy(zero_copy_only=False)
    else:
        keys = pathsets.keys_of(paths)
        first = np.ones(len(ok), dtype=bool)
    return read_error, keys, (index << 32) + ok.astype(np.int64), first


def scan_file(uri: str, index: int, faces: bool) -> tuple[FileScan, tuple[Any, Any, Any], Any]:
    """One old file: its FileScan; (keys, positions, first) of its rows that are not read
    errors, for `pathsets.find_repeats`; the keys of the paths of those first rows (the done set)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    empty = (np.empty(0, pathsets.KEY), np.empty(0, np.int64), np.empty(0, bool))
    try:
        names = pq.read_schema(path, filesystem=fs).names
    except pa.ArrowInvalid as e:  # not OSError: a network error must not drop any rows
        return FileScan(uri, unreadable=storage.short_error(e)), empty, empty[0]
    info = FileScan(uri, columns=names)
    if "path" not in names or "model" not in names or ("face" in names) != faces:
        return info, empty, empty[0]
    columns = ["path", "model"] + [c for c in ("error", "face") if c in names]
    table = pq.read_table(path, columns=columns, filesystem=fs)
    info.rows = table.num_rows
    info.models = [m for m in pc.unique(table["model"]).to_pylist() if m is not None]
    read_error, keys, positions, first = _rows_of(table, faces, index)
    info.read_errors = int(read_error.sum())
    ok = np.flatnonzero(~read_error)
    done = pathsets.keys_of(table["path"].take(pa.array(ok[first])))
    return info, (keys, positions, first), done


def _drops(part: tuple[Any, Any, Any], repeats: tuple[Any, Any, int]) -> int:
    """How many of a file's rows repeat a row kept elsewhere."""
    keys, positions, _ = part
    return int(pathsets.drop_repeats(keys, positions, repeats[0], repeats[1]).sum())


def rewrite_file(uri: str, index: int, faces: bool, repeats: tuple[Any, Any, int], copy: str) -> int:
    """Write `copy`: the old file `uri` less its read errors and repeated rows; returns its rows
    (0: nothing is written)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    table = pq.read_table(path, filesystem=fs)
    read_error, keys, positions, _ = _rows_of(table, faces, index)
    keep = ~read_error
    keep[np.flatnonzero(keep)] = ~pathsets.drop_repeats(keys, positions, repeats[0], repeats[1])
    rows = table.filter(pa.array(keep))
    if rows.num_rows:
        copy_fs, copy_path = storage.filesystem(copy)
        copy_fs.create_dir(copy_path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(rows, copy_path, filesystem=copy_fs)
    return rows.num_rows


# --------------------------------------------------------------------------------------------
# The anti-join


def drop_done(table: pa.Table, *, done: Any) -> pa.Table:
    """Ray Data batch function (pyarrow): the rows whose `path` is not among `done` (sorted keys,
    or an ObjectRef to them: read from the object store without a copy)."""
    import ray

    if isinstance(done, ray.ObjectRef):
        done = ray.get(done)
    if not len(done) or not table.num_rows:
        return table
    return table.filter(pa.array(~pathsets.contains(done, pathsets.keys_of(table["path"]))))
