"""Listing a folder or s3:// prefix of any size in Ray tasks, as a stream of path blocks.

The driver plans and never holds the files: it expands the tree breadth-first, one folder
listing at a time (threads, at most PLAN_LISTINGS of them), until there are enough shards for
the cluster, and keeps only folder names. A shard is one of

- a folder or prefix listed recursively (the usual case: a sub-folder);
- a folder's own files, without its sub-folders (a folder whose sub-folders are shards);
- on S3, a range of keys under a prefix, (after, until], listed recursively: a level with more
  than PLAN_PAGES pages of entries is not enumerated on the driver but cut into ranges at the
  next character of the key, and ranges that still hold more than a page are cut again at the
  character after that (one probing LIST each), so a flat prefix of hashed or random names
  lists in parallel. Ranges partition the key space whatever characters keys use.

Each shard is listed by one Ray task (`LIST_CPUS`), which streams its paths on as blocks; the
shards run in parallel and the first blocks reach the pipeline while others still list. Local
folders are read with os.scandir; S3 with ListObjectsV2 (1,000 keys a page).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from ray_fer.store import storage

log = logging.getLogger(__name__)

# A listing task waits on the store, not the CPU. Not the decode tasks' share (0.25, 1): Ray Data
# fuses consecutive stages that ask for the same resources, and a listing fused with decoding
# decodes a whole shard in one task.
LIST_CPUS = 0.2
SHARDS_PER_CPU = 4  # shards wanted per cluster CPU (at least MIN_SHARDS): tasks of alike size
MIN_SHARDS = 64
PLAN_LISTINGS = 2_000  # folder listings (or S3 probes) the driver makes at most while planning
PLAN_PAGES = 10  # S3: a level with more pages of entries is cut into key ranges
LOCAL_LEVEL_ENTRIES = 100_000  # a local folder with more entries is listed whole by one task
PAGE_KEYS = 1000  # S3 keys per LIST page (S3's maximum)
BLOCK_PATHS = 10_000  # paths per block a listing task yields
# Where S3 key ranges are cut, in UTF-8 order: the characters of hashed, random and numbered names.
RANGE_CHARS = "-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
RANGE_DEPTH = 2  # characters after a prefix at which ranges are cut, at most


@dataclass(frozen=True)
class Shard:
    """What one listing task lists (see the module's docstring)."""

    uri: str  # a folder or s3:// prefix, without a trailing "/"
    recursive: bool = True  # everything below, or only the folder's own files
    after: str | None = None  # S3 ranges: keys (full keys, not URIs) strictly after this ...
    until: str | None = None  # ... and up to and including this one


def plan_shards(src: str, *, wanted: int, extensions: tuple[str, ...]) -> list[Shard]:
    """The shards that together list everything under `src`, each file in exactly one; [] when
    `src`'s own level holds no sub-folder and no file with one of `extensions`. Raises OSError
    (or botocore's errors) when it cannot be read."""
    import functools

    remote = storage.is_remote(src)
    src = src.rstrip("/") if remote else os.path.abspath(os.path.expanduser(src))
    exts = tuple(e.lower() for e in extensions)
    level = functools.partial(_s3_level if remote else _local_level, extensions=exts)
    shards: list[Shard] = []
    big: list[str] = []  # levels too big to enumerate here
    queue = [src]
    listings = 0
    with ThreadPoolExecutor(max_workers=16) as pool:
        while queue and len(shards) + len(big) + len(queue) < wanted and listings < PLAN_LISTINGS:
            # expand only as many folders as the shards still wanted need (at least 16 at a time)
            take = min(PLAN_LISTINGS - listings, max(16, wanted - len(shards) - len(big) - len(queue)))
            batch, queue = queue[:take], queue[take:]
            listings += len(batch)
            for folder, (subfolders, files, too_big) in zip(batch, pool.map(level, batch)):
                if too_big:
                    big.append(folder)
                    continue
                if files:
                    shards.append(Shard(folder, recursive=False))
                queue += subfolders
        if remote:
            shards += _split_ranges([Shard(folder) for folder in big], pool)
        else:
            shards += [Shard(folder) for folder in big]
    return shards + [Shard(folder) for folder in queue]


def _local_level(folder: str, extensions: tuple[str, ...]) -> tuple[list[str], bool, bool]:
    """A local folder's sub-folders, whether it has files of its own with these extensions, and
    whether it has more than LOCAL_LEVEL_ENTRIES entries (then one task lists it whole)."""
    subfolders: list[str] = []
    files = False
    with os.scandir(folder) as entries:
        for n, entry in enumerate(entries):
            if n >= LOCAL_LEVEL_ENTRIES:
                return [], False, True
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.path)
            else:
                files = files or entry.name.lower().endswith(extensions)
    return sorted(subfolders), files, False


def _s3_level(prefix_uri: str, extensions: tuple[str, ...]) -> tuple[list[str], bool, bool]:
    """An S3 prefix's sub-prefixes, whether it has keys of its own with these extensions, and
    whether it has more than PLAN_PAGES pages of entries (then it is cut into key ranges)."""
    bucket, prefix = _bucket_prefix(prefix_uri)
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/", PaginationConfig={"PageSize": PAGE_KEYS})
    subfolders: list[str] = []
    files = False
    for n, page in enumerate(pages):
        if n >= PLAN_PAGES:
            return [], False, True
        subfolders += [f"s3://{bucket}/{p['Prefix'].rstrip('/')}" for p in page.get("CommonPrefixes", [])]
        files = files or any(o["Key"].lower().endswith(extensions) for o in page.get("Contents", []))
    return subfolders, files, False


def _split_ranges(prefixes: list[Shard], pool: ThreadPoolExecutor) -> list[Shard]:
    """Cut S3 prefixes into key ranges at the next RANGE_DEPTH characters, probing each range
    once: empty ranges go, ranges of more than a page are cut again."""
    out: list[Shard] = []
    todo = [(s, 1) for s in prefixes]
    probes = 0
    while todo:
        cut = [(r, depth) for shard, depth in todo for r in _cut(shard, depth)]
        probes += len(cut)
        sizes = pool.map(_probe, [r for r, _ in cut])
        todo = []
        for (shard, depth), size in zip(cut, sizes):
            if size > PAGE_KEYS and depth < RANGE_DEPTH and probes < PLAN_LISTINGS:
                todo.append((shard, depth + 1))
            elif size:
                out.append(shard)
    return out


def _cut(shard: Shard, depth: int) -> list[Shard]:
    """`shard`'s key range cut at the characters RANGE_CHARS at position `depth` after its prefix."""
    _, prefix = _bucket_prefix(shard.uri)
    stem = prefix if shard.after is None else shard.after[:len(prefix) + depth - 1]
    points = [stem + c for c in RANGE_CHARS]
    points = [p for p in points if (shard.after is None or p > shard.after) and (shard.until is None or p < shard.until)]
    bounds = [shard.after, *points, shard.until]
    return [Shard(shard.uri, after=lo, until=hi) for lo, hi in zip(bounds, bounds[1:])]


def _probe(shard: Shard) -> int:
    """How many keys (up to PAGE_KEYS + 1) lie in an S3 shard's range: one LIST request."""
    bucket, prefix = _bucket_prefix(shard.uri)
    args: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_KEYS}
    if shard.after is not None:
        args["StartAfter"] = shard.after
    page = storage.s3_client().list_objects_v2(**args)
    keys = [o["Key"] for o in page.get("Contents", []) if shard.until is None or o["Key"] <= shard.until]
    return len(keys) + (1 if len(keys) == PAGE_KEYS and page.get("IsTruncated") else 0)


# --------------------------------------------------------------------------------------------
# Listing one shard (in a Ray task)


def list_shard(shard: Shard, *, extensions: tuple[str, ...], with_size: bool = False) -> Iterator[pa.Table]:
    """The files of one shard with these extensions (any letter case), as tables of `path`
    (and `size` in bytes) of at most BLOCK_PATHS rows. Raises storage.ReadError naming the shard
    when the store cannot be listed."""
    exts = tuple(e.lower() for e in extensions)
    entries = _s3_entries(shard) if storage.is_remote(shard.uri) else _local_entries(shard.uri, shard.recursive)
    paths: list[str] = []
    sizes: list[int] = []
    try:
        for path, size in entries:
            if not path.lower().endswith(exts):
                continue
            paths.append(path)
            if with_size:
                sizes.append(size() if callable(size) else size)
            if len(paths) >= BLOCK_PATHS:
                yield _block(paths, sizes, with_size)
                paths, sizes = [], []
    except Exception as e:  # noqa: BLE001 - OSError locally; botocore's ClientError, connection errors on S3
        if isinstance(e, OSError) or type(e).__module__.startswith("botocore"):
            raise storage.ReadError(f"cannot list {shard.uri}: {storage.short_error(e)}{storage.hint(shard.uri)}") from e
        raise
    if paths:
        yield _block(paths, sizes, with_size)


def _block(paths: list[str], sizes: list[int], with_size: bool) -> pa.Table:
    columns = {"path": pa.array(paths, pa.string())}
    if with_size:
        columns["size"] = pa.array(sizes, pa.int64())
    return pa.table(columns)


def _local_entries(folder: str, recursive: bool) -> Iterator[tuple[str, Any]]:
    """(path, size or a function giving it) of the files under a local folder; sub-folders are
    entered unless they are symbolic links (no loops)."""
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            subfolders = []
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(entry.path)
                elif entry.is_file():
                    yield entry.path, (lambda e=entry: e.stat().st_size)
        if recursive:
            stack += sorted(subfolders, reverse=True)


def _s3_entries(shard: Shard) -> Iterator[tuple[str, int]]:
    bucket, prefix = _bucket_prefix(shard.uri)
    args: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": PAGE_KEYS}}
    if not shard.recursive:
        args["Delimiter"] = "/"
    if shard.after is not None:
        args["StartAfter"] = shard.after
    for page in storage.s3_client().get_paginator("list_objects_v2").paginate(**args):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if shard.until is not None and key > shard.until:
                return
            if not key.endswith("/"):  # folder markers
                yield f"s3://{bucket}/{key}", obj["Size"]


def _bucket_prefix(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b/"): the prefix of the keys under that folder."""
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


# --------------------------------------------------------------------------------------------
# The stream


def listing_dataset(shards: list[Shard], *, extensions: tuple[str, ...], with_size: bool = False):
    """A lazy Ray Dataset of `path` (and `size`): one listing task per shard, blocks streamed."""
    import ray.data

    items = [asdict(s) for s in shards]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        _list_batch, fn_kwargs={"extensions": extensions, "with_size": with_size},
        batch_size=1, batch_format="pyarrow", num_cpus=LIST_CPUS,
    )


def _list_batch(batch: pa.Table, *, extensions: tuple[str, ...], with_size: bool) -> Iterator[pa.Table]:
    for row in batch.to_pylist():
        yield from list_shard(Shard(**row), extensions=extensions, with_size=with_size)


def shards_wanted() -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(MIN_SHARDS, SHARDS_PER_CPU * cpus)
