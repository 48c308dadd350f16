"""`ray-fer predict`: label a few image files in this process (no Ray), with the top probabilities;
with faces, one line per face, and `--annotate` draws each face's box and label on the photo.
A video gives one row per face per sampled frame, with tracks, and its per-track summary;
`--annotate` writes it again with each face's box, track and label drawn on the sampled frames."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from ray_fer.schema import video_mask
from ray_fer.store import storage
from ray_fer.video.decode import DEFAULT_FPS
from ray_fer.config import UserError
from ray_fer.label.datasets import AUTO_WHOLE_SIDE
from ray_fer.faces.options import DETECT_SIZE, check_faces
from ray_fer.images import check_tta


def predict_files(model: str, images: Sequence[str], *, tta: str = "none", top: int = 3, faces: str = "auto",
                  annotate: str | None = None, fps: float = DEFAULT_FPS) -> dict[str, Any]:
    """Label a few image files (local or s3://) in this process; returns the model id and the rows.

    `faces` as `ray-fer infer`: "whole" gives one row per file; "detect" (and "auto", for images
    larger than a face crop) one row per face, left to right, with its `face` index, `box` (x, y,
    w, h in pixels of the upright image) and `face_score`, and one row with `face` None for a
    file without a face. With `annotate` (a folder), each file's picture with its faces' boxes
    and labels is written there (`annotated` in the result lists them). A missing file fails
    before the model loads; an undecodable one gets a row with its error.

    Videos (schema.VIDEO_EXTENSIONS) are sampled at `fps` frames per second and searched for faces
    whatever `faces` says: their rows carry `frame`, `time_s` and `track`, and `tracks` in the
    result summarises each video's tracks (`video.summary.track_summary`).
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
    videos = [p for p in images if video_mask(pa.array([p]))[0].as_py()]
    for path in images:
        if path in videos:
            if detector is None:
                from ray_fer.faces.detector import FaceDetector

                detector = FaceDetector("cpu")
            video_rows, video_crops = _video_faces(detector, path, bundle.decode_size, fps)
            rows += video_rows
            labelled += [r for r in video_rows if r.get("face") is not None]
            crops += video_crops
            continue
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
            if row.get("track") is not None:  # a video's face: all its probabilities, for the track summary
                row["probs"] = [[c, round(float(v), 4)] for c, v in zip(bundle.classes, p)]
    result: dict[str, Any] = {"model": model_id, "tta": tta, "faces": faces, "predictions": rows}
    if videos:
        result["tracks"] = _tracks(rows, bundle.classes)
    if annotate is not None:
        from ray_fer.report import write_annotated

        result["annotated"] = write_annotated(annotate, [r for r in rows if r["path"] not in videos])
        result["annotated"] += [_annotate_video(path, annotate, [r for r in rows if r["path"] == path], fps)
                                for path in videos if not any("error" in r for r in rows if r["path"] == path)]
    return result


def _video_faces(detector, path: str, size: int, fps: float) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """A video's rows (one per face per sampled frame, tracked; one no-face row for a video without
    faces; the rows before a break and one error row) and the aligned crops of its faces."""
    from ray_fer.label.decode import Photo
    from ray_fer.video.decode import VideoError, decode_frames
    from ray_fer.video.track import assign_tracks

    rows: list[dict[str, Any]] = []
    crops: list[np.ndarray] = []
    error = None
    try:
        for frame in decode_frames(path, fps=fps, detect_size=DETECT_SIZE):
            photo = Photo(frame.width, frame.height, detect=frame.detect, gray=frame.gray)
            found, aligned = _faces(detector, photo, size)
            for k in range(len(found)):
                x1, y1, x2, y2 = (round(float(v), 1) for v in found.boxes[k])
                rows.append({"path": path, "frame": frame.index, "time_s": round(frame.time_s, 3),
                             "box": [x1, y1, round(x2 - x1, 1), round(y2 - y1, 1)],
                             "face_score": round(float(found.scores[k]), 4),
                             "points": found.landmarks[k].reshape(10).tolist()})
            if len(found):
                crops.append(aligned)
    except (VideoError, OSError) as e:
        error = str(e)
    if rows:
        tracks = assign_tracks(np.array([r["time_s"] for r in rows]), np.array([r["box"] for r in rows]),
                               np.array([r.pop("points") for r in rows]))
        for k, (r, t) in enumerate(zip(rows, tracks)):
            r.update(face=k, track=int(t))
    elif error is None:
        rows.append({"path": path, "face": None})
    if error is not None:
        rows.append({"path": path, "error": error})
    return rows, crops


def _tracks(rows: list[dict[str, Any]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """Per video and track: `video.summary.track_summary` of the labelled video rows."""
    from ray_fer.video.summary import track_summary

    tracked = [r for r in rows if r.get("track") is not None and "label" in r]
    if not tracked:
        return []
    table = pa.table({"path": [r["path"] for r in tracked], "track": pa.array([r["track"] for r in tracked], pa.int32()),
                      "time_s": [r["time_s"] for r in tracked], "label": [r["label"] for r in tracked],
                      **{f"prob_{c}": [dict(r["probs"])[c] for r in tracked] for c in classes}})
    return track_summary(table, classes).to_pylist()


def _annotate_video(path: str, folder: str, rows: list[dict[str, Any]], fps: float) -> str:
    """`path`'s sampled frames with each face's box, track and label drawn, as <name>.mp4 (H.264)
    in `folder`, at the sampling rate: every frame of it is a labelled frame."""
    import os
    import tempfile
    from fractions import Fraction

    import av
    from PIL import Image

    from ray_fer.report import annotate_photo
    from ray_fer.video.decode import decode_frames, probe

    rate = fps if fps > 0 else (probe(path).fps or 25.0)
    by_frame: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("frame") is not None:
            by_frame.setdefault(r["frame"], []).append(r | {"face": f"#{r['track']}"})
    name = (storage.basename(path).rsplit(".", 1)[0] or "video") + ".mp4"
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        with av.open(local, mode="w") as out:
            stream = None
            for frame in decode_frames(path, fps=fps, detect_size=1 << 16):  # full size: detect == the frame
                if stream is None:
                    stream = out.add_stream("libx264", rate=Fraction(rate).limit_denominator(1001))
                    stream.width, stream.height = frame.width // 2 * 2, frame.height // 2 * 2
                    stream.pix_fmt, stream.options = "yuv420p", {"crf": "23", "preset": "veryfast"}
                picture = annotate_photo(Image.fromarray(frame.detect), by_frame.get(frame.index, []),
                                         empty_caption="")
                picture = picture.crop((0, 0, stream.width, stream.height))
                for packet in stream.encode(av.VideoFrame.from_image(picture)):
                    out.mux(packet)
            if stream is not None:
                for packet in stream.encode():
                    out.mux(packet)
        uri = storage.join(folder, name)
        with open(local, "rb") as f:
            storage.write_bytes(uri, f.read())
    return uri


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
        if r.get("track") is not None:
            return f"{r['path']} {r['time_s']:.1f}s #{r['track']}"
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
    if result.get("tracks"):
        from ray_fer.video.summary import format_tracks

        lines.append(format_tracks(result["tracks"]))
    for path in result.get("annotated", []):
        lines.append(f"annotated: {path}")
    return "\n".join(lines)
