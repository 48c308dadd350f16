"""Do faces found in photos keep the labels of their FER2013 crops? (prints figures; not a test)

The measurement behind the `slow` test of tests/test_faces.py, on more faces and for several
models in one run: FER2013 val crops (every --every-th) are pasted into --photos synthetic
1280x960 JPEGs (bench/synthetic_faces.py; 2-4 faces each, every other photo with faces rolled by
up to 20 degrees), labelled by the face stage (decode, detect, align, classify: what `ray-fer
infer --faces detect` runs in its actors), and each detected face's label is compared with the
same model's label of the original crop, with the same test-time augmentation. A pasted face's
true box is where the detector finds the face on its crop alone (enlarged 4x), as in the test;
crops in which it finds none are not pasted.

For each model and --tta: agreement of upright and of rolled faces, and the accuracy (FER2013's
labels) of the aligned crops against that of the original crops.

    .venv/bin/python bench/face_agreement.py [--models fer2013 runs/x/model.pt] [--photos 240] [--every 4] [--tta none tencrop]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_faces import make_photo, match  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def known_faces(val: Path, every: int, detector) -> list[tuple[np.ndarray, tuple[float, ...], int]]:
    """(crop, its face's box in the crop, FER2013 label index) for the crops the detector finds a face in."""
    from ray_fer.labels import CLASSES

    files = sorted(val.glob("*/*.jpg"))[::every]
    crops = [np.asarray(Image.open(f).convert("L")) for f in files]
    up, pad = 4, 48
    out = []
    for start in range(0, len(crops), 16):
        part = crops[start:start + 16]
        enlarged = [np.repeat(np.pad(np.asarray(Image.fromarray(c).resize((48 * up,) * 2, Image.Resampling.BILINEAR)),
                                     pad, mode="edge")[:, :, None], 3, axis=2) for c in part]
        for j, det in enumerate(detector.detect(enlarged)):
            if len(det):
                x1, y1, x2, y2 = (det.boxes[int(np.argmax(det.scores))] - pad) / up
                out.append((part[j], (x1, y1, x2 - x1, y2 - y1), CLASSES.index(files[start + j].parent.name)))
    return out


def label_photos(predictor, paths: list[Path]) -> dict[str, list[dict]]:
    """The face stage's rows of each photo, in this process, 8 photos a batch."""
    from ray_fer.label.datasets import decode_photos
    from ray_fer.faces.options import DETECT_SIZE

    rows: dict[str, list[dict]] = {}
    for start in range(0, len(paths), 8):
        batch = {"path": np.array([str(p) for p in paths[start:start + 8]], dtype=object)}
        blocks = list(decode_photos(batch, decode_size=48, detect_size=DETECT_SIZE, faces="detect"))
        for r in predictor({k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}).to_pylist():
            rows.setdefault(r["path"], []).append(r)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fer2013"], help="packaged names or bundle files")
    parser.add_argument("--photos", type=int, default=240)
    parser.add_argument("--every", type=int, default=4, help="paste every n-th FER2013 val crop")
    parser.add_argument("--tta", nargs="+", default=["none", "tencrop"])
    parser.add_argument("--data", type=Path, default=DATA / "fer2013")
    args = parser.parse_args()

    from ray_fer.label.face_predictor import FacePredictor
    from ray_fer.faces.detector import FaceDetector
    from ray_fer.labels import CLASSES
    from ray_fer.model_ref import resolve_model

    known = known_faces(args.data / "val", args.every, FaceDetector("cpu"))
    crops = np.stack([c for c, _, _ in known])
    truth_labels = np.array([t for _, _, t in known])
    rng = np.random.default_rng(12)
    with tempfile.TemporaryDirectory() as tmp:
        photos = []
        for i in range(args.photos):
            img, faces = make_photo(rng, list(crops), faces=int(rng.integers(2, 5)), max_angle=20.0 if i % 2 else 0.0)
            path = Path(tmp) / f"{i:04d}.jpg"
            img.save(path, quality=92)
            photos.append((path, faces))
        print(f"{len(known)} FER2013 val crops, {sum(len(f) for _, f in photos)} pasted faces in {len(photos)} photos")
        for model in args.models:
            for tta in args.tta:
                predictor = FacePredictor(resolve_model(model), precision="fp32", tta=tta)
                rows = label_photos(predictor, [p for p, _ in photos])
                original = predictor._predict(crops).argmax(axis=1)
                agree: dict[bool, list[bool]] = {False: [], True: []}
                correct = []
                for path, faces in photos:
                    found = [r for r in rows[str(path)] if r["face"] is not None]
                    of_truth, _ = match([f.face_box(known[f.source][1]) for f in faces],
                                        [(r["box_x"], r["box_y"], r["box_w"], r["box_h"]) for r in found])
                    for f, j in zip(faces, of_truth):
                        if j is not None:
                            label = CLASSES.index(found[j]["label"])
                            agree[bool(f.angle)].append(label == original[f.source])
                            if not f.angle:
                                correct.append((label == truth_labels[f.source], original[f.source] == truth_labels[f.source]))
                acc = np.mean(correct, axis=0)
                print(f"{model} tta={tta}: upright {np.mean(agree[False]):.1%} of {len(agree[False])}, rolled "
                      f"{np.mean(agree[True]):.1%} of {len(agree[True])}; accuracy of the upright faces: aligned "
                      f"{acc[0]:.1%}, their original crops {acc[1]:.1%}", flush=True)


if __name__ == "__main__":
    main()
