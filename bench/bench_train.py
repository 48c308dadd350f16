"""Training throughput: `ray-fer train` (1 worker) against a plain PyTorch loop, in one run.

The plain loop is the seed project's code path: torchvision ImageFolder + DataLoader, PIL
transforms (grayscale to 3 channels, resize, flip, rotation, normalise), fp32 NCHW EfficientNet-B0,
Adam. Both use the same FER2013 subset, image size, batch size, CPU threads and augmentation
(flip + rotation). Figures are training images/s per epoch (validation excluded), medians over
the epochs after the first (warm-up).

    python bench/bench_train.py [--data ../shared/data/fer2013] [--image-size 64] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from ray_fer.config import TrainJobConfig, load_config
from ray_fer.data import list_image_folder
from ray_fer.images import IMAGENET_MEAN, IMAGENET_STD
from ray_fer.model import build_model, load_bundle
from ray_fer.train import run_training


def plain_pytorch(paths: set[str], root: Path, *, image_size: int, batch_size: int, epochs: int,
                  threads: int) -> list[float]:
    torch.set_num_threads(threads)
    tf = transforms.Compose([
        transforms.Grayscale(num_output_channels=3),
        transforms.Resize((image_size, image_size)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomRotation(10),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    full = datasets.ImageFolder(str(root), transform=tf)
    subset = Subset(full, [i for i, (p, _) in enumerate(full.samples) if p in paths])
    loader = DataLoader(subset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    model = build_model("none")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    rates = []
    for _ in range(epochs):
        model.train()
        seen, t0 = 0, time.perf_counter()
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            seen += len(y)
        rates.append(seen / (time.perf_counter() - t0))
    return rates


def ray_fer_train(data: Path, *, image_size: int, batch_size: int, epochs: int, limit: int,
                  threads: int, storage: str) -> list[float]:
    cfg = load_config(TrainJobConfig, None, [
        f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"data.image_size={image_size}",
        f"data.limit_per_class={limit}", f"train.batch_size={batch_size}", f"train.epochs={epochs}",
        "train.augment=flip_rotate", "run.num_workers=1", f"run.cpus_per_worker={threads}",
        f"run.storage_path={storage}", "run.name=bench",
    ])
    summary = run_training(cfg)
    return [h["train_images_per_s"] for h in load_bundle(summary["model"])[0].history]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/fer2013"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--limit-per-class", type=int, default=300)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data)
    table = list_image_folder(str(data / "train"), limit_per_class=args.limit_per_class)
    paths = set(table.column("path").to_pylist())
    print(f"FER2013 subset: {len(paths)} training images, {args.image_size} px, batch {args.batch_size}, "
          f"{args.threads} threads, {args.epochs} epochs each (first epoch is warm-up)")

    plain = plain_pytorch(paths, data / "train", image_size=args.image_size, batch_size=args.batch_size,
                          epochs=args.epochs, threads=args.threads)
    with tempfile.TemporaryDirectory() as storage:
        ours = ray_fer_train(data, image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs,
                             limit=args.limit_per_class, threads=args.threads, storage=storage)
    plain_med, ours_med = statistics.median(plain[1:]), statistics.median(ours[1:])
    print(f"plain PyTorch (ImageFolder + DataLoader, fp32 NCHW): {plain_med:8.1f} img/s  per epoch {[round(r) for r in plain]}")
    print(f"ray-fer train (1 worker):                            {ours_med:8.1f} img/s  per epoch {[round(r) for r in ours]}")
    print(f"ratio ray-fer / plain: {ours_med / plain_med:.2f}  (target >= 1.2)")
    print(json.dumps({"plain_img_s": round(plain_med, 1), "ray_fer_img_s": round(ours_med, 1),
                      "ratio": round(ours_med / plain_med, 3)}))


if __name__ == "__main__":
    main()
