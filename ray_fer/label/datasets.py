"""Ray Datasets from image folders: list (path, label), read bytes, decode to uint8 arrays.

An image folder is `<root>/<class>/**/<image>` with the seven expression names as class folders
(matched case-insensitively). A labelled folder is listed on the driver and fails fast with a
clear error (training and evaluation sets: thousands to a few million files); labelling streams
its inputs from listing tasks instead (label/inputs.py). Reading and decoding run as Ray Data tasks in
batches (much faster than `read_images` on small files).
"""

from __future__ import annotations

from dataclasses import dataclass

import logging
import random
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from ray_fer.store import storage
from ray_fer.config import UserError
from ray_fer.label.decode import IMAGE_EXTENSIONS, ImageError, decode_image, decode_photo
from ray_fer.labels import CLASSES, class_index
from ray_fer.malloc import keep_freed_memory
from ray_fer.schema import READ_ERROR_PREFIX

log = logging.getLogger(__name__)

DECODE_BATCH = 2048  # most rows per read-and-decode task: ~0.15 s of FER work, so task overhead is small
MIN_DECODE_BATCH = 256  # fewest rows a task gets when the input is split to use every CPU
MIN_PHOTO_DECODE_BATCH = 16  # fewest files per task when faces are detected: photos take ~20 ms each
# most files per decode task of a streamed input when faces are detected: 64 photos take ~1.3 s;
# under --faces auto a store may hold face crops (~0.1 ms each), for which 64 files leave the tasks
# mostly overhead (FER2013 train at 201 img/s against 533 whole), so as many as whole's (a store of
# photos: ~40 s a task, its blocks streamed to the predictors as they are decoded)
PHOTO_DECODE_BATCH = {"detect": 64, "auto": 2048}
# decoded photos per output block of a decode task: ~16 1280x960 photos, where the dataset's blocks
# may be that big (evaluation); under `ray-fer infer` the paths' small blocks make each photo a block
# (see inputs.RUN_AHEAD_BLOCKS)
PHOTO_BLOCK_BYTES = 32 * 1024**2
AUTO_WHOLE_SIDE = 128  # --faces auto: an image no longer than this (FER2013: 48) is a face crop, labelled whole
PHOTO_COLUMNS = ("detect", "detect_height", "detect_width", "gray", "gray_height", "gray_width")


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
    log.info("listed %s images in %s (%s)", f"{len(paths):,}", root,
             ", ".join(f"{c} {counts[c]}" for c in CLASSES))
    return pa.table({"path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.int64())})


def decode_batch(batch: dict[str, Any], *, decode_size: int) -> dict[str, Any]:
    """Ray Data batch function: read each `path` and decode it to a (decode_size, decode_size) array.

    Every row stays. Adds `image` (uint8; zeros where it failed), `width`, `height` and `error`:
    None, or a short reason for a file that is missing or is not a readable image. A read that
    keeps failing for another reason (throttling, a network or permission error) raises
    `storage.ReadError` after retries: it is the store's state, not the file's, so no row
    records it. Other columns pass through.
    """
    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    images = np.zeros((n, decode_size, decode_size), dtype=np.uint8)
    widths = np.zeros(n, dtype=np.int32)
    heights = np.zeros(n, dtype=np.int32)
    errors: list[str | None] = [None] * n
    for i, blob in enumerate(storage.read_each(paths)):  # streamed: a few files in memory at a time
        if isinstance(blob, FileNotFoundError):
            errors[i] = READ_ERROR_PREFIX + "not found"
            continue
        try:
            images[i], widths[i], heights[i] = decode_image(blob, decode_size)
        except ImageError as e:
            errors[i] = str(e)
    return dict(batch) | {"image": images, "width": widths, "height": heights,
                          "error": np.array(errors, dtype=object)}


def decode_photos(batch: dict[str, Any], *, decode_size: int, detect_size: int, faces: str, fps: float = 2.0):
    """Ray Data batch function for face detection: read and decode each `path` once
    (`decode.decode_photo`), yielding a block whenever PHOTO_BLOCK_BYTES of decoded photos have
    gathered, so that a task holds a few photos at a time whatever its size (a store of face
    crops under --faces auto still makes one block per task).

    Every image row stays. Adds what `decode_batch` adds (`image` holds the whole image where it is
    a face crop: --faces auto and a small image; zeros elsewhere) and the photo's two copies as raw
    bytes with their sizes: `detect` (RGB), `gray` (PHOTO_COLUMNS; empty for crops and errors),
    and `frame` (-1) and `time_s` (NaN). A video segment's row (`label/videos.expand_videos`: its
    `video_start` is a number) becomes one row per sampled frame, with its `frame` and `time_s`,
    and one error row (`time_s` where it broke; NaN where the file could not be opened) where
    decoding breaks.
    """
    keep_freed_memory()  # each frame's copies reuse the last one's memory (ray_fer/malloc.py)
    from ray_fer.label.videos import SEGMENT_COLUMNS
    from ray_fer.video.decode import VideoError, decode_frames

    whole_max_side = AUTO_WHOLE_SIDE if faces == "auto" else 0
    paths = [str(p) for p in batch["path"]]
    starts = np.asarray(batch.get("video_start", np.full(len(paths), np.nan)), dtype=np.float64)
    ends = np.asarray(batch.get("video_end", np.full(len(paths), np.nan)), dtype=np.float64)
    sizes = ("width", "height", "detect_height", "detect_width", "gray_height", "gray_width")
    passed = {k: np.asarray(v) for k, v in batch.items() if k not in SEGMENT_COLUMNS}
    rows: list[dict[str, Any]] = []
    held = 0  # bytes of decoded photos gathered

    def block() -> dict[str, Any]:
        src = np.array([r["src"] for r in rows], dtype=np.int64)
        out: dict[str, Any] = {name: np.array([r.get(name, 0) for r in rows], dtype=np.int32) for name in sizes}
        out["image"] = np.zeros((len(rows), decode_size, decode_size), dtype=np.uint8)
        for i, r in enumerate(rows):
            if "face" in r:
                out["image"][i] = r["face"]
        for name, missing in (("detect", b""), ("gray", b""), ("error", None)):
            out[name] = np.empty(len(rows), dtype=object)
            out[name][:] = [r.get(name, missing) for r in rows]
        out["frame"] = np.array([r.get("frame", -1) for r in rows], dtype=np.int32)
        out["time_s"] = np.array([r.get("time_s", np.nan) for r in rows], dtype=np.float64)
        return {k: v[src] for k, v in passed.items()} | out

    def photo_row(i: int, width: int, height: int, detect: np.ndarray, gray: np.ndarray) -> dict[str, Any]:
        nonlocal held
        held += detect.nbytes + gray.nbytes
        return {"src": i, "width": width, "height": height, "detect": detect.tobytes(), "gray": gray.tobytes(),
                "detect_height": detect.shape[0], "detect_width": detect.shape[1],
                "gray_height": gray.shape[0], "gray_width": gray.shape[1]}

    images = [i for i in range(len(paths)) if np.isnan(starts[i])]
    for i, blob in zip(images, storage.read_each([paths[i] for i in images])):  # a few files in memory at a time
        row: dict[str, Any] = {"src": i}
        if isinstance(blob, FileNotFoundError):
            row["error"] = READ_ERROR_PREFIX + "not found"
        else:
            try:
                photo = decode_photo(blob, detect_size=detect_size, size=decode_size, whole_max_side=whole_max_side)
            except ImageError as e:
                row["error"] = str(e)
            else:
                if photo.face is not None:
                    row |= {"width": photo.width, "height": photo.height, "face": photo.face}
                else:
                    row = photo_row(i, photo.width, photo.height, photo.detect, photo.gray)
        rows.append(row)
        if held >= PHOTO_BLOCK_BYTES:
            yield block()
            held, rows = 0, []
    for i in np.flatnonzero(~np.isnan(starts)):  # video segments: their sampled frames, streamed
        try:
            for frame in decode_frames(paths[i], start_s=starts[i], end_s=ends[i], fps=fps, detect_size=detect_size):
                rows.append(photo_row(int(i), frame.width, frame.height, frame.detect, frame.gray)
                            | {"frame": frame.index, "time_s": frame.time_s})
                if held >= PHOTO_BLOCK_BYTES:
                    yield block()
                    held, rows = 0, []
        except FileNotFoundError:
            rows.append({"src": int(i), "error": READ_ERROR_PREFIX + "not found"})
        except VideoError as e:
            rows.append({"src": int(i), "error": str(e), "time_s": np.nan if e.at_s is None else e.at_s})
    if rows:
        yield block()


def decoded_dataset(source: Any, *, decode_size: int, decode_batch_size: int = DECODE_BATCH,
                    num_cpus: float = 1.0, faces: str = "whole", detect_size: int = 640, tally: Any = None,
                    videos: "VideoOptions | None" = None):
    """The lazy read-and-decode stage over a `path` column, adding `image` (uint8), `width`,
    `height` and `error` (see `decode_batch`); one row per input row, other columns kept. With
    `faces` "detect" or "auto", `decode_photos` instead (the photos' copies for the detector).

    `source` is a Ray Dataset (a listing or a manifest, streamed: one decode task per block, so
    its blocks should be made about `decode_batch_size` rows, see `inputs.blocks_of`) or a
    pyarrow Table (a labelled folder for evaluation: split evenly into tasks of at most
    `decode_batch_size` files and at least one per cluster CPU while each still gets
    MIN_DECODE_BATCH files, with faces MIN_PHOTO_DECODE_BATCH). `tally` (a `pathsets.Tally`
    actor) is told the digest of every block that reaches the decode tasks, as "todo".
    With `videos` (and faces), the video paths among them are cut into segments
    (`videos.expand_videos`, a light task whose blocks each become a decode task) and their
    sampled frames decoded as photos.
    """
    import ray
    import ray.data

    photos = faces != "whole"
    if isinstance(source, pa.Table):
        fewest = MIN_PHOTO_DECODE_BATCH if photos else MIN_DECODE_BATCH
        n = source.num_rows
        cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
        tasks = max(-(-n // decode_batch_size), min(cpus, n // fewest), 1)
        bounds = [i * n // tasks for i in range(tasks + 1)]
        # one input block per task, and batch_size=None so that Ray Data neither splits nor bundles them
        ds = ray.data.from_arrow([source.slice(start, stop - start) for start, stop in zip(bounds, bounds[1:])])
    else:
        ds = source
    if tally is not None:  # same resources as the decode stage: Ray Data runs both in one task
        from ray_fer.store.pathsets import tally_block

        ds = ds.map_batches(tally_block, fn_kwargs={"tally": tally, "name": "todo"}, batch_size=None,
                            batch_format="pyarrow", num_cpus=num_cpus)
    if photos and videos is not None:
        from ray_fer.label.videos import EXPAND_CPUS, expand_videos

        # on another share of a CPU than the decode stage, so that Ray Data does not fuse the two:
        # each segment's block is then a decode task of its own (fused, one task decoded every
        # segment of a video in turn: measured, a 5-minute video's 5 segments in one 30 s task)
        expand_cpus = EXPAND_CPUS if EXPAND_CPUS != num_cpus else EXPAND_CPUS / 2
        ds = ds.map_batches(expand_videos, fn_kwargs={"segment_s": videos.segment_s}, batch_size=None,
                            batch_format="pyarrow", num_cpus=expand_cpus)
    if photos:
        fn, kwargs = decode_photos, {"decode_size": decode_size, "detect_size": detect_size, "faces": faces,
                                     "fps": videos.fps if videos is not None else 0.0}
    else:
        fn, kwargs = decode_batch, {"decode_size": decode_size}
    return ds.map_batches(fn, fn_kwargs=kwargs, batch_size=None, batch_format="numpy", num_cpus=num_cpus)


@dataclass(frozen=True)
class VideoOptions:
    """How videos are sampled: frames per second (0: every frame) and seconds per decode task."""

    fps: float = 2.0
    segment_s: float = 60.0


EXAMPLES = 5  # undecodable files named in the warning; the rest are counted


def image_folder_dataset(table: pa.Table, *, decode_size: int, shuffle_seed: int | None = None,
                         photos_to_faces: Any = None, columns: tuple[str, ...] = ("image", "label")):
    """A materialised Ray Dataset of decoded (image, label) rows; undecodable files are left out
    and summed up in one warning (their count and the first few with their reasons).

    Materialised once: the uint8 faces are small (48x48 = 2.3 KB), so every epoch re-reads them
    from the object store instead of decoding again. With `shuffle_seed` the rows are put in a
    seeded random order first, so that every block mixes the classes (a listing is sorted by
    class) and random block order plus a local shuffle buffer make well-mixed batches.
    With `photos_to_faces` (training's data.faces=auto: `faces.views.faces_of_photos`), images
    bigger than AUTO_WHOLE_SIDE are decoded as photos and it turns each into its largest face's
    aligned crop (adding `photo` and `face_found`); smaller ones stay whole. `columns` are kept.
    """
    from ray.data.expressions import col

    if shuffle_seed is not None:
        table = table.take(np.random.default_rng(shuffle_seed).permutation(table.num_rows))
    if photos_to_faces is not None:
        decoded = photos_to_faces(decoded_dataset(table, decode_size=decode_size, faces="auto"))
    else:
        decoded = decoded_dataset(table, decode_size=decode_size).materialize()
    failed = decoded.filter(expr=col("error").is_not_null()).select_columns(["path", "error"]).materialize()
    skipped = failed.count()
    if skipped:
        examples = "; ".join(f"{r['path']}: {r['error']}" for r in failed.take(EXAMPLES))
        log.warning("left out %d of %d files that could not be decoded, e.g. %s", skipped, table.num_rows, examples)
    if skipped == table.num_rows:
        raise DataError("no image could be decoded; check that the files are images")
    return decoded.filter(expr=col("error").is_null()).select_columns(list(columns)).materialize()
