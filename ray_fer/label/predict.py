"""`ray-fer predict`: label a few image files in this process (no Ray), with the top probabilities;
with faces, one line per face, and `--annotate` draws each face's box and label on the photo."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ray_fer.store import storage
from ray_fer.config import UserError
from ray_fer.label.datasets import AUTO_WHOLE_SIDE
from ray_fer.faces.options import DETECT_SIZE, check_faces
from ray_fer.images import check_tta


def predict_files(model: str, images: Sequence[str], *, tta: str = "none", top: int = 3, faces: str = "auto",
                  annotate: str | None = None) -> dict[str, Any]:
    """Label a few image files (local or s3://) in this process; returns the model id and the rows.

    `faces` as `ray-fer infer`: "whole" gives one row per file; "detect" (and "auto", for images
    larger than a face crop) one row per face, left to right, with its `face` index, `box` (x, y,
    w, h in pixels of the upright image) and `face_score`, and one row with `face` None for a
    file without a face. With `annotate` (a folder), each file's picture with its faces' boxes
    and labels is written there (`annotated` in the result lists them). A missing file fails
    before the model loads; an undecodable one gets a row with its error.
    """
    import torch

    from ray_fer.label.decode import ImageError, decode_photo
    from ray_fer.model import load_bundle
    from ray_fer.label.predictor import predict_probs
    from ray_fer.model_ref import resolve_model

    check_tta(tta)
    check_faces(faces)
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    missing = [p for p in images if not storage.exists(p)]
    if missing:
        raise UserError(f"no such image file: {', '.join(missing)}")
    folders = [p for p in images if storage.is_dir(p)]
    if folders:
        raise UserError(f"{', '.join(folders)} is a folder; pass image files (for a labelled folder use "
                        "`ray-fer evaluate`, for a whole store `ray-fer infer`)")
    detector = None  # loaded at the first photo
    bundle, model_id = load_bundle(resolve_model(model))
    net = bundle.build_model()
    preset = bundle.eval_preset(channels_last=False)
    whole_max_side = {"auto": AUTO_WHOLE_SIDE, "detect": 0}.get(faces, 1 << 30)  # whole: every image is a crop
    rows: list[dict[str, Any]] = []
    crops: list[np.ndarray] = []
    labelled: list[dict[str, Any]] = []  # the rows of `crops`, in order
    for path in images:
        try:
            photo = decode_photo(storage.read_bytes(path), detect_size=DETECT_SIZE, size=bundle.decode_size,
                                 whole_max_side=whole_max_side)
        except (ImageError, OSError) as e:
            rows.append({"path": path, "error": str(e)})
            continue
        if photo.face is not None:
            rows.append({"path": path} | ({} if faces == "whole" else
                                          {"face": 0, "box": _centre_square(photo.width, photo.height)}))
            crops.append(photo.face[None])
            labelled.append(rows[-1])
            continue
        if detector is None:
            from ray_fer.faces.detector import FaceDetector

            detector = FaceDetector("cpu")
        found, aligned = _faces(detector, photo, bundle.decode_size)
        if not len(found):
            rows.append({"path": path, "face": None})
        for k in range(len(found)):
            x1, y1, x2, y2 = (round(float(v), 1) for v in found.boxes[k])
            rows.append({"path": path, "face": k, "box": [x1, y1, round(x2 - x1, 1), round(y2 - y1, 1)],
                         "face_score": round(float(found.scores[k]), 4)})
            labelled.append(rows[-1])
        crops.append(aligned)
    if labelled:
        pixels = torch.from_numpy(np.concatenate(crops))
        probs = torch.cat([predict_probs(net, preset, chunk, tta=tta) for chunk in pixels.split(64)])
        for row, p in zip(labelled, probs):
            order = torch.argsort(p, descending=True)[:top].tolist()
            row.update(label=bundle.classes[order[0]], confidence=round(float(p[order[0]]), 4),
                       top=[[bundle.classes[j], round(float(p[j]), 4)] for j in order])
    result: dict[str, Any] = {"model": model_id, "tta": tta, "faces": faces, "predictions": rows}
    if annotate is not None:
        from ray_fer.report import write_annotated

        result["annotated"] = write_annotated(annotate, rows)
    return result


def _faces(detector, photo, size: int):
    """The faces of a decoded photo (in its upright pixels) and their aligned crops."""
    import torch

    from ray_fer.faces.detector import align_matrices, crop_faces

    found = detector.detect([photo.detect])[0]
    h, w = photo.detect.shape[:2]
    found = found.scaled(photo.width / w, photo.height / h, photo.width, photo.height)
    to_gray = np.array([photo.gray.shape[1] / photo.width, photo.gray.shape[0] / photo.height], dtype=np.float32)
    matrices = align_matrices(found.landmarks * to_gray, size)
    return found, crop_faces(torch.from_numpy(np.array(photo.gray)), matrices, size).numpy()


def _centre_square(width: int, height: int) -> list[float]:
    side = min(width, height)
    return [(width - side) / 2, (height - side) / 2, float(side), float(side)]


def format_predictions(result: dict[str, Any]) -> str:
    """A plain-text table of `predict_files` rows: file (and face), label, then the top probabilities."""
    def name(r: dict[str, Any]) -> str:
        return r["path"] + (f" #{r['face']}" if r.get("face") is not None else "")

    width = max([len("file")] + [len(name(r)) for r in result["predictions"]])
    lines = [f"{'file':<{width}}  {'label':<9} top probabilities"]
    for r in result["predictions"]:
        if "error" in r:
            lines.append(f"{name(r):<{width}}  {'-':<9} error: {r['error']}")
        elif "label" not in r:
            lines.append(f"{name(r):<{width}}  {'-':<9} no face found")
        else:
            tops = "  ".join(f"{label} {p:.1%}" for label, p in r["top"])
            box = "  box " + ",".join(f"{v:g}" for v in r["box"]) if r.get("face_score") is not None else ""
            lines.append(f"{name(r):<{width}}  {r['label']:<9} {tops}{box}")
    for path in result.get("annotated", []):
        lines.append(f"annotated: {path}")
    return "\n".join(lines)
