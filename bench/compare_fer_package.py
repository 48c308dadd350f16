"""ray-fer against the `fer` package (a Keras mini-Xception whose weights ship in its wheel) on the
same images with the same scoring: the largest face of each image, an image without a face found
counts as a miss for its class. Accuracy, macro-F1, per-class recall and images/s, one table.

`fer` lives in a virtual environment of its own (TensorFlow beside ray-fer's torch is not wanted):

    python3.11 -m venv .venv-fer
    .venv-fer/bin/pip install fer==25.10.3 'setuptools<81' torch==2.14.1 -c constraints.txt
    .venv/bin/python bench/compare_fer_package.py [--data DIR ...] [--model fer2013] [--fer-python .venv-fer/bin/python]

By default the data sets are wild-faces/dev (real news and film faces: both search for faces) and
FER2013 val (48-px crops: both label the crop whole, `fer` without its detector). ray-fer runs
through `ray-fer evaluate` (a local Ray instance, both cores); `fer` in one process, as its
README shows. Times are the labelling alone for `fer` (model loading excluded) and the whole
evaluation for ray-fer (Ray's start-up included), so the images/s favour `fer` on small sets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DEFAULT_SETS = [str(DATA / "wild-faces" / "dev"), str(DATA / "fer2013" / "val")]


def fer_package(fer_python: str, paths: list[str], mode: str, mtcnn: bool) -> tuple[dict[str, str | None], float]:
    """`fer`'s label (None: no face) of each path, and its labelling seconds."""
    cmd = [fer_python, str(REPO / "bench" / "fer_package_worker.py"), "--mode", mode] + (["--mtcnn"] if mtcnn else [])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(cmd, input="\n".join(paths), capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"the fer package failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    labels: dict[str, str | None] = {}
    seconds = float("nan")
    for line in done.stdout.splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if "seconds" in row:
            seconds = row["seconds"]
        else:
            labels[row["path"]] = row["label"]
    return labels, seconds


def scores(y_true: list[int], labels: list[str | None]) -> dict:
    from ray_fer.labels import CLASSES
    from ray_fer.metrics import MISSED, classification_metrics

    m = classification_metrics(y_true, [MISSED if lab is None else CLASSES.index(lab) for lab in labels])
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "no_face": m["num_missed"],
            "recall": {c: m["per_class"][c]["recall"] for c in CLASSES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="*", default=DEFAULT_SETS, help="labelled image folders (<root>/<class>/*)")
    ap.add_argument("--model", default="fer-photos", help="ray-fer model: packaged name or bundle path")
    ap.add_argument("--fer-python", default=str(REPO / ".venv-fer" / "bin" / "python"))
    ap.add_argument("--fer-mtcnn", action="store_true", help="fer with its MTCNN detector (default: its Haar cascade)")
    ap.add_argument("--limit-per-class", type=int)
    args = ap.parse_args()
    if not os.access(args.fer_python, os.X_OK):
        sys.exit(f"{args.fer_python} is not a Python with the fer package; make it as this script's docstring says")

    import pyarrow.parquet as pq

    from ray_fer.label.datasets import AUTO_WHOLE_SIDE, list_image_folder
    from PIL import Image
    from ray_fer.label.evaluate import evaluate_folder
    from ray_fer.labels import CLASSES

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            table = list_image_folder(data, limit_per_class=args.limit_per_class)
            paths, y_true = table["path"].to_pylist(), table["label"].to_pylist()
            with Image.open(paths[0]) as first:
                crops = max(first.size) <= AUTO_WHOLE_SIDE  # FER2013-like crops: both label them whole
            faces = "whole" if crops else "detect"
            summary = evaluate_folder(args.model, data, output=os.path.join(tmp, Path(data).name), faces=faces,
                                      limit_per_class=args.limit_per_class)
            pred = pq.read_table(summary["predictions"]).to_pylist()
            best: dict[str, str | None] = {}
            area: dict[str, float] = {}
            for r in pred:  # the largest face of each image, as evaluate scores it
                a = (r.get("box_w") or 0) * (r.get("box_h") or 0)
                if r["path"] not in best or a > area[r["path"]]:
                    best[r["path"]], area[r["path"]] = r["label"], a
            ours = scores(y_true, [best[p] for p in paths])
            theirs_labels, theirs_s = fer_package(args.fer_python, paths, "whole" if crops else "detect", args.fer_mtcnn)
            theirs = scores(y_true, [theirs_labels.get(p) for p in paths])
            for name, s, seconds in (("ray-fer " + args.model, ours, summary["seconds"]),
                                     ("fer 25.10.3" + (" (MTCNN)" if args.fer_mtcnn else ""), theirs, theirs_s)):
                rows.append({"data": data, "faces": faces, "images": len(paths), "who": name, **s,
                             "images_per_s": round(len(paths) / seconds, 1)})
    print()
    print("| data | faces | images | labeller | accuracy | macro-F1 | no face | "
          + " | ".join(f"recall {c}" for c in CLASSES) + " | images/s |")
    print("|---|---|---:|---|---:|---:|---:|" + "---:|" * len(CLASSES) + "---:|")
    for r in rows:
        recall = " | ".join("–" if r["recall"][c] is None else f"{r['recall'][c]:.2f}" for c in CLASSES)
        print(f"| {Path(r['data']).parent.name}/{Path(r['data']).name} | {r['faces']} | {r['images']:,} | {r['who']} "
              f"| {r['accuracy']:.1%} | {r['macro_f1']:.3f} | {r['no_face']} | {recall} | {r['images_per_s']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
