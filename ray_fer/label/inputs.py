"""What to label: an image folder, an s3:// prefix, or a manifest, as a stream of unique paths.

`find_inputs` checks the input on the driver, before any cluster work, and every error names the
path and the fix; `input_dataset` is the lazy Ray Dataset of its paths, one `path` column, each
path once. Nothing here holds the list on the driver:

- a folder or prefix is listed by Ray tasks (label/listing.py);
- a manifest is a .parquet or .csv file with a `path` column, or a folder of them (what
  `ray-fer list` writes, marked by its `_MANIFEST`; or any folder whose top level holds only
  .parquet / .csv files). Ray tasks read it, a file each, streaming its rows. Relative paths are
  taken from the manifest file's folder. A path listed twice is labelled once: except in a
  `ray-fer list` manifest (unique by construction), the paths' 128-bit keys are first sorted in
  one task to find repeats (store/pathsets.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ray_fer import cluster, ray_internals

from ray_fer.store import pathsets, storage
from ray_fer.config import UserError
from ray_fer.label.decode import IMAGE_EXTENSIONS
from ray_fer.schema import VIDEO_EXTENSIONS
from ray_fer.label.listing import LIST_CPUS, Shard, listing_dataset, plan_shards, shards_wanted

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".parquet", ".csv")
MANIFEST_MARKER = "_MANIFEST"  # JSON that `ray-fer list` writes last into a manifest folder
MANIFEST_BLOCK = 10_000  # rows per block a manifest-reading task yields
PATH_BYTES = 100  # about what one path takes in a block (local paths, s3:// URIs)
# Blocks a task may yield before the driver takes them, where blocks_of makes them small. Ray Data's
# default is 2 (a private DataContext setting: ray_internals.py), and with small blocks a
# decoded photo (~2 MB) is a block of its own: a decode task then waited on the driver after every
# 2 photos, and the predictors on it. 960 photos on 2 CPUs: 8.5 photos/s, one actor using 76 s of
# CPU and the other 30 s; 13-14 photos/s with 32 (bench_faces.py). 32 photos of 1280x960 hold
# ~70 MB; 32 blocks of FER2013 faces (~85 each) ~6 MB.
RUN_AHEAD_BLOCKS = 32


class InputError(UserError):
    """An input that cannot be labelled; the message names the path and the fix."""


@dataclass
class Inputs:
    """A checked input: a folder to list (`shards`) or manifest files to read (`manifests`)."""

    src: str
    shards: list[Shard] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    unique: bool = True  # the paths are known to be unique (a listing, or a ray-fer list manifest)
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # what a listing takes: images, and videos where faces are found

    @property
    def kind(self) -> str:
        return "manifest" if self.manifests else "folder"


def find_inputs(src: str, *, videos: bool = False) -> Inputs:
    """Check `src` and plan how to read it. Raises InputError naming the path and the fix when it
    is missing, unreadable, empty at its top level, or a manifest without a `path` column. With
    `videos` a listing takes video files (VIDEO_EXTENSIONS) beside the images."""
    import pyarrow.fs as pafs

    extensions = IMAGE_EXTENSIONS + (VIDEO_EXTENSIONS if videos else ())
    kind = storage.kind_of(src, "input")
    if kind == pafs.FileType.File:
        if not src.lower().endswith(MANIFEST_SUFFIXES):
            raise InputError(f"input {src!r} is a file; pass a folder, an s3:// prefix, or a .parquet or .csv "
                             "manifest with a 'path' column")
        _check_manifest(src, src)
        return Inputs(src, manifests=[src], unique=False, extensions=extensions)
    if kind == pafs.FileType.NotFound and not storage.is_remote(src):
        raise InputError(f"input {src!r} does not exist; pass a folder, an s3://bucket/prefix, or a .parquet or "
                         ".csv manifest with a 'path' column")
    manifests, marked = _manifest_folder(src)
    if manifests:
        _check_manifest(src, manifests[0])
        return Inputs(src, manifests=manifests, unique=marked, extensions=extensions)
    try:
        shards = plan_shards(src, wanted=shards_wanted(), extensions=extensions)
    except FileNotFoundError:
        shards = []
    except Exception as e:  # noqa: BLE001 - OSError locally; botocore's errors on S3
        raise InputError(f"cannot list input {src!r}: {storage.short_error(e)}; check the path{storage.hint(src)}")
    if not shards:
        raise no_images(src, extensions)
    return Inputs(src, shards=shards, extensions=extensions)


def no_images(src: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> InputError:
    return InputError(f"no images under {src!r} (looked for {', '.join(extensions)}, recursively); "
                      "check the path" + (" and the prefix" if storage.is_remote(src) else ""))


def _manifest_folder(src: str) -> tuple[list[str], bool]:
    """The manifest files of a folder that is a manifest (see the module's docstring), and
    whether `ray-fer list` wrote it; ([], False) for a folder of images."""
    if storage.exists(storage.join(src, MANIFEST_MARKER)):
        return _manifest_files(src), True
    first = _first_entries(src, 1000)
    if first and all(not is_dir and _is_manifest_name(uri) for uri, is_dir in first
                     if not storage.basename(uri).startswith(("_", "."))):
        return _manifest_files(src), False
    return [], False


def _first_entries(src: str, n: int) -> list[tuple[str, bool]]:
    """Up to n entries of a folder's top level, (uri, is_dir): one request on S3."""
    if storage.is_remote(src):
        bucket, _, prefix = src[len("s3://"):].partition("/")
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        page = storage.s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=n)
        return ([(f"s3://{bucket}/{p['Prefix'].rstrip('/')}", True) for p in page.get("CommonPrefixes", [])]
                + [(f"s3://{bucket}/{o['Key']}", False) for o in page.get("Contents", [])
                   if not o["Key"].endswith("/")])
    out = []
    with os.scandir(os.path.expanduser(src)) as entries:
        for entry in entries:
            out.append((entry.path, entry.is_dir()))
            if len(out) >= n:
                break
    return out


def _is_manifest_name(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def _manifest_files(src: str) -> list[str]:
    files = [f for f in storage.list_files(src) if _is_manifest_name(f) and not storage.basename(f).startswith("_")]
    if not files:
        raise InputError(f"manifest folder {src!r} holds no .parquet or .csv files; list a store into it with "
                         "`ray-fer list`, or pass the image folder itself")
    return files


def _check_manifest(src: str, uri: str) -> None:
    """The first manifest file can be read and has a `path` column."""
    try:
        names = _columns(uri)
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"cannot read manifest {uri!r}: {storage.short_error(e)}") from None
    if "path" not in names:
        raise InputError(f"manifest {uri!r} has no 'path' column (it has: {', '.join(names)}); "
                         "add one with an image path or s3:// URI per row")


def _columns(uri: str) -> list[str]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    if uri.lower().endswith(".csv"):
        with fs.open_input_stream(path) as f:
            return pacsv.open_csv(f).schema.names
    return pq.read_schema(path, filesystem=fs).names


# --------------------------------------------------------------------------------------------
# The stream of paths


@contextlib.contextmanager
def blocks_of(rows: int) -> Iterator[None]:
    """Ray Datasets created inside carry blocks of about `rows` paths, and each later stage
    blocks of at most as many bytes (`DataContext.target_max_block_size`, which a dataset copies
    when it is created). Ray Data joins what one task yields into blocks of that size, by default
    128 MB: a million paths, which would leave a store's decoding to a handful of tasks; one
    decode task per block of `rows` paths keeps every CPU busy and the first rows early. Tasks
    may run RUN_AHEAD_BLOCKS such blocks ahead of the driver taking them."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size
    context.target_max_block_size = rows * PATH_BYTES
    try:
        with ray_internals.streaming_run_ahead(RUN_AHEAD_BLOCKS):
            yield
    finally:
        context.target_max_block_size = saved


def input_dataset(inputs: Inputs, *, with_size: bool = False):
    """The lazy Ray Dataset of the input's paths (`path`, and with `with_size` the file's `size`
    where a listing knows it), each once. Repeats in a manifest are found first (one pass over
    its `path` columns) and logged."""
    import ray.data

    if inputs.shards:
        wanted = shards_wanted()
        if len(inputs.shards) < wanted:  # planned before joining a cluster bigger than MIN_SHARDS wants
            inputs.shards = plan_shards(inputs.src, wanted=wanted, extensions=inputs.extensions) or inputs.shards
        return listing_dataset(inputs.shards, extensions=inputs.extensions, with_size=with_size)
    files = [{"uri": uri, "index": i} for i, uri in enumerate(inputs.manifests)]
    repeats: Any = None
    if not inputs.unique:
        parts = [cluster.submit(_manifest_keys, f["uri"], f["index"], num_returns=1) for f in files]
        repeats = cluster.submit(pathsets.find_repeats, *parts, num_returns=1)
        count = cluster.fetch(cluster.submit(_count_repeats, repeats))
        if count:
            log.warning("manifest %s lists %s paths more than once; each is labelled once", inputs.src, f"{count:,}")
    return ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        _read_manifest_batch, fn_kwargs={"repeats": repeats}, batch_size=1, batch_format="pyarrow",
        num_cpus=LIST_CPUS,
    )


def _count_repeats(repeats: tuple[Any, Any, int]) -> int:
    return repeats[2]


def read_manifest(uri: str):
    """The resolved `path` column of one manifest file, in blocks of MANIFEST_BLOCK rows.
    Relative paths are taken from the file's folder. Raises InputError for a missing column or
    an empty path."""
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    local = not storage.is_remote(uri)
    try:
        if uri.lower().endswith(".csv"):
            stream = fs.open_input_stream(path)
            batches = iter(pacsv.open_csv(stream, read_options=pacsv.ReadOptions(block_size=1 << 20),
                                          convert_options=pacsv.ConvertOptions(include_columns=["path"],
                                                                               column_types={"path": pa.string()})))
        else:
            stream = fs.open_input_file(path)
            parquet = pq.ParquetFile(stream)
            if "path" not in parquet.schema_arrow.names:
                raise KeyError("path")
            batches = parquet.iter_batches(batch_size=MANIFEST_BLOCK, columns=["path"])
    except (KeyError, pa.ArrowInvalid) as e:
        raise InputError(f"manifest {uri!r} has no 'path' column, or cannot be read ({storage.short_error(e)}); "
                         "give every manifest file a 'path' column") from None
    with stream:
        for batch in batches:
            paths = batch.column("path").cast(pa.string())
            if paths.null_count or pc.any(pc.equal(pc.utf8_trim_whitespace(paths), "")).as_py():
                raise InputError(f"manifest {uri!r} has empty paths; give every row an image path")
            absolute = pc.or_(pc.starts_with(paths, "s3://"), pc.starts_with(paths, "/"))
            if not pc.all(absolute).as_py():
                values = paths.to_pylist()
                resolved = [p if storage.is_remote(p) or os.path.isabs(p) else storage.join(base, p) for p in values]
                if local:
                    resolved = [p if storage.is_remote(p) else os.path.abspath(p) for p in resolved]
                paths = pa.array(resolved, pa.string())
            yield paths


def _manifest_keys(uri: str, index: int) -> tuple[Any, Any]:
    """(keys, positions) of a manifest file's resolved paths, for `pathsets.find_repeats`."""
    import numpy as np

    keys, positions, start = [], [], 0
    for paths in read_manifest(uri):
        keys.append(pathsets.keys_of(paths))
        positions.append((index << 32) + start + np.arange(len(paths), dtype=np.int64))
        start += len(paths)
    if not keys:
        return np.empty(0, pathsets.KEY), np.empty(0, np.int64)
    return np.concatenate(keys), np.concatenate(positions)


def _read_manifest_batch(batch: pa.Table, *, repeats: Any):
    import numpy as np
    import ray

    if isinstance(repeats, ray.ObjectRef):
        repeats = ray.get(repeats)
    for row in batch.to_pylist():
        start = 0
        for paths in read_manifest(row["uri"]):
            if repeats is not None and len(repeats[0]):
                positions = (row["index"] << 32) + start + np.arange(len(paths), dtype=np.int64)
                drop = pathsets.drop_repeats(pathsets.keys_of(paths), positions, repeats[0], repeats[1])
                start += len(paths)
                paths = paths.filter(pa.array(~drop))
            yield pa.table({"path": paths})


# --------------------------------------------------------------------------------------------
# Small inputs and `ray-fer list`


def list_inputs(src: str) -> pa.Table:
    """The input's paths as one table on the driver: a folder's sorted, a manifest's in its
    order. For small inputs and tests; the labelling pipeline streams them instead."""
    inputs = find_inputs(src)
    cluster.connect()
    tables = [t for t in cluster.fetch(input_dataset(inputs).to_arrow_refs()) if t.num_rows]
    paths = pa.concat_tables(tables)["path"] if tables else pa.chunked_array([], pa.string())
    if not len(paths):
        raise no_images(src)
    table = pa.table({"path": paths.combine_chunks()})
    return table.sort_by("path") if inputs.shards else table


def write_manifest(src: str, dst: str, *, overwrite: bool = False) -> dict[str, Any]:
    """`ray-fer list`: list `src` (a folder, s3:// prefix, or manifest) into a manifest folder
    `dst` of Parquet files with `path` and `size` columns, then `_MANIFEST` (JSON: source, count,
    files), so that a huge store is listed once and labelled many times. Returns the summary."""
    import time

    import pyarrow.fs as pafs

    started = time.perf_counter()
    inputs = find_inputs(src)
    if storage.kind_of(dst, "output") == pafs.FileType.File:
        raise InputError(f"manifest folder {dst!r} is a file; pass a folder or s3:// prefix")
    existing = [uri for uri, _ in _listed(dst)]
    if existing and not overwrite:
        raise InputError(f"manifest folder {dst!r} is not empty ({len(existing)} entries); pass --overwrite to "
                         "replace it, or another --output")
    foreign = [u for u in existing if not (_is_manifest_name(u) or storage.basename(u) == MANIFEST_MARKER)]
    if foreign:
        raise InputError(f"manifest folder {dst!r} holds files ray-fer list did not write (e.g. {foreign[0]!r}); "
                         "pick an empty or new --output")
    cluster.connect()
    cluster.refuse_local_paths({"input": src, "output": dst})
    for uri in existing:  # the marker first: a folder without it is not taken for a finished list
        if storage.basename(uri) == MANIFEST_MARKER:
            storage.delete_file(uri)
    for uri in existing:
        if storage.basename(uri) != MANIFEST_MARKER:
            storage.delete_file(uri)
    ds = input_dataset(inputs, with_size=True)
    with storage.stop_on_read_errors("Nothing was listed: run again once the store answers"):
        ds.write_parquet(dst, min_rows_per_file=1_000_000)
    files = sorted(f for f in storage.list_files(dst) if f.endswith(".parquet"))
    count = sum(_rows(f) for f in files)
    if not count:
        for uri in files:
            storage.delete_file(uri)
        raise no_images(src)
    summary = {"source": src, "output": dst, "images": count, "files": [storage.basename(f) for f in files],
               "seconds": round(time.perf_counter() - started, 2)}
    storage.write_bytes(storage.join(dst, MANIFEST_MARKER), json.dumps(summary, indent=2).encode())
    log.info("listed %s images under %s into %s", f"{count:,}", src, dst)
    return summary


def _listed(dst: str) -> list[tuple[str, bool]]:
    try:
        return storage.list_dir(dst)
    except FileNotFoundError:
        return []


def _rows(uri: str) -> int:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    return pq.read_metadata(path, filesystem=fs).num_rows
