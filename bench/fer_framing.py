"""How FER2013 frames its faces, as the face detector sees it: where the box and the five landmarks
fall in the 48x48 frame. The medians printed here are `faces.TEMPLATE`, the positions to which
alignment maps the landmarks of faces found in photos (so their crops are framed as the
classifier's training data). Prints figures, not a test.

Each crop is enlarged 4x (the detector's smallest face is 20 px) and padded with its own edge
pixels (a face touching the frame is still found), then detected; the face with the best score
is kept.

    .venv/bin/python bench/fer_framing.py [--data ../shared/data/fer2013/train] [--per-class 200]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ray_fer.faces.detector import FaceDetector
from ray_fer.labels import CLASSES
from ray_fer.schema import LANDMARKS

REPO = Path(__file__).resolve().parents[1]
UP, PAD = 4, 48  # enlargement, and padding in pixels of the enlarged crop


def measure(files: list[Path], detector: FaceDetector, batch: int = 32) -> dict:
    boxes, points, scores, missed = [], [], [], 0
    for i in range(0, len(files), batch):
        images = []
        for f in files[i:i + batch]:
            big = Image.open(f).convert("L").resize((48 * UP, 48 * UP), Image.Resampling.BILINEAR)
            gray = np.pad(np.asarray(big), PAD, mode="edge")
            images.append(np.repeat(gray[:, :, None], 3, axis=2))
        for found in detector.detect(images):
            if not len(found):
                missed += 1
                continue
            k = int(np.argmax(found.scores))
            boxes.append((found.boxes[k] - PAD) / UP)
            points.append((found.landmarks[k] - PAD) / UP)
            scores.append(found.scores[k])
    b, p = np.array(boxes), np.array(points)
    q = lambda v: [round(float(x), 2) for x in np.percentile(v, [10, 50, 90])]  # noqa: E731
    eyes = p[:, 1] - p[:, 0]
    return {
        "crops": len(files), "found": len(boxes), "missed": missed,
        "box_x1": q(b[:, 0]), "box_y1": q(b[:, 1]), "box_x2": q(b[:, 2]), "box_y2": q(b[:, 3]),
        "box_w": q(b[:, 2] - b[:, 0]), "box_h": q(b[:, 3] - b[:, 1]),
        **{f"{name}_{axis}": q(p[:, j, a]) for j, name in enumerate(LANDMARKS) for a, axis in enumerate("xy")},
        "eye_distance": q(np.hypot(eyes[:, 0], eyes[:, 1])),
        "eye_angle_deg": q(np.degrees(np.arctan2(eyes[:, 1], eyes[:, 0]))),
        "score": q(scores),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fer2013" / "train"))
    ap.add_argument("--per-class", type=int, default=200)
    args = ap.parse_args()
    files = [f for c in CLASSES for f in sorted((Path(args.data) / c).glob("*.jpg"))[:args.per_class]]
    result = measure(files, FaceDetector("cpu"))
    print("percentiles 10 / 50 / 90, in pixels of the 48x48 frame")
    for key, value in result.items():
        print(f"  {key:<16} {value}")
    medians = [[result[f"{name}_x"][1], result[f"{name}_y"][1]] for name in LANDMARKS]
    print("median landmarks (TEMPLATE before symmetrising):", json.dumps(medians))


if __name__ == "__main__":
    main()
