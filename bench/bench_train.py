"""Training throughput: `ray-fer train` (1 worker) against two plain PyTorch loops, in one run.

- the seed project's code path: torchvision ImageFolder + DataLoader, PIL transforms (grayscale to
  3 channels, resize, flip, rotation, normalise), fp32 NCHW EfficientNet-B0, Adam;
- a plain in-memory loop, the fastest simple loop on CPU: every face decoded once into one uint8
  tensor, the same batched augmentation preset and channels_last model as ray-fer, Adam; what
  ray-fer's Ray Train path pays on top of it is the cost of Ray (target: >= 0.9x of it).

All use the same FER2013 subset, image size, batch size, CPU threads and augmentation (flip +
rotation). Figures are training images/s per epoch (validation excluded), medians over the epochs
after the first (warm-up).

    python bench/bench_train.py [--data ../shared/data/fer2013] [--image-size 64] [--epochs 4]
    python bench/bench_train.py --levers   # memory format, bf16 autocast, batch size at 40 px, stride-1 stem
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

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from ray_fer.config import TrainJobConfig, load_config
from ray_fer.label.datasets import list_image_folder
from ray_fer.images import IMAGENET_MEAN, IMAGENET_STD
from ray_fer.model import build_model, load_bundle
from ray_fer.train.trainer import run_training


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


def plain_in_memory(paths: list[str], labels: list[int], *, image_size: int, batch_size: int, epochs: int,
                    threads: int, channels_last: bool = True, amp: torch.dtype | None = None,
                    stem_stride: int = 2) -> list[float]:
    from ray_fer.label.decode import decode_image
    from ray_fer.images import train_preset

    torch.set_num_threads(threads)
    x = torch.from_numpy(np.stack([decode_image(Path(p).read_bytes(), 48)[0] for p in paths]))
    y = torch.tensor(labels)
    preset = train_preset("flip_rotate", image_size=image_size, channels_last=channels_last)
    model = build_model("none", stem_stride=stem_stride)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rates = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        seen, t0 = 0, time.perf_counter()
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                loss = torch.nn.functional.cross_entropy(model(preset(x[idx])), y[idx])
            loss.backward()
            opt.step()
            seen += len(idx)
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


def levers(args: argparse.Namespace, table) -> None:
    """--levers: what CPU training speed levers give at the fine-tune recipe's shape (40 px, stride-1
    stem: jobs/fer-photos-cpu.yaml), on the in-memory loop: memory format, bf16 autocast (only
    where the CPU computes bf16 natively: precision.cpu_has_native_bf16) and batch size."""
    from ray_fer.precision import cpu_has_native_bf16

    paths, labels = table.column("path").to_pylist(), table.column("label").to_pylist()
    native = cpu_has_native_bf16()
    print(f"levers at 40 px, stride-1 stem, {len(paths)} images, {args.threads} threads, {args.epochs} epochs "
          f"(median of epochs 2-); this CPU computes bf16 natively: {native}")
    variants = [("fp32 NCHW, batch 64", dict(channels_last=False, batch_size=64)),
                ("channels_last, batch 64", dict(batch_size=64)),
                ("channels_last + bf16 autocast, batch 64", dict(batch_size=64, amp=torch.bfloat16)),
                ("channels_last, batch 32", dict(batch_size=32)),
                ("channels_last, batch 128", dict(batch_size=128))]
    results = {}
    for name, kw in variants:
        rates = plain_in_memory(paths, labels, image_size=40, epochs=args.epochs, threads=args.threads,
                                stem_stride=1, **kw)
        results[name] = statistics.median(rates[1:])
        print(f"  {name:<42} {results[name]:7.1f} img/s  per epoch {[round(r) for r in rates]}", flush=True)
    base = results["channels_last, batch 64"]
    print(json.dumps({"native_bf16": native, **{k: round(v, 1) for k, v in results.items()},
                      "bf16_ratio": round(results["channels_last + bf16 autocast, batch 64"] / base, 3),
                      "nchw_ratio": round(results["fp32 NCHW, batch 64"] / base, 3)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/fer2013"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--limit-per-class", type=int, default=300)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--levers", action="store_true", help="only the in-memory loop's speed levers at the fine-tune "
                    "recipe's shape: memory format, bf16 autocast, batch size")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = Path(args.data)
    table = list_image_folder(str(data / "train"), limit_per_class=args.limit_per_class)
    if args.levers:
        return levers(args, table)
    paths = set(table.column("path").to_pylist())
    print(f"FER2013 subset: {len(paths)} training images, {args.image_size} px, batch {args.batch_size}, "
          f"{args.threads} threads, {args.epochs} epochs each (first epoch is warm-up)")

    plain = plain_pytorch(paths, data / "train", image_size=args.image_size, batch_size=args.batch_size,
                          epochs=args.epochs, threads=args.threads)
    memory = plain_in_memory(table.column("path").to_pylist(), table.column("label").to_pylist(),
                             image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs,
                             threads=args.threads)
    with tempfile.TemporaryDirectory() as storage:
        ours = ray_fer_train(data, image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs,
                             limit=args.limit_per_class, threads=args.threads, storage=storage)
    plain_med, memory_med, ours_med = (statistics.median(r[1:]) for r in (plain, memory, ours))
    print(f"plain PyTorch (ImageFolder + DataLoader, fp32 NCHW): {plain_med:8.1f} img/s  per epoch {[round(r) for r in plain]}")
    print(f"plain in-memory loop (uint8 tensor, channels_last):  {memory_med:8.1f} img/s  per epoch {[round(r) for r in memory]}")
    print(f"ray-fer train (1 worker):                            {ours_med:8.1f} img/s  per epoch {[round(r) for r in ours]}")
    print(f"ratio ray-fer / plain: {ours_med / plain_med:.2f}  (target >= 1.2)")
    print(f"ratio ray-fer / in-memory loop: {ours_med / memory_med:.2f}  (target >= 0.9)")
    print(json.dumps({"plain_img_s": round(plain_med, 1), "in_memory_img_s": round(memory_med, 1),
                      "ray_fer_img_s": round(ours_med, 1), "ratio": round(ours_med / plain_med, 3),
                      "ratio_in_memory": round(ours_med / memory_med, 3)}))


if __name__ == "__main__":
    main()
