"""What to label: an image folder, an s3:// prefix, or a manifest, as a table of paths.

Every error names the path and the fix, and is raised on the driver before any cluster work.
"""

from __future__ import annotations

import logging
import os

import pyarrow as pa
import pyarrow.compute as pc

from ray_fer import storage
from ray_fer.config import UserError
from ray_fer.decode import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".parquet", ".csv")


class InputError(UserError):
    """An input that cannot be labelled; the message names the path and the fix."""


def list_inputs(src: str) -> pa.Table:
    """The images to label as a table with one `path` column, unique, in listing order.

    `src` is a folder or s3:// prefix (listed recursively for IMAGE_EXTENSIONS) or a .parquet /
    .csv manifest with a `path` column (relative paths are taken from the manifest's folder).
    Raises InputError naming the path and the fix when it is missing, unreadable or empty.
    """
    import pyarrow.fs as pafs

    kind = storage.kind_of(src, "input")
    if kind == pafs.FileType.File:
        if not src.lower().endswith(MANIFEST_SUFFIXES):
            raise InputError(f"input {src!r} is a file; pass a folder, an s3:// prefix, or a .parquet or .csv "
                             "manifest with a 'path' column")
        return _read_manifest(src)
    if kind == pafs.FileType.NotFound and not storage.is_remote(src):
        raise InputError(f"input {src!r} does not exist; pass a folder, an s3://bucket/prefix, or a .parquet or "
                         ".csv manifest with a 'path' column")
    try:
        paths = storage.list_files(src, IMAGE_EXTENSIONS)
    except FileNotFoundError:
        paths = []
    except (OSError, ValueError) as e:
        raise InputError(f"cannot list input {src!r}: {storage.short_error(e)}; check the path{storage.hint(src)}")
    if not paths:
        raise InputError(f"no images under {src!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively); "
                         "check the path" + (" and the prefix" if storage.is_remote(src) else ""))
    log.info("listed %s images under %s", f"{len(paths):,}", src)
    return pa.table({"path": pa.array(paths, pa.string())})


def _read_manifest(src: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(src)
    try:
        if src.lower().endswith(".csv"):
            with fs.open_input_stream(path) as f:
                table = pacsv.read_csv(f)
        else:
            table = pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"cannot read manifest {src!r}: {storage.short_error(e)}")
    if "path" not in table.column_names:
        raise InputError(f"manifest {src!r} has no 'path' column (it has: {', '.join(table.column_names)}); "
                         "add one with an image path or s3:// URI per row")
    paths = table["path"].cast(pa.string())
    if paths.null_count or pc.any(pc.equal(pc.utf8_trim_whitespace(paths), "")).as_py():
        raise InputError(f"manifest {src!r} has empty paths; give every row an image path")
    base = src.rsplit("/", 1)[0] if "/" in src else "."
    resolved = [p if storage.is_remote(p) or os.path.isabs(p) else storage.join(base, p)
                for p in paths.to_pylist()]
    if not storage.is_remote(src):
        resolved = [p if storage.is_remote(p) else os.path.abspath(p) for p in resolved]
    unique = list(dict.fromkeys(resolved))
    if len(unique) < len(resolved):
        log.warning("manifest %s lists %d paths more than once; each is labelled once",
                    src, len(resolved) - len(unique))
    if not unique:
        raise InputError(f"manifest {src!r} lists no images")
    log.info("manifest %s lists %d images", src, len(unique))
    return pa.table({"path": pa.array(unique, pa.string())})

