"""Ray Datasets from image folders: list (path, label), read bytes, decode to uint8 arrays.

An image folder is `<root>/<class>/**/<image>` with the seven expression names as class folders
(matched case-insensitively). Listing happens on the driver and fails fast with a clear error;
reading and decoding run as Ray Data tasks in batches (much faster than `read_images` on small files).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from ray_fer import storage
from ray_fer.config import UserError
from ray_fer.decode import IMAGE_EXTENSIONS, ImageError, decode_image
from ray_fer.labels import CLASSES, class_index

log = logging.getLogger(__name__)

DECODE_BATCH = 2048  # most rows per read-and-decode task: ~0.15 s of FER work, so task overhead is small
MIN_DECODE_BATCH = 256  # fewest rows a task gets when the input is split to use every CPU


class DataError(UserError):
    """An input folder that cannot be used; the message names the path and the fix."""


def find_split(root: str, split: str) -> str:
    """`<root>/<split>`, accepting `validation/` for `val` and any letter case."""
    names = {"val": ("val", "validation"), "validation": ("val", "validation")}.get(split, (split,))
    if not storage.is_dir(root):
        raise DataError(f"data folder {root!r} does not exist; pass DATA=PATH to a folder with train/ and val/")
    for child, is_dir in storage.list_dir(root):
        if is_dir and storage.basename(child).lower() in names:
            return child
    raise DataError(f"{root!r} has no {'/ or '.join(names)}/ folder; expected {root}/{names[0]}/<class>/*.jpg")


def list_image_folder(root: str, *, limit_per_class: int | None = None, seed: int = 0) -> pa.Table:
    """List an image folder as a table of (path: string, label: int64), checking its layout.

    Raises DataError when the folder is missing, has no class folders, has folders that are not
    expression classes, or holds no images. A missing or empty class is logged, not fatal.
    """
    try:
        children = storage.list_dir(root)
    except FileNotFoundError:
        children = None
    if children is None or not storage.is_dir(root):
        raise DataError(f"image folder {root!r} does not exist; check data.train / data.val")
    folders = [c for c, is_dir in children if is_dir]
    if not folders:
        raise DataError(f"image folder {root!r} has no class folders; expected {root}/<class>/*.jpg "
                        f"with classes {', '.join(CLASSES)}")
    unknown = [storage.basename(f) for f in folders if storage.basename(f).lower() not in CLASSES]
    if unknown:
        raise DataError(f"image folder {root!r} has folders that are not expression classes: "
                        f"{', '.join(sorted(unknown))}; class folders must be named {', '.join(CLASSES)} "
                        "(any letter case)")
    paths: list[str] = []
    labels: list[int] = []
    counts: Counter[str] = Counter()
    rng = random.Random(seed)
    for folder in folders:
        label = class_index(storage.basename(folder))
        files = storage.list_files(folder, IMAGE_EXTENSIONS)
        if limit_per_class is not None and len(files) > limit_per_class:
            files = sorted(rng.sample(files, limit_per_class))
        counts[CLASSES[label]] += len(files)
        paths += files
        labels += [label] * len(files)
    missing = [c for c in CLASSES if counts[c] == 0]
    if missing:
        log.warning("image folder %s has no images for: %s", root, ", ".join(missing))
    if not paths:
        raise DataError(f"image folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    log.info("listed %d images in %s (%s)", len(paths), root,
             ", ".join(f"{c} {counts[c]}" for c in CLASSES))
    return pa.table({"path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.int64())})


def decode_batch(batch: dict[str, Any], *, decode_size: int, keep_errors: bool) -> dict[str, Any]:
    """Ray Data batch function: read each `path` and decode it to a (decode_size, decode_size) array.

    With keep_errors, every row stays and failures fill `error` (image zeros); without, failed rows
    are dropped and logged. Adds `image` (uint8), `width`, `height`, and `error` when kept.
    """
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    images = np.zeros((n, decode_size, decode_size), dtype=np.uint8)
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    errors: list[str | None] = [None] * n
    for i, blob in enumerate(storage.read_each(paths)):  # streamed: a few files in memory at a time
        if isinstance(blob, BaseException):
            errors[i] = f"cannot read file: {type(blob).__name__}: {blob}"[:200]
            continue
        try:
            images[i], widths[i], heights[i] = decode_image(blob, decode_size)
        except ImageError as e:
            errors[i] = str(e)
    out = dict(batch)
    out.update(image=images, width=widths, height=heights)
    if keep_errors:
        out["error"] = np.array(errors, dtype=object)
        return out
    ok = np.array([e is None for e in errors], dtype=bool)
    for i, err in enumerate(errors):
        if err is not None:
            log.warning("skipping %s: %s", paths[i], err)
    return {k: (np.asarray(v)[ok] if len(v) == n else v) for k, v in out.items()}


def decoded_dataset(
    table: pa.Table, *, decode_size: int, keep_errors: bool, decode_batch_size: int = DECODE_BATCH,
    num_cpus: float = 1.0,
):
    """The lazy read-and-decode stage over a table with a `path` column, adding `image` (uint8),
    `width`, `height` (and `error` with keep_errors; without, failed rows are dropped and logged).
    Other columns are kept.

    The table is split evenly into CPU tasks of at most `decode_batch_size` files, and into at
    least one task per cluster CPU while each still gets MIN_DECODE_BATCH files, so a store of
    big photos keeps every CPU busy.
    """
    import ray
    import ray.data

    n = table.num_rows
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    tasks = max(-(-n // decode_batch_size), min(cpus, n // MIN_DECODE_BATCH), 1)
    bounds = [i * n // tasks for i in range(tasks + 1)]
    # one input block per task, and batch_size=None so that Ray Data neither splits nor bundles them
    slices = [table.slice(start, stop - start) for start, stop in zip(bounds, bounds[1:])]
    return ray.data.from_arrow(slices).map_batches(
        decode_batch, fn_kwargs={"decode_size": decode_size, "keep_errors": keep_errors},
        batch_size=None, batch_format="numpy", num_cpus=num_cpus,
    )


def image_folder_dataset(table: pa.Table, *, decode_size: int, shuffle_seed: int | None = None):
    """A materialised Ray Dataset of decoded (image, label) rows; undecodable files are skipped.

    Materialised once: the uint8 faces are small (48x48 = 2.3 KB), so every epoch re-reads them
    from the object store instead of decoding again. With `shuffle_seed` the rows are put in a
    seeded random order first, so that every block mixes the classes (a listing is sorted by
    class) and random block order plus a local shuffle buffer make well-mixed batches.
    """
    if shuffle_seed is not None:
        table = table.take(np.random.default_rng(shuffle_seed).permutation(table.num_rows))
    decoded = decoded_dataset(table, decode_size=decode_size, keep_errors=False).select_columns(
        ["image", "label"]).materialize()
    kept = decoded.count()
    if kept < table.num_rows:
        log.warning("skipped %d of %d files that could not be decoded (see warnings above)",
                    table.num_rows - kept, table.num_rows)
    if kept == 0:
        raise DataError("no image could be decoded; check that the files are images")
    return decoded
