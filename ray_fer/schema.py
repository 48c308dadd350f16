"""The columns of a labelled output, shared by what writes rows (the predictors) and what
stores them (the output protocol): the prediction and face columns, the Parquet schema, and the
error text of a file that could not be read.

One row per input file; with faces, one per face and one for a file without a face:

    path, [face, box_x, box_y, box_w, box_h, face_score, <landmark>_x/_y ...,]
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
