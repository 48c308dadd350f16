"""Runs inside a virtual environment of its own that has the `fer` package (not ray-fer's):
labels the image files listed on stdin with `fer` and prints one JSON line per file.

    printf '%s\n' a.jpg b.jpg | .venv-fer/bin/python bench/fer_package_worker.py --mode detect

--mode detect: fer's own face detector (Haar cascade by default, MTCNN with --mtcnn), the largest
face's label, or null where no face is found. --mode whole: the image itself is the face (as
FER2013's crops are), fer's classifier on it without detection. The last line gives the seconds
spent labelling (model loading excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["detect", "whole"], default="detect")
    ap.add_argument("--mtcnn", action="store_true", help="fer's MTCNN detector instead of its Haar cascade")
    args = ap.parse_args()
    import torch  # noqa: F401  (fer 25.x: torch must be imported before TensorFlow)
    import cv2
    try:
        from fer import FER
    except ImportError:  # 25.10.3 no longer re-exports it from the package
        from fer.fer import FER

    detector = FER(mtcnn=args.mtcnn)
    paths = [line.strip() for line in sys.stdin if line.strip()]
    start = time.perf_counter()
    for path in paths:
        image = cv2.imread(path)
        if image is None:
            print(json.dumps({"path": path, "label": None, "error": "cannot decode"}), flush=True)
            continue
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        boxes = [(0, 0, image.shape[1], image.shape[0])] if args.mode == "whole" else None
        faces = detector.detect_emotions(image, face_rectangles=boxes)
        if not faces:
            print(json.dumps({"path": path, "label": None, "error": None}), flush=True)
            continue
        face = max(faces, key=lambda f: f["box"][2] * f["box"][3])
        emotions = face["emotions"]
        label = max(emotions, key=emotions.get)
        print(json.dumps({"path": path, "label": label, "error": None, "confidence": emotions[label]}), flush=True)
    print(json.dumps({"seconds": time.perf_counter() - start, "images": len(paths)}), flush=True)


if __name__ == "__main__":
    main()
