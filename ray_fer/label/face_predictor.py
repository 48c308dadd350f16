"""The predictor for photos: find, align and label every face, one row per face.

`FacePredictor` is `predictor.Predictor` with the face detector (faces/detector.py) loaded beside the
model, once per actor, on the same device. A batch of decoded photos (`data.decode_photos`) ->
MTCNN in chunks of photos, each searched as if alone (`faces.FaceDetector.detect`) -> aligned
48x48 crops cut from each photo's gray copy on the device -> the model, all faces of the batch in
one call -> rows:

- one row per face, left to right (`face` 0, 1, ...), with its box, score and landmarks;
- one row for a photo in which no face was found (`face`, `label` and `error` null);
- one row for a file that could not be read or decoded (`error` set);
- with --faces auto, one row for an image small enough to be a face crop (`face` 0, the box the
  square it was centre-cropped to, `face_score` and the landmarks null).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ray_fer.label.datasets import PHOTO_COLUMNS
from ray_fer.malloc import keep_freed_memory
from ray_fer.faces.detector import Detections, FaceDetector, align_matrices, crop_faces
from ray_fer.schema import FACE_COLUMNS, PREDICTION_COLUMNS
from ray_fer.label.predictor import Predictor, arrow_column, no_error, with_non_finite

# photos per detector pass: bounds the P-Net's activations. On one CPU thread, 1280x960 photos
# (bench_faces.py): 4 a pass ran at 12.2 photos/s, 16 at 9, 1 at 11.4.
DETECT_CHUNK = {"cpu": 4, "cuda": 64}


PIXEL_COLUMNS = ("detect", "gray")  # a photo's (or frame's) two copies: megabytes a row


def numpy_batch(table: pa.Table) -> dict[str, Any]:
    """A pyarrow batch as the dict of NumPy arrays the predictor reads, with each row's photo
    copies as read-only NumPy views on the Arrow buffers rather than bytes objects: a sampled
    1080p frame is 2.7 MB, and each copy of it costs more than its detection's share on a CPU
    (docs/labelling.md#measured)."""
    from ray.data.block import BlockAccessor

    light = [c for c in table.column_names if c not in PIXEL_COLUMNS]
    out = BlockAccessor.for_block(table.select(light)).to_batch_format("numpy")
    for name in PIXEL_COLUMNS:
        if name in table.column_names:
            out[name] = _views(table[name])
    return out


def _views(column: pa.ChunkedArray) -> np.ndarray:
    """The values of a binary column as an object array of uint8 views on its data buffers."""
    views = np.empty(len(column), dtype=object)
    i = 0
    for chunk in column.chunks:
        _, offsets, data = chunk.buffers()
        kind = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        bounds = np.frombuffer(offsets, dtype=kind)[chunk.offset:chunk.offset + len(chunk) + 1]
        raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, dtype=np.uint8)
        for k in range(len(chunk)):
            views[i] = raw[bounds[k]:bounds[k + 1]]
            i += 1
    return views


class FacePredictor(Predictor):
    """Ray Data callable class for photos: the Predictor's model plus the face detector.

    A batch holds, per file, what `data.decode_photos` adds (the photo's `detect` and `gray`
    copies and their sizes, `image`, `width`, `height`, `error`) and the input's own columns,
    which are passed through to every row of the file. The result is a pyarrow Table of
    FACE_COLUMNS, `label`, `confidence`, `prob_<class>`, `error` and `model`, one or more rows per
    file (see the module's docstring).
    """

    def __init__(self, model: Any, **kwargs: Any) -> None:
        keep_freed_memory()
        super().__init__(model, **kwargs)
        # the gray copies are read-only views on Ray's buffers (numpy_batch); the crops only read them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        self.detector = FaceDetector(self.device)
        self.detect_chunk = DETECT_CHUNK[self.device.type]  # photos per detector pass; the model's rows per call stay `chunk`

    def __call__(self, batch: dict[str, np.ndarray] | pa.Table) -> pa.Table:
        if isinstance(batch, pa.Table):
            batch = numpy_batch(batch)
        n = len(batch["path"])
        ok = no_error(batch["error"]) if "error" in batch else np.ones(n, dtype=bool)
        width, height = np.asarray(batch["width"]), np.asarray(batch["height"])
        photo = ok & (np.asarray(batch["detect_width"]) > 0)
        found = self._detect(batch, np.flatnonzero(photo))

        rows: list[int] = []  # the batch row of each output row
        faces: list[int | None] = []
        boxes: list[np.ndarray] = []  # (k, 4) x, y, w, h per file
        scores: list[np.ndarray] = []
        points: list[np.ndarray] = []  # (k, 10)
        crops: list[np.ndarray] = []  # (k, S, S) uint8 per file with faces
        nothing = (np.full((1, 4), np.nan, np.float32), np.full(1, np.nan, np.float32), np.full((1, 10), np.nan, np.float32))
        for i in range(n):
            if i in found and len(found[i]):
                det = found[i]
                k = len(det)
                rows += [i] * k
                faces += list(range(k))
                boxes.append(np.concatenate([det.boxes[:, :2], det.boxes[:, 2:] - det.boxes[:, :2]], axis=1))
                scores.append(det.scores)
                points.append(det.landmarks.reshape(k, 10))
                crops.append(self._align(batch, i, det))
            elif ok[i] and not photo[i]:  # a face crop (--faces auto): the whole image, as decoded
                side = min(width[i], height[i])
                rows.append(i)
                faces.append(0)
                boxes.append(np.array([[(width[i] - side) / 2, (height[i] - side) / 2, side, side]], np.float32))
                scores.append(nothing[1])
                points.append(nothing[2])
                crops.append(batch["image"][i][None])
            else:  # an error, or a photo without a face
                rows.append(i)
                faces.append(None)
                boxes.append(nothing[0])
                scores.append(nothing[1])
                points.append(nothing[2])
        labelled = np.array([f is not None for f in faces], dtype=bool)
        probs = np.zeros((len(rows), len(self.classes)), dtype=np.float32)
        if labelled.any():
            probs[labelled] = self._predict(np.concatenate(crops))
        base = batch["error"] if "error" in batch else np.full(n, None, dtype=object)
        errors = np.array([None if ok[i] else str(base[i]) for i in rows], dtype=object)
        errors, labelled = with_non_finite(errors, labelled, probs)
        return self._table(batch, np.array(rows), faces, np.concatenate(boxes), np.concatenate(scores),
                           np.concatenate(points), probs, labelled, errors)

    def _detect(self, batch: dict[str, np.ndarray], photos: np.ndarray) -> dict[int, Detections]:
        """The faces of each photo row, in pixels of the upright source image."""
        found: dict[int, Detections] = {}
        dh, dw = np.asarray(batch["detect_height"]), np.asarray(batch["detect_width"])
        images = [np.frombuffer(batch["detect"][i], dtype=np.uint8).reshape(dh[i], dw[i], 3) for i in photos]
        for i, det in zip(photos, self.detector.detect(images, chunk=self.detect_chunk)):
            w, h = int(batch["width"][i]), int(batch["height"][i])
            found[int(i)] = det.scaled(w / dw[i], h / dh[i], w, h)
        return found

    def _align(self, batch: dict[str, np.ndarray], i: int, det: Detections) -> np.ndarray:
        """The aligned crops of one photo's faces, cut from its gray copy on the device."""
        gh, gw = int(batch["gray_height"][i]), int(batch["gray_width"][i])
        gray = torch.from_numpy(np.frombuffer(batch["gray"][i], dtype=np.uint8).reshape(gh, gw)).to(self.device)
        to_gray = np.array([gw / batch["width"][i], gh / batch["height"][i]], dtype=np.float32)
        matrices = align_matrices(det.landmarks * to_gray, self.decode_size)
        return crop_faces(gray, matrices, self.decode_size).cpu().numpy()

    def _table(self, batch: dict[str, np.ndarray], rows: np.ndarray, faces: list[int | None], boxes: np.ndarray,
               scores: np.ndarray, points: np.ndarray, probs: np.ndarray, labelled: np.ndarray,
               errors: np.ndarray) -> pa.Table:
        columns: dict[str, pa.Array] = {}
        for name, values in batch.items():
            if name in ("image", "error", *PHOTO_COLUMNS):
                continue
            if name in PREDICTION_COLUMNS or name in FACE_COLUMNS or name in self.prob_columns or name == "model":
                raise ValueError(f"input column {name!r} would be overwritten by the prediction; rename it")
            columns[name] = arrow_column(np.asarray(values)[rows])
        columns["face"] = pa.array(faces, pa.int32())
        for j, name in enumerate(("box_x", "box_y", "box_w", "box_h")):
            columns[name] = pa.array(boxes[:, j], pa.float32(), mask=np.isnan(boxes[:, j]))
        columns["face_score"] = pa.array(scores, pa.float32(), mask=np.isnan(scores))
        for j, name in enumerate(FACE_COLUMNS[6:]):
            columns[name] = pa.array(points[:, j], pa.float32(), mask=np.isnan(points[:, j]))
        missing = ~labelled
        best = probs.argmax(axis=1)
        columns["label"] = pa.array([self.classes[b] if ok else None for b, ok in zip(best, labelled)], pa.string())
        columns["confidence"] = pa.array(probs.max(axis=1, initial=0.0), pa.float32(), mask=missing)
        for j, name in enumerate(self.prob_columns):
            columns[name] = pa.array(probs[:, j], pa.float32(), mask=missing)
        columns["error"] = pa.array(list(errors), pa.string())
        columns["model"] = pa.array([self.model_id] * len(rows), pa.string())
        return pa.table(columns)
