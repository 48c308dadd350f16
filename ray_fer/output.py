"""The output protocol of a labelled data set: Parquet files with one schema, `_SUCCESS`, a lease.

An output (a folder or s3:// prefix) holds:

    *.parquet           the rows, one per input file (with faces, one per face and one for a file
                        without a face), one schema
    _SUCCESS            JSON summary; present only beside a complete set of *.parquet files
    _LEASE              JSON: the run that holds the output (run id, host, pid, started, heartbeat)
    _staging-<run id>/  a run's files before its commit: new/*.parquet (this run's rows),
                        kept/*.parquet (old files less the rows labelled again), _COMMIT

Readers see the committed rows only: pyarrow and pandas skip names starting with "_", and
DuckDB's 'DST/*.parquet' reads the top level. A run (`OutputRun`), in order:

 1. takes the lease: creates `_LEASE` where there is none (atomically: link() locally,
    `If-None-Match: *` on S3); refuses while another run's heartbeat is younger than
    `lease_timeout()`; takes over an older one with a warning. A thread renews the heartbeat
    every timeout/4 (at most 15 s), each write conditional on the lease being unchanged.
 2. finishes what dead runs left: a `_staging-*` folder with a `_COMMIT` is rolled forward; one
    without is deleted, or under --skip-existing kept: its staged rows count as labelled (so a
    crashed job's work is not lost) and this run's commit moves them in.
 3. plans: a non-empty output is refused without --overwrite or --skip-existing; --overwrite
    will replace every top-level file; --skip-existing keeps the rows there except read errors
    and repeated paths, whose files are rewritten into `kept/`.
 4. labels into `_staging-<run id>/new/`. The top level is untouched, so the previous output and
    its `_SUCCESS` stay readable throughout.
 5. checks: the staged rows hold each path to label exactly once (with faces: exactly one first
    row, `face` 0 or null, per path), and nothing else.
 6. renews the lease: a run that lost it to another commits nothing.
 7. writes `_staging-<run id>/_COMMIT`, one atomic write naming the files to delete, the files
    to move and the new `_SUCCESS`: the commit point.
 8. applies it: deletes `_SUCCESS`, then the replaced files, moves the staged ones to the top
    level (on S3 a copy and a delete), writes the new `_SUCCESS`, deletes the staging folder.
 9. releases the lease.

A crash before 7 leaves the previous output as it was; a crash during 8 leaves no `_SUCCESS`,
and the next run on the output, whatever its flags, rolls `_COMMIT` forward before anything else.
"""

from __future__ import annotations

import json
import logging
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_fer import storage
from ray_fer.config import UserError
from ray_fer.data import READ_ERROR_PREFIX
from ray_fer.lease import LEASE_FILE, Lease, new_run_id

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS"  # JSON written last: a reader can tell a finished output from a crashed one
STAGING_PREFIX = "_staging-"  # + run id: a run's files until its commit
COMMIT_FILE = "_COMMIT"  # in the staging folder: the journal whose write commits the run
ROWS_PER_FILE = 100_000  # target rows per Parquet file: few files, each small enough to stream


class OutputError(UserError):
    """An output that cannot be written as asked; the message names the path and the fix."""


# The detector's five points (faces.py), left and right as seen in the image, not the person's.
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
# What a face adds to a row (--faces detect / auto): its index in the photo, its box and score,
# and the five landmarks, in pixels of the upright source image.
FACE_COLUMNS = ("face", "box_x", "box_y", "box_w", "box_h", "face_score",
                *(f"{name}_{axis}" for name in LANDMARKS for axis in "xy"))


def output_schema(classes: tuple[str, ...], *, faces: bool = False) -> pa.Schema:
    """The Parquet schema of a labelled output, identical in every file; with `faces`, one row per
    face, with FACE_COLUMNS after `path`."""
    face_fields = [("face", pa.int32())] + [(name, pa.float32()) for name in FACE_COLUMNS[1:]] if faces else []
    return pa.schema(
        [("path", pa.string())] + face_fields + [("label", pa.string()), ("confidence", pa.float32())]
        + [(f"prob_{name}", pa.float32()) for name in classes]
        + [("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("model", pa.string())]
    )


def files_in(table: pa.Table) -> int:
    """How many files the rows describe: one row each, or with faces one row whose `face` is 0 or null."""
    if "face" not in table.column_names:
        return table.num_rows
    return int(pc.sum(pc.fill_null(pc.equal(table["face"], 0), True)).as_py() or 0)


def to_output(table: pa.Table, *, schema: pa.Schema, counter: Any = None) -> pa.Table:
    """Predictor output -> the output schema: columns in order, no size for undecoded files.

    `counter` (a `console.RayCounter` actor) is told the files done, for the progress display."""
    if counter is not None:
        counter.add.remote(files_in(table))
    failed = pc.is_valid(table["error"])
    columns = []
    for field in schema:
        col = table[field.name]
        if field.name in ("width", "height"):
            col = pc.if_else(failed, pa.scalar(None, col.type), col)
        columns.append(col.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


# --------------------------------------------------------------------------------------------
# A run on an output: plan, stage, check, commit


class OutputRun:
    """One run's hold on an output, as a context manager around the labelling.

    On entry: checks the output, takes the lease, finishes dead runs' commits, and plans: `done`
    holds the paths whose rows stay. The run writes its rows into `new_dir`, then `check()`s them
    and `commit()`s. On exit without a commit the staging folder is deleted and the previous
    output stays as it was; the lease is released either way.
    """

    def __init__(self, dst: str, *, overwrite: bool, skip_existing: bool, model_id: str, faces: bool = False) -> None:
        self.dst = dst
        self.faces = faces  # one row per face (FACE_COLUMNS) rather than one per file
        self.overwrite = overwrite
        self.skip_existing = skip_existing
        self.model_id = model_id
        self.run_id = new_run_id()
        self.staging = storage.join(dst, STAGING_PREFIX + self.run_id)
        self.new_dir = storage.join(self.staging, "new")
        self.done: pa.Array = pa.array([], pa.string())  # paths labelled before, whose rows stay
        self._keep: list[str] = []  # top-level Parquet files that stay as they are
        self._replace: list[str] = []  # top-level files the commit deletes
        self._kept: list[str] = []  # staged copies of old files less their dropped rows
        self._salvaged: list[str] = []  # --skip-existing: files a run that died before its commit staged
        self._adopted: list[str] = []  # salvaged files that stay as they are; the commit moves them in
        self._dead: list[str] = []  # staging folders of dead runs, deleted at the commit
        self._files: list[str] | None = None  # the output's file names after the commit (set by check)
        self._journal_written = False
        self.lease: Lease | None = None

    def __enter__(self) -> OutputRun:
        _check_location(self.dst)
        self.lease = Lease.acquire(self.dst, self.run_id)
        try:
            self._salvaged, self._dead = recover(self.dst, salvage=self.skip_existing)
            self._plan()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._close()

    def _close(self) -> None:
        """Drop the staging folder of a run that did not reach its commit; release the lease."""
        try:
            if not self._journal_written:
                storage.delete_dir(self.staging)
        except Exception as e:  # noqa: BLE001 - the next run on this output deletes it
            log.warning("could not delete %s (%s); the next run on this output does", self.staging,
                        storage.short_error(e))
        finally:
            if self.lease is not None:
                self.lease.release()

    # -- planning ---------------------------------------------------------------------------

    def _plan(self) -> None:
        entries = _top_level(self.dst)
        files = [uri for uri, _ in entries]
        if not files and not self._salvaged:
            return
        if not self.overwrite and not self.skip_existing:
            raise OutputError(f"output {self.dst!r} is not empty ({len(files)} files); pass --overwrite to replace "
                              "it, --skip-existing to label only images not yet in it, or another --output")
        foreign = [uri for uri, is_dir in entries if is_dir or not _is_ours(uri)]
        if self.overwrite:
            if foreign:
                raise OutputError(f"output {self.dst!r} holds files ray-fer did not write (e.g. {foreign[0]!r}); "
                                  "--overwrite only replaces a labelled output: pick an empty or new --output")
            self._replace = [f for f in files if storage.basename(f) != SUCCESS_FILE]
            log.info("--overwrite: the %d files in %s are replaced once the new rows are complete",
                     len(self._replace), self.dst)
            return
        self._scan([uri for uri, is_dir in entries if not is_dir and uri.endswith(".parquet")] + self._salvaged)

    def _scan(self, files: list[str]) -> None:
        """--skip-existing: the paths whose rows stay, and which old files stay as they are.

        `files` are the top-level files, then those salvaged from dead runs: a path's first row
        wins, so an old row beats a salvaged one for the same image."""
        parts = self._read_old(files)
        if not parts:
            return
        models = {m for _, t in parts for m in pc.unique(t["model"]).to_pylist() if m is not None}
        others = models - {self.model_id}
        if others:
            raise OutputError(f"output {self.dst!r} was labelled by model {sorted(others)[0]}, not {self.model_id}; "
                              "pass the same --model to resume, or --overwrite to relabel everything")
        paths = pa.concat_arrays([t["path"].combine_chunks() for _, t in parts])
        errors = pa.concat_arrays([t["error"].combine_chunks() if "error" in t.column_names
                                   else pa.nulls(t.num_rows, pa.string()) for _, t in parts])
        faces = pa.concat_arrays([t["face"].combine_chunks() for _, t in parts]) if self.faces else None
        keep = _rows_to_keep(paths, errors, faces)
        self.done = pc.unique(paths.filter(pa.array(keep)))
        start = 0
        for uri, table in parts:
            mask = keep[start:start + table.num_rows]
            start += table.num_rows
            salvaged = uri in self._salvaged
            if mask.all():
                (self._adopted if salvaged else self._keep).append(uri)
            else:
                self._rewrite(uri, mask, replace=not salvaged)

    def _read_old(self, files: list[str]) -> list[tuple[str, pa.Table]]:
        """The path, model (and error) columns of the old files; unreadable ones are to be replaced."""
        import pyarrow.parquet as pq

        parts = []
        for uri in files:
            fs, path = storage.filesystem(uri)
            try:
                names = pq.read_schema(path, filesystem=fs).names
            except pa.ArrowInvalid as e:  # not OSError: a network error must not drop any rows
                log.warning("%s is not a readable Parquet file (%s), left by a crashed write: it is deleted at "
                            "the commit and its images labelled again", uri, storage.short_error(e))
                if uri not in self._salvaged:  # those go with their dead run's folder
                    self._replace.append(uri)
                continue
            if "path" not in names or "model" not in names:
                raise OutputError(f"{uri!r} is not a ray-fer output file (no path and model columns); "
                                  "--skip-existing resumes a labelled output: pick another --output")
            if ("face" in names) != self.faces:
                was, now = ("detect/auto", "whole") if "face" in names else ("whole", "detect/auto")
                raise OutputError(f"output {self.dst!r} was labelled with --faces {was} (e.g. {uri!r}), not {now}; "
                                  "pass the same --faces to resume, or --overwrite to relabel everything")
            columns = ["path", "model"] + (["error"] if "error" in names else []) + (["face"] if self.faces else [])
            parts.append((uri, pq.read_table(path, columns=columns, filesystem=fs)))
        return parts

    def _rewrite(self, uri: str, mask: np.ndarray, *, replace: bool = True) -> None:
        """Stage a copy of an old file without the rows labelled again; with `replace` the commit
        deletes the original (a top-level file)."""
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(uri)
        rows = pq.read_table(path, filesystem=fs).filter(pa.array(mask))
        if rows.num_rows:
            copy = storage.join(self.staging, "kept", f"{len(self._kept):06d}.parquet")
            copy_fs, copy_path = storage.filesystem(copy)
            copy_fs.create_dir(copy_path.rsplit("/", 1)[0], recursive=True)
            pq.write_table(rows, copy_path, filesystem=copy_fs)
            self._kept.append(copy)
        if replace:
            self._replace.append(uri)

    # -- check and commit -------------------------------------------------------------------

    def check(self, todo: pa.Array | pa.ChunkedArray) -> dict[str, Any]:
        """Check the staged rows against the paths this run labelled; returns the output's counts
        after the commit (images, labelled, errors, files; with faces also faces and no_face).
        OutputError when they do not match."""
        new = _parquet_files(self.new_dir)
        paths, firsts = _read_paths(new, faces=self.faces)  # firsts: each file's first (or only) row
        distinct = pc.count_distinct(paths).as_py() if len(paths) else 0
        known = int(pc.sum(pc.is_in(firsts, value_set=todo)).as_py() or 0)  # None when there are no rows
        if not len(firsts) == distinct == known == len(todo):
            expected = "rows for" if self.faces else "one row for"
            raise OutputError(f"run {self.run_id} wrote {len(paths)} rows for {distinct} distinct paths ({known} of "
                              f"them asked for), expected {expected} each of the {len(todo)} images to label; "
                              f"nothing was committed, {self.dst!r} is as it was: run again")
        old = _count_files(self._keep + self._kept + self._adopted, faces=self.faces)
        if old["images"] != len(self.done):
            raise OutputError(f"output {self.dst!r} changed during run {self.run_id} ({old['images']} old rows kept, "
                              f"expected {len(self.done)}); nothing was committed: make sure only one job labels "
                              "into it, then run again with --skip-existing")
        counts = _count_files(self._keep + self._kept + self._adopted + new, faces=self.faces)
        self._files = sorted([storage.basename(f) for f in self._keep] + [name for _, name in self._moves(new)])
        return counts | {"files": self._files}

    def _moves(self, new: list[str]) -> list[tuple[str, str]]:
        """(path under the output, file name at the top level) for every staged and adopted file."""
        own = storage.basename(self.staging)
        kept = [(f"{own}/kept/{storage.basename(f)}", f"{self.run_id}-kept-{storage.basename(f)}") for f in self._kept]
        adopted = [(_under(self.dst, f), f"{_under(self.dst, f).split('/', 1)[0][len(STAGING_PREFIX):]}-"
                    f"{storage.basename(f)}") for f in self._adopted]
        return kept + adopted + [(f"{own}/new/{storage.basename(f)}", storage.basename(f)) for f in new]

    def commit(self, success: dict[str, Any]) -> None:
        """Make the staged rows the output and write `_SUCCESS` holding `success` (steps 6-8)."""
        journal = self._write_journal(success)
        try:
            _apply(self.dst, self.staging, journal)
        except Exception as e:  # noqa: BLE001 - any store error: the journal lets the next run finish
            raise OutputError(f"the commit of run {self.run_id} into {self.dst!r} stopped half-way "
                              f"({storage.short_error(e)}); the output has no {SUCCESS_FILE} until the next "
                              "ray-fer infer on it, with any flags, finishes the commit") from e

    def _write_journal(self, success: dict[str, Any]) -> dict[str, Any]:
        """Steps 6 and 7: renew the lease, then write `_COMMIT`, the commit point."""
        assert self.lease is not None and self._files is not None, "check() comes before commit()"
        try:
            self.lease.renew()
        except UserError:  # the lease was taken over, or deleted
            raise
        except Exception as e:  # noqa: BLE001 - without a renewed lease there is no commit
            raise OutputError(f"cannot renew the lease on {self.dst!r} ({storage.short_error(e)}), so run "
                              f"{self.run_id} commits nothing: run again with --skip-existing") from e
        journal = {"run_id": self.run_id, "delete": [storage.basename(f) for f in self._replace],
                   "move": self._moves(_parquet_files(self.new_dir)),
                   "drop": [storage.basename(f) for f in self._dead],
                   "success": success | {"run_id": self.run_id, "files": self._files}}
        storage.write_bytes(storage.join(self.staging, COMMIT_FILE), json.dumps(journal, indent=2).encode())
        self._journal_written = True
        return journal


def _apply(dst: str, staging: str, journal: dict[str, Any]) -> None:
    """Carry out a commit journal; safe to repeat after a crash at any point."""
    if _success_run_id(dst) != journal["run_id"]:
        _delete_if_present(storage.join(dst, SUCCESS_FILE))  # first: from here on the output is unfinished
        for name in journal["delete"]:
            _delete_if_present(storage.join(dst, name))
        for src, name in journal["move"]:
            src_uri = storage.join(dst, src)
            if storage.exists(src_uri):  # else moved before the crash
                fs, src_path = storage.filesystem(src_uri)
                fs.move(src_path, storage.filesystem(storage.join(dst, name))[1])
        write_success(dst, journal["success"])
    for folder in journal.get("drop", []):  # dead runs whose files this commit adopted
        storage.delete_dir(storage.join(dst, folder))
    storage.delete_dir(staging)


def recover(dst: str, *, salvage: bool = False) -> tuple[list[str], list[str]]:
    """Finish the commits that dead runs began. The staging folders of those that had not are
    deleted, or with `salvage` (--skip-existing) kept: returns (the Parquet files they staged,
    their folders), whose rows the run may adopt, so that a crashed job's work is not lost.

    Call only while holding the lease: a live run's staging folder would be deleted."""
    salvaged: list[str] = []
    dead: list[str] = []
    for uri, is_dir in _list_dir(dst):
        if not (is_dir and storage.basename(uri).startswith(STAGING_PREFIX)):
            continue
        journal_uri = storage.join(uri, COMMIT_FILE)
        if storage.exists(journal_uri):
            journal = json.loads(storage.read_bytes(journal_uri))
            log.warning("finishing the commit of run %s into %s, which stopped half-way", journal["run_id"], dst)
            _apply(dst, uri, journal)
        elif salvage:
            files = _parquet_files(storage.join(uri, "new"))
            log.warning("keeping the %d files that %s, a run that ended before its commit, had written",
                        len(files), uri)
            salvaged += files
            dead.append(uri)
        else:
            log.warning("deleting %s: the files of a run that ended before its commit", uri)
            storage.delete_dir(uri)
    return salvaged, dead


# --------------------------------------------------------------------------------------------
# Helpers


def _check_location(dst: str) -> None:
    """The output's bucket exists and the path is not a file, before the lease is written there."""
    import pyarrow.fs as pafs

    if storage.kind_of(dst, "output") == pafs.FileType.File:
        raise OutputError(f"output {dst!r} is a file; pass a folder or s3:// prefix for the Parquet data set")


def _under(dst: str, uri: str) -> str:
    """`uri` as a path relative to the output folder `dst`."""
    root = storage.filesystem(dst)[1].rstrip("/") + "/"
    path = storage.filesystem(uri)[1]
    assert path.startswith(root), (uri, dst)
    return path[len(root):]


def _list_dir(dst: str) -> list[tuple[str, bool]]:
    try:
        return storage.list_dir(dst)
    except FileNotFoundError:
        return []


def _top_level(dst: str) -> list[tuple[str, bool]]:
    """The output's top-level (uri, is_dir) but for the lease and the staging folders."""
    return [(uri, is_dir) for uri, is_dir in _list_dir(dst)
            if not storage.basename(uri).startswith(STAGING_PREFIX if is_dir else LEASE_FILE)]


def _parquet_files(folder: str) -> list[str]:
    try:
        return [f for f in storage.list_files(folder) if f.endswith(".parquet")]
    except FileNotFoundError:
        return []


def _is_ours(uri: str) -> bool:
    name = storage.basename(uri)
    return name.endswith(".parquet") or name == SUCCESS_FILE or ".tmp-" in name


def _delete_if_present(uri: str) -> None:
    if storage.exists(uri):
        storage.delete_file(uri)


def _success_run_id(dst: str) -> str | None:
    uri = storage.join(dst, SUCCESS_FILE)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri)).get("run_id")
    except ValueError:
        return None


def _rows_to_keep(paths: pa.Array, errors: pa.Array, faces: pa.Array | None = None) -> np.ndarray:
    """Which old rows stay under --skip-existing: not read errors, and the first row of each path
    (with `faces`, of each path and face).

    A read error ("cannot read file: ...") says nothing about the image, so it is labelled again;
    content errors (empty file, not an image) stay. Repeated paths come from older versions,
    which let two runs write one output."""
    read_error = pc.fill_null(pc.starts_with(errors, READ_ERROR_PREFIX), False).to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero(~read_error)
    if faces is not None:
        paths = pc.binary_join_element_wise(paths, pc.cast(pc.fill_null(faces, -1), pa.string()), "\x00")
    among = paths.take(pa.array(candidates))
    first = pc.index_in(pc.unique(among), value_set=among).to_numpy()
    keep = np.zeros(len(paths), dtype=bool)
    keep[candidates[first]] = True
    if read_error.any():
        log.info("--skip-existing: %d rows with a read error are labelled again", int(read_error.sum()))
    repeated = len(candidates) - len(first)
    if repeated:
        log.warning("--skip-existing: dropping %d repeated rows (left by two runs on one output)", repeated)
    return keep


def _read_paths(files: list[str], *, faces: bool = False) -> tuple[pa.Array, pa.Array]:
    """The `path` of every row, and of each file's first row: every row, or with `faces` the rows
    whose `face` is 0 or null."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=["path", "face"] if faces else ["path"], filesystem=fs)
              for fs, p in map(storage.filesystem, files)]
    if not tables:
        return pa.array([], pa.string()), pa.array([], pa.string())
    table = pa.concat_tables(tables)
    paths = table["path"].combine_chunks().cast(pa.string())
    if not faces:
        return paths, paths
    first = pc.fill_null(pc.equal(table["face"].combine_chunks(), 0), True)
    return paths, paths.filter(first)


def _count_files(files: list[str], *, faces: bool = False) -> dict[str, int]:
    """Files (images), labelled and errors in Parquet files, read from their footers where they
    have statistics; with `faces` from the `face` and `error` columns, plus `faces` (rows with a
    face) and `no_face` (files read fine in which no face was found)."""
    import pyarrow.parquet as pq

    if faces:
        parts = [pq.read_table(p, columns=["face", "error"], filesystem=fs) for fs, p in map(storage.filesystem, files)]
        table = pa.concat_tables(parts) if parts else pa.table({"face": pa.array([], pa.int32()),
                                                                "error": pa.array([], pa.string())})
        images, found = files_in(table), table["face"].drop_null().length()
        errors = table["error"].drop_null().length()
        no_face = table.num_rows - found - errors
        return {"images": images, "labelled": images - errors - no_face, "errors": errors, "faces": found,
                "no_face": no_face}
    rows = errors = 0
    for uri in files:
        fs, path = storage.filesystem(uri)
        meta = pq.read_metadata(path, filesystem=fs)
        col = meta.schema.names.index("error")
        rows += meta.num_rows
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        stats = [g.column(col).statistics for g in groups]
        if all(s is not None and s.has_null_count for s in stats):
            errors += sum(g.num_rows - s.null_count for g, s in zip(groups, stats))
        else:  # no statistics: read the one column
            errors += pq.read_table(path, columns=["error"], filesystem=fs)["error"].drop_null().length()
    return {"images": rows, "labelled": rows - errors, "errors": errors}


def write_success(dst: str, summary: dict[str, Any]) -> None:
    """Mark the output finished: `_SUCCESS` holds the run's summary. Written last."""
    storage.write_bytes(storage.join(dst, SUCCESS_FILE), json.dumps(summary, indent=2).encode())
