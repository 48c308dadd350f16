"""The face stage's own crop of each training face: the second view of `train.consistency_view=face`.

A face found in a photo is framed by its five landmarks (faces.TEMPLATE), and that framing differs
from how FER2013 framed the same face by about 10% in scale and 2 px in place, crop to crop; the
classifier changes 13-16% of its labels under such reframing (docs/labelling.md). Training on both
framings of every face, with the consistency loss between them, teaches it to label both alike.

Each face is cut as the face stage cuts a face in a photo: enlarged ENLARGE times with its edge
pixels repeated PAD pixels around it (so a face touching the frame is still found), searched by the
detector, aligned by its landmarks and cut back to the decode size with `faces.crop_faces`. A face the detector does not find (about 1 in 8 of FER2013
train) keeps itself as its view: that pair is then two augmentations of one framing.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image, ImageOps

from ray_fer.faces.detector import FaceDetector, align_matrices, crop_faces

log = logging.getLogger(__name__)

# A 48-px face becomes 96 px: the middle of the sizes faces have in the detection copy of a photo
# (80-300 px faces of 1280x960 photos are 40-150 px at face_detect_size 640). 91 faces/s on one
# CPU thread, against 28 at 4x (tests/test_faces.py's enlargement), with as many found (87%).
ENLARGE, PAD = 2, 24
CHUNK = 16  # faces per detector pass (144 x 144 px each)


def face_stage_views(faces: np.ndarray, detector: FaceDetector) -> tuple[np.ndarray, np.ndarray]:
    """(views, found) for uint8 faces (n, s, s): each face as the face stage would cut it, the
    face itself where no face is found in it, and which ones were found."""
    n, size = len(faces), faces.shape[-1]
    views = np.array(faces, dtype=np.uint8, copy=True)
    found = np.zeros(n, dtype=bool)
    big = size * ENLARGE
    enlarged = [np.pad(np.asarray(Image.fromarray(f).resize((big, big), Image.Resampling.BILINEAR)), PAD, mode="edge")
                for f in faces]
    detections = detector.detect([np.repeat(g[:, :, None], 3, axis=2) for g in enlarged], chunk=CHUNK)
    for i, det in enumerate(detections):
        if len(det):
            best = int(np.argmax(det.scores))
            matrices = align_matrices(det.landmarks[best:best + 1], size)
            views[i] = crop_faces(torch.from_numpy(enlarged[i]), matrices, size)[0].numpy()
            found[i] = True
    return views, found


class FaceViews:
    """Ray Data callable class: adds `view` (the face stage's crop, `face_stage_views`) and
    `view_found` to batches of decoded training faces. The detector loads once per actor."""

    def __init__(self, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.detector = FaceDetector("cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["view"], batch["view_found"] = face_stage_views(np.asarray(batch["image"]), self.detector)
        return batch


def with_face_views(ds, cpus: int):
    """`ds` (materialised `image`, `label` rows) with each face's `view`, computed once by a pool
    of up to `cpus` single-threaded detector actors and materialised; logs how many were found.
    Everything runs here, before the trainer's workers take the CPUs: a lazy step left in the plan
    would wait for CPUs they hold."""
    import ray

    out = ds.map_batches(FaceViews, batch_size=256, batch_format="numpy", num_cpus=1,
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cpus))).materialize()
    total, found = out.count(), int(out.sum("view_found") or 0)
    log.info("face views: the detector found the face in %s of %s training faces (%.0f%%); the others are "
             "their own second view", f"{found:,}", f"{total:,}", 100 * found / max(1, total))
    return out.select_columns(["image", "label", "view"]).materialize()


# --------------------------------------------------------------------------------------------
# Photos in a training set (data.faces=auto): the largest face, cut as the face stage cuts it


def largest_face_crops(batch: dict[str, np.ndarray], detector: FaceDetector, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, found) for a batch of `data.decode_photos` rows: a photo row's `image` becomes the
    aligned crop of its largest face (as `FacePredictor` cuts faces when labelling), or the whole
    photo centre-cropped where no face is found; face-crop rows keep their `image`."""
    images = np.array(batch["image"], dtype=np.uint8, copy=True)
    photo = np.flatnonzero(np.asarray(batch["detect_width"]) > 0)
    found = np.zeros(len(images), dtype=bool)
    dh, dw = np.asarray(batch["detect_height"]), np.asarray(batch["detect_width"])
    gh, gw = np.asarray(batch["gray_height"]), np.asarray(batch["gray_width"])
    searched = [np.frombuffer(batch["detect"][i], dtype=np.uint8).reshape(dh[i], dw[i], 3) for i in photo]
    for i, det in zip(photo, detector.detect(searched, chunk=CHUNK)):
        gray = np.frombuffer(batch["gray"][i], dtype=np.uint8).reshape(gh[i], gw[i])
        if not len(det):
            images[i] = np.asarray(ImageOps.fit(Image.fromarray(gray), (size, size), Image.Resampling.BILINEAR))
            continue
        areas = (det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])
        best = int(np.argmax(areas))
        to_gray = np.array([gw[i] / dw[i], gh[i] / dh[i]], dtype=np.float32)
        matrices = align_matrices(det.landmarks[best:best + 1] * to_gray, size)
        images[i] = crop_faces(torch.from_numpy(gray.copy()), matrices, size)[0].numpy()
        found[i] = True
    return images, found


_DETECTOR: list[FaceDetector] = []  # one per worker process, loaded by the first batch with a photo


def largest_faces_batch(batch: dict[str, np.ndarray], *, size: int) -> dict[str, np.ndarray]:
    """Ray Data batch function: photo rows of a decoded training set -> their largest face's crop
    (`largest_face_crops`); adds `photo` and `face_found`. A task, not an actor: its CPU is free
    again as soon as it ends, for the next stage and the trainer's workers; the detector loads
    once per worker process, and only where a batch holds a photo."""
    photo = np.asarray(batch["detect_width"]) > 0
    if photo.any():
        if not _DETECTOR:
            torch.set_num_threads(1)
            _DETECTOR.append(FaceDetector("cpu"))
        images, found = largest_face_crops(batch, _DETECTOR[0], size)
    else:
        images, found = np.asarray(batch["image"]), np.zeros(len(photo), dtype=bool)
    # an all-null `error` column reaches a numpy batch as NaN floats: keep the strings, else None
    errors = np.array([e if isinstance(e, str) else None for e in batch["error"]], dtype=object)
    return {"image": images, "label": np.asarray(batch["label"]), "error": errors,
            "path": np.asarray(batch["path"]), "photo": photo, "face_found": found}


def faces_of_photos(ds, *, size: int):
    """A decoded dataset (`datasets.decode_photos` rows) with each photo replaced by its largest
    face (`largest_faces_batch` in Ray tasks of one CPU each), materialised; logs
    how many photos there were and in how many a face was found."""
    out = ds.map_batches(largest_faces_batch, fn_kwargs={"size": size}, batch_size=64, batch_format="numpy",
                         num_cpus=1).materialize()
    photos, found = int(out.sum("photo") or 0), int(out.sum("face_found") or 0)
    if photos:
        log.info("faces: %s of %s photos had a face found, trained on its aligned crop; the others whole",
                 f"{found:,}", f"{photos:,}")
    return out
