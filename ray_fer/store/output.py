"""The output protocol of a labelled data set: Parquet files with one schema, `_SUCCESS`, a lease.

An output (a folder or s3:// prefix) holds:

    *.parquet           the rows, one per input file (with faces, one per face and one for a file
                        without a face), one schema
    _SUCCESS            JSON summary; present only beside a complete set of *.parquet files
    _LEASE              JSON: the run that holds the output (run id, host, pid, started, generation,
                        heartbeat) and, while a commit is being applied, its journal
    _staging-<run id>/  a run's files before its commit: new/*.parquet (this run's rows),
                        kept/*.parquet (old files less the rows labelled again)

Readers see the committed rows only: pyarrow and pandas skip names starting with "_", and
DuckDB's 'DST/*.parquet' reads the top level. A run (`OutputRun`), in order:

 1. takes the lease (store/lease.py), before Ray starts or the model is read: creates `_LEASE` where
    there is none; refuses while another run renewed it within `lease_timeout()` (on the store's
    clock); takes over an older one with a warning. A thread renews it every timeout/4 (at most
    15 s), each write conditional on the lease being this run's.
 2. finishes what dead runs left: the journal of a commit the previous holder began is carried
    out; a `_staging-*` folder (a run that never reached its commit) is deleted, or under
    --skip-existing kept: its staged rows count as labelled (so a crashed job's work is not
    lost) and this run's commit moves them in.
 3. plans: a non-empty output is refused without --overwrite or --skip-existing; --overwrite
    will replace every top-level file; --skip-existing keeps the rows there except read errors
    and repeated paths, whose files are rewritten into `kept/` (store/resume.py: Ray tasks, sorted
    128-bit keys, nothing held on the driver).
 4. labels into `_staging-<run id>/new/`. The top level is untouched, so the previous output and
    its `_SUCCESS` stay readable throughout.
 5. checks: the staged rows hold each path to label exactly once (with faces: exactly one first
    row, `face` 0 or null, per path), and nothing else: the order-free digest of their first
    rows' paths (store/pathsets.py), summed by one Ray task per file, equals the digest of the paths
    the pipeline was given. Counts come from the files' footers where they suffice.
 6. writes the journal (the files to delete, the files to move, the new `_SUCCESS`) into
    `_LEASE`, in one write conditional on the lease being this run's: the commit point. A run
    that lost its lease cannot make it, and commits nothing.
 7. applies it (store/journal.py), each step inside the lease's fence: deletes `_SUCCESS` (only if it
    is still the one replaced), then the replaced files, moves the staged ones to the top level
    (on S3 a copy and a delete), creates the new `_SUCCESS` (only where there is none), deletes
    the staging folder, and takes the journal out of the lease.
 8. releases the lease.

A crash before 6 leaves the previous output as it was; a crash during 7 leaves no `_SUCCESS`,
and the next run on the output, whatever its flags, finishes the journal before anything else.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ray_fer import cluster

from ray_fer.store import journal, pathsets, storage
from ray_fer.config import UserError
from ray_fer.schema import files_in, video_mask
from ray_fer.store.journal import STAGING_PREFIX, SUCCESS_FILE
from ray_fer.store.lease import LEASE_FILE, Lease, LeaseError, new_run_id
from ray_fer.store.pathsets import Digest
from ray_fer.store.resume import ResumeError, plan_resume

log = logging.getLogger(__name__)

ROWS_PER_FILE = 100_000  # target rows per Parquet file: few files, each small enough to stream


class OutputError(UserError):
    """An output that cannot be written as asked; the message names the path and the fix."""


# --------------------------------------------------------------------------------------------
# A run on an output: plan, stage, check, commit


class OutputRun:
    """One run's hold on an output, as a context manager around the labelling.

    On entry: checks the output and takes the lease; then, given the model's id (at once when
    the constructor has it, else by `prepare`, once Ray runs), finishes dead runs' commits and
    plans: under --skip-existing, `done` holds the sorted keys of the paths whose rows stay (for
    `resume.drop_done`) and `done_count` their number. The run writes its rows into `new_dir`,
    then `check()`s them and `commit()`s. On exit without a commit the staging folder is deleted
    and the previous output stays as it was; the lease is released either way.
    """

    def __init__(self, dst: str, *, overwrite: bool, skip_existing: bool, model_id: str | None = None,
                 faces: bool = False) -> None:
        self.dst = dst
        self.faces = faces  # one row per face (FACE_COLUMNS) rather than one per file
        self.overwrite = overwrite
        self.skip_existing = skip_existing
        self.model_id = model_id
        self.run_id = new_run_id()
        self.staging = storage.join(dst, STAGING_PREFIX + self.run_id)
        self.new_dir = storage.join(self.staging, "new")
        self.done: Any = None  # sorted keys of the paths labelled before, whose rows stay (or None)
        self.done_count = 0  # how many paths that is
        self._keep: list[str] = []  # top-level Parquet files that stay as they are
        self._replace: list[str] = []  # top-level files the commit deletes
        self._kept: list[str] = []  # staged copies of old files less their dropped rows
        self._salvaged: list[str] = []  # --skip-existing: files a run that died before its commit staged
        self._adopted: list[str] = []  # salvaged files that stay as they are; the commit moves them in
        self._dead: list[str] = []  # staging folders of dead runs, deleted at the commit
        self._files: list[str] | None = None  # the output's file names after the commit (set by check)
        self._committed = False  # the journal is in the lease: from here on the commit happens
        self.lease: Lease | None = None

    def __enter__(self) -> OutputRun:
        _check_location(self.dst)
        self.lease = Lease.acquire(self.dst, self.run_id)
        if self.model_id is not None:
            try:
                self.prepare(self.model_id)
            except BaseException:
                self._close()
                raise
        return self

    def prepare(self, model_id: str) -> None:
        """Finish dead runs' commits and plan this run's (see the class docstring)."""
        assert self.lease is not None, "prepare() inside the `with OutputRun(...)` block"
        self.model_id = model_id
        self._salvaged, self._dead = journal.recover(self.dst, self.lease, salvage=self.skip_existing)
        self._plan()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._close()

    def _close(self) -> None:
        """Drop the staging folder of a run that did not reach its commit, while it holds the
        lease (one that lost it changes nothing); release the lease."""
        try:
            if not self._committed and self.lease is not None and self.lease.lost is None:
                with self.lease.fence("delete staging"):
                    storage.delete_dir(self.staging)
        except LeaseError:
            pass  # the lease was lost: the staging folder is the next holder's to clear
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
        old = sorted(uri for uri, is_dir in entries if not is_dir and uri.endswith(".parquet"))
        try:
            plan = plan_resume(self.dst, old + self._salvaged, salvaged=set(self._salvaged), faces=self.faces,
                               model_id=self.model_id, kept_dir=storage.join(self.staging, "kept"))
        except ResumeError as e:
            raise OutputError(str(e)) from None
        self._keep, self._adopted, self._kept = plan.keep, plan.adopted, plan.kept
        self._replace = plan.replace
        self.done, self.done_count = plan.done, plan.done_count

    def done_paths(self) -> list[str]:
        """The paths whose rows stay, read back on the driver: for tests and small outputs."""
        files = self._keep + self._kept + self._adopted
        return sorted(set(p for uri in files for p in _first_paths(uri, self.faces).to_pylist()))

    # -- check and commit -------------------------------------------------------------------

    def check(self, todo: Digest | pa.Array | pa.ChunkedArray | list[str]) -> dict[str, Any]:
        """Check the staged rows against the paths this run labelled (`todo`: their Digest, as
        the pipeline's Tally summed it, or the paths themselves); returns the output's counts
        after the commit (images, labelled, errors, files; with faces also faces, no_face and videos).
        OutputError when they do not match."""
        assert self.lease is not None
        self.lease.renew()  # a run whose lease was taken over while it labelled says so, in one line
        if not isinstance(todo, Digest):
            todo = Digest.of_paths(todo)
        new = journal.parquet_files(self.new_dir)
        staged = count_files(new, faces=self.faces, digest=True)
        if staged["digest"] != todo:
            distinct = staged["images"] - cluster.fetch(cluster.submit(_repeats_in, new, self.faces))
            expected = "rows for" if self.faces else "one row for"
            raise OutputError(f"run {self.run_id} wrote {staged['rows']} rows for {distinct} distinct paths, "
                              f"expected {expected} each of the {todo.count} images to label; nothing was "
                              f"committed, {self.dst!r} is as it was: run again")
        old = count_files(self._keep + self._kept + self._adopted, faces=self.faces)
        if old["images"] != self.done_count:
            raise OutputError(f"output {self.dst!r} changed during run {self.run_id} ({old['images']} old rows kept, "
                              f"expected {self.done_count}); nothing was committed: make sure only one job labels "
                              "into it, then run again with --skip-existing")
        counts = {k: old[k] + staged[k] for k in old if k not in ("digest", "rows")}
        self._files = sorted([storage.basename(f) for f in self._keep] + [name for _, name in self._moves(new)])
        return counts | {"files": self._files}

    def _moves(self, new: list[str]) -> list[tuple[str, str]]:
        """(path under the output, file name at the top level) for every staged and adopted file."""
        own = storage.basename(self.staging)
        kept = [(f"{own}/kept/{storage.basename(f)}", f"{self.run_id}-kept-{storage.basename(f)}") for f in self._kept]
        adopted = [(_under(self.dst, f), f"{_under(self.dst, f).split('/', 1)[0][len(STAGING_PREFIX):]}-"
                    f"{storage.basename(f)}") for f in self._adopted]
        # new/ holds the files at its top, or in kind=... partitions (a run with faces: label/infer.py)
        return kept + adopted + [(f"{own}/new/{_under(self.new_dir, f)}", storage.basename(f)) for f in new]

    def commit(self, success: dict[str, Any]) -> None:
        """Make the staged rows the output and write `_SUCCESS` holding `success` (steps 6-7)."""
        assert self.lease is not None
        self.begin_commit(success)
        try:
            journal.apply(self.dst, self.lease.pending, self.lease)
            self.lease.end_commit()
        except UserError:  # the lease was lost, or another writer changed the output
            raise
        except Exception as e:  # noqa: BLE001 - any store error: the journal lets the next run finish
            raise OutputError(f"the commit of run {self.run_id} into {self.dst!r} stopped half-way "
                              f"({storage.short_error(e)}); the output has no {SUCCESS_FILE} until the next "
                              "ray-fer infer on it, with any flags, finishes the commit") from e

    def begin_commit(self, success: dict[str, Any]) -> dict[str, Any]:
        """Step 6: the journal into the lease, conditional on holding it: the commit point."""
        assert self.lease is not None and self._files is not None, "check() comes before commit()"
        record = {"run_id": self.run_id, "generation": self.lease.generation,
                  "delete": [storage.basename(f) for f in self._replace],
                  "move": self._moves(journal.parquet_files(self.new_dir)),
                  "drop": [storage.basename(f) for f in self._dead],
                  "success": success | {"run_id": self.run_id, "files": self._files}}
        try:
            self.lease.begin_commit(record)
        except UserError:  # the lease was taken over, or deleted
            raise
        except Exception as e:  # noqa: BLE001 - without the journal in the lease there is no commit
            raise OutputError(f"cannot write the commit into the lease on {self.dst!r} ({storage.short_error(e)}), "
                              f"so run {self.run_id} commits nothing: run again with --skip-existing") from e
        self._committed = True
        return record


# --------------------------------------------------------------------------------------------
# Counting the rows of many files: one Ray task per file, footers where they suffice


def count_files(files: list[str], *, faces: bool = False, digest: bool = False) -> dict[str, Any]:
    """Rows, images (files described: one row each, or with faces each file's first row),
    labelled and errors in Parquet files; with faces also `faces` (rows with a face), `no_face`
    (files read fine in which no face was found) and `videos` (the files described that are
    videos); with `digest` the Digest of the first rows' paths. One Ray task per file (where Ray
    runs), summed here."""
    parts = cluster.fetch([cluster.submit(file_counts, uri, faces, digest) for uri in files])
    keys = ("rows", "images", "labelled", "errors") + (("faces", "no_face", "videos") if faces else ())
    out: dict[str, Any] = {k: sum(p[k] for p in parts) for k in keys}
    if digest:
        out["digest"] = pathsets.total(p["digest"] for p in parts)
    return out


def file_counts(uri: str, faces: bool, digest: bool) -> dict[str, Any]:
    """The figures of `count_files` for one file: from its footer (whole images, no digest) when
    the `error` column has statistics, else from its columns."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    if not faces and not digest:
        meta = pq.read_metadata(path, filesystem=fs)
        col = meta.schema.names.index("error")
        groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
        stats = [g.column(col).statistics for g in groups]
        if all(s is not None and s.has_null_count for s in stats):
            errors = sum(g.num_rows - s.null_count for g, s in zip(groups, stats))
            return {"rows": meta.num_rows, "images": meta.num_rows, "labelled": meta.num_rows - errors,
                    "errors": errors}
    columns = ["error"] + (["face"] if faces else []) + (["path"] if faces or digest else [])
    table = pq.read_table(path, columns=columns, filesystem=fs)
    first = pc.fill_null(pc.equal(table["face"], 0), True) if faces else None
    images = files_in(table)
    errors = table["error"].drop_null().length()
    out: dict[str, Any] = {"rows": table.num_rows, "images": images, "errors": errors}
    if faces:
        found = table["face"].drop_null().length()
        failed = pc.is_valid(table["error"])
        no_face = int(pc.sum(pc.and_(pc.is_null(table["face"]), pc.invert(failed))).as_py() or 0)
        first_failed = int(pc.sum(pc.and_(first, failed)).as_py() or 0)  # a file's error, or its face 0's
        videos = int(pc.sum(video_mask(table["path"].filter(first))).as_py() or 0)
        out |= {"labelled": images - first_failed - no_face, "faces": found, "no_face": no_face, "videos": videos}
    else:
        out["labelled"] = images - errors
    if digest:
        paths = table["path"].filter(first) if faces else table["path"]
        out["digest"] = Digest.of(pathsets.keys_of(paths))
    return out


def _first_paths(uri: str, faces: bool) -> pa.Array:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    table = pq.read_table(path, columns=["path", "face"] if faces else ["path"], filesystem=fs)
    paths = table["path"].combine_chunks().cast(pa.string())
    return paths.filter(pc.fill_null(pc.equal(table["face"], 0), True)) if faces else paths


def _repeats_in(files: list[str], faces: bool) -> int:
    """How many first rows of these files repeat a path (to say what went wrong)."""
    import numpy as np

    parts = [(pathsets.keys_of(p), np.zeros(len(p), np.int64)) for p in (_first_paths(f, faces) for f in files)]
    return pathsets.find_repeats(*parts)[2]


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


def _top_level(dst: str) -> list[tuple[str, bool]]:
    """The output's top-level (uri, is_dir) but for the lease and the staging folders."""
    return [(uri, is_dir) for uri, is_dir in journal.list_dir(dst)
            if not storage.basename(uri).startswith(STAGING_PREFIX if is_dir else (LEASE_FILE, storage.CLOCK_PROBE))]


def _is_ours(uri: str) -> bool:
    name = storage.basename(uri)
    return name.endswith(".parquet") or name == SUCCESS_FILE or ".tmp-" in name
