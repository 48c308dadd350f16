"""The output protocol of a labelled data set: Parquet files with one schema, then `_SUCCESS`.

A folder or s3:// prefix holds `*.parquet` (one row per input file) and, once the run has
finished and its rows are counted, `_SUCCESS` (JSON: counts, model identity, timing, config).
A reader that finds no `_SUCCESS` is looking at an unfinished output. `prepare_output` applies
--overwrite and --skip-existing before any cluster work; `count_output` counts from the
Parquet footers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ray_fer import storage
from ray_fer.config import UserError

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS"  # JSON written last: a reader can tell a finished output from a crashed one
ROWS_PER_FILE = 100_000  # target rows per Parquet file: few files, each small enough to stream


class OutputError(UserError):
    """An output that cannot be written as asked; the message names the path and the fix."""


def output_schema(classes: tuple[str, ...]) -> pa.Schema:
    """The Parquet schema of a labelled output, identical in every file."""
    return pa.schema(
        [("path", pa.string()), ("label", pa.string()), ("confidence", pa.float32())]
        + [(f"prob_{name}", pa.float32()) for name in classes]
        + [("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("model", pa.string())]
    )


def to_output(table: pa.Table, *, schema: pa.Schema, counter: Any = None) -> pa.Table:
    """Predictor output -> the output schema: columns in order, no size for undecoded files.

    `counter` (a `console.RayCounter` actor) is told the rows done, for the progress display."""
    if counter is not None:
        counter.add.remote(table.num_rows)
    failed = pc.is_valid(table["error"])
    columns = []
    for field in schema:
        col = table[field.name]
        if field.name in ("width", "height"):
            col = pc.if_else(failed, pa.scalar(None, col.type), col)
        columns.append(col.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _output_files(dst: str) -> list[str]:
    try:
        return storage.list_files(dst)
    except FileNotFoundError:
        return []


def prepare_output(dst: str, *, overwrite: bool, skip_existing: bool, model_id: str) -> pa.Array:
    """Check the output before any cluster work; returns the paths already labelled there.

    An empty or missing output is fine. A non-empty one is refused unless `overwrite` (its
    ray-fer files are deleted; anything else there is refused) or `skip_existing` (its rows are
    kept, and must come from the same model). `_SUCCESS` is removed first either way: from here on
    the output is unfinished until a new one is written.
    """
    import pyarrow.fs as pafs

    try:
        storage.check_bucket(dst, "output")
        kind = storage.info(dst).type
        files = _output_files(dst) if kind == pafs.FileType.Directory else []
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise OutputError(f"cannot read output {dst!r}: {storage.short_error(e)}; check the path{storage.hint(dst)}")
    if kind == pafs.FileType.File:
        raise OutputError(f"output {dst!r} is a file; pass a folder or s3:// prefix for the Parquet data set")
    if not files:
        return pa.array([], pa.string())
    if not overwrite and not skip_existing:
        raise OutputError(f"output {dst!r} is not empty ({len(files)} files); pass --overwrite to replace it, "
                         "--skip-existing to label only images not yet in it, or another --output")
    foreign = [f for f in files if not _is_ours(f)]
    if overwrite:
        if foreign:
            raise OutputError(f"output {dst!r} holds files ray-fer did not write (e.g. {foreign[0]!r}); "
                             "--overwrite only replaces a labelled output: pick an empty or new --output")
        log.info("--overwrite: deleting the %d files in %s", len(files), dst)
        _remove_success(dst)
        for f in files:
            if storage.basename(f) != SUCCESS_FILE:
                storage.delete_file(f)
        return pa.array([], pa.string())
    _remove_success(dst)
    return _existing_paths(dst, [f for f in files if f.endswith(".parquet")], model_id)


def _is_ours(uri: str) -> bool:
    name = storage.basename(uri)
    return name.endswith(".parquet") or name == SUCCESS_FILE or ".tmp-" in name


def _remove_success(dst: str) -> None:
    marker = storage.join(dst, SUCCESS_FILE)
    if storage.exists(marker):
        storage.delete_file(marker)


def _existing_paths(dst: str, files: list[str], model_id: str) -> pa.Array:
    """Paths in an output's Parquet files; a file a crashed write left unreadable is deleted."""
    import pyarrow.parquet as pq

    chunks: list[pa.ChunkedArray] = []
    models: set[str] = set()
    for uri in files:
        fs, path = storage.filesystem(uri)
        try:
            names = pq.read_schema(path, filesystem=fs).names
        except pa.ArrowInvalid as e:  # not OSError: a network error must not delete anything
            log.warning("deleting %s: not a readable Parquet file (%s), left by a crashed write; "
                        "its images are labelled again", uri, storage.short_error(e))
            storage.delete_file(uri)
            continue
        if "path" not in names or "model" not in names:
            raise OutputError(f"{uri!r} is not a ray-fer output file (no path and model columns); "
                             "--skip-existing resumes a labelled output: pick another --output")
        part = pq.read_table(path, columns=["path", "model"], filesystem=fs)
        chunks.append(part["path"])
        models.update(v for v in pc.unique(part["model"]).to_pylist() if v is not None)
    others = models - {model_id}
    if others:
        raise OutputError(f"output {dst!r} was labelled by model {sorted(others)[0]}, not {model_id}; "
                         "pass the same --model to resume, or --overwrite to relabel everything")
    if not chunks:
        return pa.array([], pa.string())
    return pa.chunked_array([c for ch in chunks for c in ch.chunks], pa.string()).combine_chunks()


def count_output(dst: str) -> dict[str, Any]:
    """Rows and errors in an output's Parquet files, read from their footers (no data read)."""
    import pyarrow.parquet as pq

    rows = errors = 0
    files = [f for f in _output_files(dst) if f.endswith(".parquet")]
    for uri in files:
        fs, path = storage.filesystem(uri)
        meta = pq.read_metadata(path, filesystem=fs)
        col = meta.schema.names.index("error")
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            stats = group.column(col).statistics
            if stats is not None and stats.has_null_count:
                errors += group.num_rows - stats.null_count
            else:  # no statistics: read the one column
                errors += pq.read_table(path, columns=["error"], filesystem=fs)["error"].drop_null().length()
                break
    return {"images": rows, "labelled": rows - errors, "errors": errors,
            "files": [storage.basename(f) for f in files]}



def write_success(dst: str, summary: dict[str, Any]) -> None:
    """Mark the output finished: `_SUCCESS` holds the run's summary. Written last."""
    storage.write_bytes(storage.join(dst, SUCCESS_FILE), json.dumps(summary, indent=2).encode())

