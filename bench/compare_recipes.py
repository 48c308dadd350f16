"""Input size and stem stride for small faces, compared on short `ray-fer train` runs.

EfficientNet-B0 divides its input side by 32, so a 48-64 px face leaves a 2x2 final feature map.
Two ways to a larger map: a larger input, or the same small input through a stem without stride
(`model.stem_stride=1`). Each variant trains the same recipe (jobs/fer2013-cpu.yaml) for the same
number of epochs on all of FER2013 train, one after the other on the idle machine; the table gives
val accuracy and loss, wall time and training images per second, so accuracy can be read per unit
of CPU time.

    python bench/compare_recipes.py [--epochs 3] [--data ../shared/data/fer2013]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: --set overrides of jobs/fer2013-cpu.yaml
    "64px-stride2": {"data.image_size": 64, "model.stem_stride": 2},
    "40px-stride1": {"data.image_size": 40, "model.stem_stride": 1},
    "48px-stride1": {"data.image_size": 48, "model.stem_stride": 1},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--data", default="../shared/data/fer2013")
    ap.add_argument("--runs", default="runs/compare")
    ap.add_argument("--only", nargs="*", help="variants to run (default: all)")
    args = ap.parse_args()
    rows = []
    for name, sets in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        overrides = {"data.train": f"{args.data}/train", "data.val": f"{args.data}/val",
                     "train.epochs": args.epochs, "run.name": f"{name}-e{args.epochs}",
                     "run.storage_path": args.runs, **sets}
        cmd = [str(Path(sys.executable).parent / "ray-fer"), "train", "--config", "jobs/fer2013-cpu.yaml"]
        for key, value in overrides.items():
            cmd += ["--set", f"{key}={value}"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"{name}: ray-fer train failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        with open(Path(args.runs) / overrides["run.name"] / "metrics.csv") as f:
            history = list(csv.DictReader(f))
        last = history[-1]
        ips = sorted(float(h["train_images_per_s"]) for h in history)[len(history) // 2]
        rows.append((name, wall, last, summary, ips))
        print(f"{name}: {json.dumps(summary)}", flush=True)
    print("\n| variant | epochs | wall (min) | train img/s (median epoch) | val acc (last) | val loss (last) |")
    print("|---|---|---|---|---|---|")
    for name, wall, last, summary, ips in rows:
        print(f"| {name} | {summary['epochs']} | {wall / 60:.1f} | {ips:.0f} | {float(last['val_acc']):.3f} | "
              f"{float(last['val_loss']):.3f} |")


if __name__ == "__main__":
    main()
