"""The columns of a labelled output, shared by what writes rows (the predictors) and what
stores them (the output protocol): the prediction and face columns, the Parquet schema, and the
error text of a file that could not be read.

One row per input file; with faces, one per face and one for a file without a face; for a video,
one per face per sampled frame (label/videos.py):

    path, [frame, time_s, track, face, box_x, box_y, box_w, box_h, face_score, <landmark>_x/_y ...,]
    label, confidence, prob_<class> ..., error, width, height, model
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

READ_ERROR_PREFIX = "cannot read file: "  # the `error` of a file that could not be read (not a content error)
PREDICTION_COLUMNS = ("label", "confidence")  # plus prob_<class>, error and model; see Predictor


# The detector's five points (faces/detector.py), left and right as seen in the image, not the person's.
LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
# What a face adds to a row (--faces detect / auto): its index in the photo, its box and score,
# and the five landmarks, in pixels of the upright source image.
FACE_COLUMNS = ("face", "box_x", "box_y", "box_w", "box_h", "face_score",
                *(f"{name}_{axis}" for name in LANDMARKS for axis in "xy"))
# What a video's face adds: the sampled frame's index in the stream and its time in seconds, and
# the person's track within the video; null for images. A video's `face` numbers its faces over
# all its frames in time order.
VIDEO_COLUMNS = ("frame", "time_s", "track")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
# A run with videos stages its rows partitioned on `kind`: new/kind=image/ (final), new/kind=video/
# (frames, before tracking), new/kind=tracked/ (label/videos.py).
KIND_COLUMN, IMAGE_KIND, VIDEO_KIND, TRACKED_KIND = "kind", "image", "video", "tracked"
_VIDEO_PATTERN = "(?i)(" + "|".join(e.replace(".", r"\.") for e in VIDEO_EXTENSIONS) + ")$"


def video_mask(paths: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """True where a path names a video (by its extension, any letter case)."""
    return pc.match_substring_regex(paths, _VIDEO_PATTERN)


def output_schema(classes: tuple[str, ...], *, faces: bool = False) -> pa.Schema:
    """The Parquet schema of a labelled output, identical in every file; with `faces`, one row per
    face, with FACE_COLUMNS after `path`."""
    face_fields = ([("frame", pa.int32()), ("time_s", pa.float64()), ("track", pa.int32()), ("face", pa.int32())]
                   + [(name, pa.float32()) for name in FACE_COLUMNS[1:]]) if faces else []
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


def to_output(table: pa.Table, *, schema: pa.Schema, counter: Any = None, kinds: bool = False) -> pa.Table:
    """Predictor output -> the output schema: columns in order, no size for undecoded files, the
    video columns null for images (missing, or the decode stage's -1 and NaN).

    `counter` (a `console.RayCounter` actor) is told the files done, for the progress display.
    With `kinds` a `kind` column ("image" or "video") is added for a write partitioned on it, and
    only images count as done: a video is done once its frames are tracked (label/videos.py)."""
    video = video_mask(table["path"]) if kinds else None
    if counter is not None:
        counter.add.remote(files_in(table.filter(pc.invert(video)) if kinds else table))
    failed = pc.is_valid(table["error"])
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        col = table[field.name]
        if field.name in ("width", "height"):
            col = pc.if_else(failed, pa.scalar(None, col.type), col)
        elif field.name == "frame":
            col = pc.if_else(pc.less(col, 0), pa.scalar(None, col.type), col)
        elif field.name == "time_s":
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
        columns.append(col.cast(field.type))
    out = pa.Table.from_arrays(columns, schema=schema)
    if kinds:
        out = out.append_column(KIND_COLUMN, pc.if_else(video, VIDEO_KIND, IMAGE_KIND))
    return out
