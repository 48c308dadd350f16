"""Speed on one accelerator: training and labelling through ray-fer against model-only upper bounds.

Prints, each a median of repeated timings after warm-up:
1. training images/s through `ray-fer train` (1 worker), the model-only bound (the same model,
   batch, precision and optimizer in a bare loop on random tensors already on the device), ratio;
2. labelling images/s end to end (files -> Parquet, `--faces whole`: the synthetic images are face
   crops) with the packaged default model, the model-only inference bound (the same network and
   input size on random tensors already on the device), ratio; and where the gap is: Ray Data's
   time per operator (bench/raydata_ops.py, also after parts 4 and 5), the predictor alone (the
   same Predictor object called in this process on batches already decoded: its host-side work
   and the model, without Ray) and the pipeline's start-up and steady rate (from a second run
   on a quarter of the images: steady = extra images / extra seconds);
3. GPU memory peak and utilisation (sampled with nvidia-smi) where there is a GPU;
4. face labelling photos/s end to end (`--faces detect`, files -> Parquet) on 1280x960 JPEGs with
   1-4 FER2013 faces pasted in (bench/synthetic_faces.py), and the detector alone on the device
   (batches of 64 detection copies already decoded) as its bound. It needs FER2013 crops to
   paste (--face-crops, default ../shared/data/fer2013/val); without them this part is skipped;
5. video labelling sampled 1080p frames/s end to end (`ray-fer infer`, video files -> Parquet,
   every frame sampled: --fps 0) on generated 1080p25 H.264 videos with FER2013 faces moving across
   (bench_video.make; also needs --face-crops' FER2013), and what that is in hours of video per
   hour at the default --fps 2.

It makes its own data: synthetic 48x48 grayscale JPEGs in the FER2013 layout (no data set needs to
travel). On a machine without a GPU it runs the same code paths on the CPU with smaller sizes
(`--mode cpu`, the default there), so it stays tested where no GPU is lent.

    python bench/gpu.py                    # auto: gpu if torch sees one, else cpu
    python bench/gpu.py --mode gpu --out results.json
    python bench/gpu.py --mode gpu --parts 2,5     # some parts only
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import raydata_ops  # bench/ is on sys.path when this file runs as a script
from ray_fer.labels import CLASSES

# Per mode: image size, per-worker train batch, synthetic train / label image counts, epochs.
SIZES = {
    "gpu": dict(image_size=224, batch_size=256, train_images=24_000, label_images=160_000, epochs=3,
                face_photos=6_000, videos=8, video_seconds=120),
    "cpu": dict(image_size=64, batch_size=32, train_images=1_400, label_images=3_000, epochs=3, face_photos=60,
                videos=1, video_seconds=12),
}
VIDEO_FPS = 25  # the generated videos' frame rate (bench_video.make)
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Synthetic FER-like data


def _write_faces(args: tuple[str, int, int, int]) -> None:
    from PIL import Image

    folder, start, count, seed = args
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:48]
    for i in range(start, start + count):
        # a smooth blob pattern compresses like a face (about 1.5-2 KB), unlike white noise
        img = np.full((48, 48), rng.uniform(60, 160))
        for _ in range(4):
            cy, cx, r = rng.uniform(8, 40), rng.uniform(8, 40), rng.uniform(4, 14)
            img += rng.uniform(-80, 80) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(f"{folder}/{i:07d}.jpg", quality=90)


def _writers(workers: int) -> ProcessPoolExecutor:
    """Processes that write the synthetic data, started fresh ("spawn"), not forked: parts 4 and 5
    write theirs after ray.init, and a child forked from this process shares its open connections
    to Ray's GCS. Forked, the first video run after part 4 hung every time on 2 cores (its two actors
    ALIVE in the GCS, the driver never told: Ray Data kept them pending)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def make_image_folder(root: Path, n: int, workers: int) -> Path:
    """`root/<class>/*.jpg` with n synthetic 48x48 faces spread over the seven classes."""
    jobs = []
    per_class = -(-n // len(CLASSES))
    for c, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for start in range(0, per_class, 2000):
            jobs.append((str(folder), start, min(2000, per_class - start), c * 1_000_003 + start))
    with _writers(workers) as pool:
        list(pool.map(_write_faces, jobs))
    return root


# --------------------------------------------------------------------------------------------
# Model-only upper bounds


def _timed_steps(step, warmup: int, repeats: int, steps: int, device: torch.device) -> list[float]:
    """Seconds for each of `repeats` runs of `steps` calls of step(), after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def model_only_train(image_size: int, batch: int, device: torch.device, amp: torch.dtype | None,
                     compile_model: bool = False) -> float:
    from ray_fer.model import build_model

    model = build_model("none").to(device, memory_format=torch.channels_last).train()
    if compile_model:
        model = torch.compile(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(CLASSES), (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    steps = 20 if device.type == "cuda" else 3
    times = _timed_steps(step, warmup=5 if device.type == "cuda" else 1, repeats=5, steps=steps, device=device)
    return batch * steps / statistics.median(times)


@torch.inference_mode()
def model_only_infer(model_uri: str, batch: int, device: torch.device, amp: torch.dtype | None) -> float:
    """Images/s of the bundle's network (its architecture and input size: the packaged models keep
    a stride-1 stem, four times the first layers' work) on random tensors already on the device."""
    from ray_fer.label.predictor import _forward, fold_batchnorm
    from ray_fer.model import load_bundle

    bundle = load_bundle(model_uri)[0]
    # the network as the Predictor runs it: batch norms folded, the first stages fp32 under autocast
    model = fold_batchnorm(bundle.build_model()).to(device, memory_format=torch.channels_last)
    size = bundle.image_size
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def step() -> None:
        torch.softmax(_forward(model, x, amp).float(), dim=1)

    steps = 20 if device.type == "cuda" else 5
    times = _timed_steps(step, warmup=5 if device.type == "cuda" else 1, repeats=5, steps=steps, device=device)
    return batch * steps / statistics.median(times)


# --------------------------------------------------------------------------------------------
# GPU sampling


class GpuSampler:
    """Samples GPU utilisation and memory with nvidia-smi every 200 ms while in a `with` block."""

    def __init__(self) -> None:
        self.util: list[float] = []
        self.mem_mib: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuSampler":
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "200", "-i", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                u, m = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.util.append(u)
            self.mem_mib.append(m)

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)

    def summary(self) -> dict[str, float | None]:
        busy = [u for u in self.util if u > 0]
        return {
            "gpu_util_median_pct": statistics.median(busy) if busy else None,
            "gpu_util_mean_pct": statistics.fmean(self.util) if self.util else None,
            "gpu_mem_peak_gib": max(self.mem_mib) / 1024 if self.mem_mib else None,
        }


# --------------------------------------------------------------------------------------------
# The pipelines


def bench_train(data: Path, runs: Path, *, mode: str, image_size: int, batch_size: int, epochs: int,
                compile_model: bool) -> dict:
    from ray_fer.config import TrainJobConfig, load_config
    from ray_fer.model import load_bundle
    from ray_fer.train.trainer import run_training

    cfg = load_config(TrainJobConfig, None, [
        f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"data.image_size={image_size}",
        f"train.batch_size={batch_size}", f"train.epochs={epochs}", "train.augment=standard",
        f"train.compile={str(compile_model).lower()}", "run.num_workers=1",
        f"run.use_gpu={'true' if mode == 'gpu' else 'false'}", f"run.storage_path={runs}", "run.name=bench",
    ])
    with GpuSampler() as gpu:
        summary = run_training(cfg)
    history = load_bundle(summary["model"])[0].history
    rates = [h["train_images_per_s"] for h in history]
    out = {"train_img_s_per_epoch": [round(r, 1) for r in rates],
           "train_img_s": statistics.median(rates[1:]) if len(rates) > 1 else rates[0],
           "train_gpu_mem_peak_torch_gib": history[-1].get("gpu_mem_peak_gb")}
    return out | {f"train_{k}": v for k, v in gpu.summary().items()}


def _label_runs(settings: dict, out_dir: Path, repeats: int, *, tables: bool = True) -> list[tuple[dict, float]]:
    """`repeats` runs of `ray-fer infer` with `settings` (run i writes to out_dir/r<i>): each run's
    summary and wall seconds. With `tables`, prints the last run's Ray Data operator tables."""
    from ray_fer.config import InferConfig, load_config
    from ray_fer.label.infer import label_images

    runs = []
    for i in range(repeats):
        started, t0 = time.time(), time.perf_counter()
        summary = label_images(load_config(InferConfig, None, settings | {"output": str(out_dir / f"r{i}")}))
        runs.append((summary, time.perf_counter() - t0))
    if tables:
        print(raydata_ops.tables_since(started), flush=True)
    return runs


def bench_label(data: Path, model: str, out_dir: Path, *, repeats: int, quarter: Path | None = None) -> dict:
    """Images/s of `ray-fer infer --faces whole` over `data`, start-up included; median of
    `repeats`. With `quarter` (a folder of a quarter as many images) also the start-up and the
    steady rate: one more run there, after the others (warm as they are but the first), and
    steady = extra images / extra seconds."""
    settings = {"model": model, "input": str(data), "faces": "whole"}
    with GpuSampler() as gpu:
        summaries = [summary for summary, _ in _label_runs(settings, out_dir, repeats)]
    small = None
    if quarter is not None:
        (small, _), = _label_runs(settings | {"input": str(quarter)}, out_dir / "quarter", 1, tables=False)
    for summary in summaries + ([small] if small else []):
        assert summary["images"] == summary["labelled"], summary  # every synthetic image is valid
    rates = [summary["images_per_s"] for summary in summaries]
    images = summaries[-1]["images"]
    out = {"label_img_s_runs": rates, "label_img_s": statistics.median(rates), "label_images_done": images}
    out |= {f"label_{k}": v for k, v in gpu.summary().items()}
    if small is not None:
        extra_s = statistics.median(summary["seconds"] for summary in summaries) - small["seconds"]
        steady = (images - small["images"]) / extra_s if extra_s > 0 else float("nan")
        out |= {"label_steady_img_s": steady, "label_startup_s": small["seconds"] - small["images"] / steady}
    return out


def predictor_alone(data: Path, model: str, device: torch.device, *, batch: int, batches: int) -> tuple[float, float]:
    """Images/s of the labelling actors' Predictor called in this process on `batches` batches of
    `batch` images decoded beforehand (its host-side work and the model, without Ray Data), and
    the share of near-ties among the first batch's rows (each re-computed in fp32 under bf16)."""
    from ray_fer.label.decode import decode_image
    from ray_fer.label.predictor import NEAR_TIE, Predictor, _forward

    predictor = Predictor(model, device="gpu" if device.type == "cuda" else "cpu", batch_size=batch)
    paths = sorted(data.glob("*/*.jpg"))[: batch * batches]
    pixels = np.stack([decode_image(p.read_bytes(), predictor.decode_size)[0] for p in paths])
    batches_ = [{"path": np.array([str(p) for p in paths[i:i + batch]], dtype=object),
                 "image": pixels[i:i + batch], "error": np.full(len(pixels[i:i + batch]), None, dtype=object)}
                for i in range(0, len(paths), batch)]
    for b in batches_[:3]:  # warm-up: CUDA context, kernels (oneDNN's primitives on CPU)
        predictor(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for b in batches_:
        t0 = time.perf_counter()
        predictor(b)  # returns host-side Arrow columns: the device work is done when it returns
        times.append(time.perf_counter() - t0)
    with torch.inference_mode():  # the bf16 (autocast) pass alone: its near-ties go to fp32 again
        x = torch.from_numpy(pixels[:batch]).to(predictor.device)
        probs = torch.softmax(_forward(predictor.net, predictor.preset(x), predictor.autocast).float(), dim=1)
    top2 = probs.topk(2, dim=1).values.cpu().numpy()
    near = float(np.mean(top2[:, 0] - top2[:, 1] < NEAR_TIE)) if predictor.autocast is not None else 0.0
    return batch / statistics.median(times), near


def _write_photos(args: tuple[str, int, int, int, str]) -> None:
    from synthetic_faces import make_photo

    folder, start, count, seed, crops_dir = args
    files = sorted(Path(crops_dir).glob("*/*.jpg"))[::7]
    crops = [np.asarray(Image.open(f).convert("L")) for f in files]
    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        img, _ = make_photo(rng, crops, faces=int(rng.integers(1, 5)), max_angle=10.0)
        img.save(f"{folder}/{i:06d}.jpg", quality=90)


def make_photo_folder(folder: Path, n: int, crops_dir: Path, workers: int) -> Path:
    """n 1280x960 JPEGs with 1-4 FER2013 faces of 80-300 px each (bench/synthetic_faces.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), start, min(500, n - start), 7919 * start, str(crops_dir)) for start in range(0, n, 500)]
    with _writers(workers) as pool:
        list(pool.map(_write_photos, jobs))
    return folder


def detector_only(folder: Path, device: torch.device, batch: int = 64, seconds: float = 10.0) -> float:
    """Photos/s of the detector alone on `device`: `batch` decoded 640-px copies in one pass (as
    the predictor's GPU passes, face_predictor.DETECT_CHUNK), over and over for `seconds`; the
    bound for face labelling."""
    from ray_fer.label.decode import decode_photo
    from ray_fer.faces.detector import FaceDetector

    files = sorted(folder.glob("*.jpg"))[:batch]
    copies = [decode_photo(f.read_bytes(), detect_size=640, size=48).detect for f in files]
    detector = FaceDetector(device)
    detector.detect(copies)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        detector.detect(copies)
        if device.type == "cuda":
            torch.cuda.synchronize()
        n += len(copies)
    return n / (time.perf_counter() - start)


def bench_faces(folder: Path, model: str, out_dir: Path, *, repeats: int) -> dict:
    with GpuSampler() as gpu:
        summaries = [summary for summary, _ in
                     _label_runs({"model": model, "input": str(folder), "faces": "detect"}, out_dir, repeats)]
    assert all(summary["errors"] == 0 for summary in summaries), summaries
    rates = [summary["images_per_s"] for summary in summaries]
    return {"faces_photos_s_runs": rates, "faces_photos_s": statistics.median(rates),
            "faces_found": summaries[-1]["faces"], "faces_no_face": summaries[-1]["no_face"]} | {
        f"faces_{k}": v for k, v in gpu.summary().items()}


def _write_video(args: tuple[str, float, int]) -> None:
    from bench_video import make  # bench/ is on sys.path when this file runs as a script

    path, minutes, seed = args
    make(Path(path), minutes, seed=seed)


def make_video_folder(folder: Path, videos: int, seconds: int, workers: int) -> int:
    """`videos` 1080p25 H.264 videos of `seconds` each (bench_video.make); returns their frames."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"v{i}.mp4"), seconds / 60, i) for i in range(videos)]
    with _writers(min(workers, videos)) as pool:
        list(pool.map(_write_video, jobs))
    return videos * seconds * VIDEO_FPS


def bench_videos(folder: Path, frames: int, out_dir: Path, *, repeats: int) -> dict:
    """Sampled frames/s of `ray-fer infer --fps 0` (every frame) over the videos, with the packaged
    model, start-up included; median of `repeats`."""
    with GpuSampler() as gpu:
        runs = _label_runs({"input": str(folder), "fps": 0}, out_dir, repeats)
    assert all(summary["errors"] == 0 for summary, _ in runs), runs
    rates = [frames / seconds for _, seconds in runs]
    return {"video_frames_s_runs": rates, "video_frames_s": statistics.median(rates), "video_frames": frames,
            "video_faces": runs[-1][0]["faces"]} | {f"video_{k}": v for k, v in gpu.summary().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("auto", "gpu", "cpu"), default="auto")
    ap.add_argument("--workdir", help="where synthetic data and outputs go (default: a temporary folder)")
    ap.add_argument("--compile", action="store_true", help="also measure train.compile=true")
    ap.add_argument("--label-repeats", type=int, default=3)
    ap.add_argument("--out", help="write the results as JSON here too")
    ap.add_argument("--face-crops", default=str(REPO.parent / "shared" / "data" / "fer2013" / "val"),
                    help="FER2013 class folders whose faces are pasted into the face-labelling photos")
    for key in ("image_size", "batch_size", "train_images", "label_images", "epochs", "face_photos", "videos",
                "video_seconds"):
        ap.add_argument("--" + key.replace("_", "-"), type=int)
    ap.add_argument("--parts", default="1,2,4,5",
                    help="which parts to run, e.g. 2,5 (3 comes with 1 and 2)")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",") if p.strip()}
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    sizes = {k: getattr(args, k) or v for k, v in SIZES[mode].items()}
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    cpus = os.cpu_count() or 1

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    results: dict = {"mode": mode, **sizes, "cpus": cpus, "parts": sorted(parts),
                     "device": torch.cuda.get_device_name(0) if mode == "gpu" else "cpu",
                     "torch": torch.__version__, "ray": ray.__version__}
    print(json.dumps(results), flush=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if 1 in parts:
            make_image_folder(work / "fer" / "train", sizes["train_images"], cpus)
            make_image_folder(work / "fer" / "val", max(700, sizes["train_images"] // 8), cpus)
        if 2 in parts:
            make_image_folder(work / "label", sizes["label_images"], cpus)
            make_image_folder(work / "label-quarter", sizes["label_images"] // 4, cpus)
        print(f"synthetic data written in {time.perf_counter() - t0:.1f} s", flush=True)

        from ray_fer.model_ref import DEFAULT_MODEL, resolve_model
        from ray_fer.precision import autocast_dtype

        # parts 2, 4 and 5 label with the packaged default model: part 1's model, trained on blobs
        # without a class signal, gives near-uniform probabilities, so under bf16 nearly every row
        # is a near-tie re-computed in fp32 (predictor.NEAR_TIE), which no real model does
        model = resolve_model(DEFAULT_MODEL)
        if 1 in parts:
            train_amp = autocast_dtype("auto", device, training=True)
            results["train_model_only_img_s"] = model_only_train(sizes["image_size"], sizes["batch_size"], device,
                                                                 train_amp)
        print(json.dumps({k: v for k, v in results.items() if "model_only" in k}), flush=True)
        if mode == "gpu":
            torch.cuda.empty_cache()

        ray.init(num_cpus=cpus, num_gpus=1 if mode == "gpu" else 0, include_dashboard=False, log_to_driver=False)
        if 1 in parts:
            results |= bench_train(work / "fer", work / "runs", mode=mode, image_size=sizes["image_size"],
                                   batch_size=sizes["batch_size"], epochs=sizes["epochs"], compile_model=False)
            results["train_ratio"] = results["train_img_s"] / results["train_model_only_img_s"]
            print(json.dumps({k: v for k, v in results.items() if k.startswith("train")}), flush=True)
        if 1 in parts and args.compile:
            compiled = bench_train(work / "fer", work / "runs-compiled", mode=mode, image_size=sizes["image_size"],
                                   batch_size=sizes["batch_size"], epochs=sizes["epochs"], compile_model=True)
            results["train_compiled_img_s"] = compiled["train_img_s"]
            print(json.dumps({"train_compiled_img_s": compiled["train_img_s"]}), flush=True)
        if 2 in parts:
            results["label_model_only_img_s"] = model_only_infer(model, 512 if mode == "gpu" else 64, device,
                                                                 autocast_dtype("auto", device))
            results["label_predictor_alone_img_s"], results["label_near_tie_share"] = predictor_alone(
                work / "label", model, device, batch=512 if mode == "gpu" else 64, batches=20 if mode == "gpu" else 5)
            if mode == "gpu":
                torch.cuda.empty_cache()
            results |= bench_label(work / "label", model, work / "labels", repeats=args.label_repeats,
                                   quarter=work / "label-quarter")
            results["label_ratio"] = results["label_img_s"] / results["label_model_only_img_s"]
            print(json.dumps({k: v for k, v in results.items() if k.startswith("label")}), flush=True)
        crops = Path(args.face_crops)
        have_crops = any(crops.glob("*/*.jpg"))
        if 4 in parts and sizes["face_photos"] and have_crops:
            t0 = time.perf_counter()
            photos = make_photo_folder(work / "photos", sizes["face_photos"], crops, cpus)
            print(f"{sizes['face_photos']} photos written in {time.perf_counter() - t0:.1f} s", flush=True)
            results["faces_detector_only_photos_s"] = detector_only(photos, device)
            results |= bench_faces(photos, model, work / "face-labels", repeats=2)
            results["faces_ratio"] = results["faces_photos_s"] / results["faces_detector_only_photos_s"]
        elif 4 in parts:
            print(f"4. face labelling skipped: no FER2013 class folders at {crops} (--face-crops)", flush=True)
        if 5 in parts and sizes["videos"] and have_crops:
            t0 = time.perf_counter()
            frames = make_video_folder(work / "videos", sizes["videos"], sizes["video_seconds"], cpus)
            print(f"{sizes['videos']} videos of {sizes['video_seconds']} s written in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            results |= bench_videos(work / "videos", frames, work / "video-labels", repeats=2)
            print(json.dumps({k: v for k, v in results.items() if k.startswith("video")}), flush=True)
        elif 5 in parts:
            print(f"5. video labelling skipped: no FER2013 class folders at {crops} (--face-crops)", flush=True)
        ray.shutdown()

    print()
    print(f"mode {mode} on {results['device']}, {sizes['image_size']} px, {cpus} CPUs")
    if "train_img_s" in results:
        print(f"1. training   ray-fer {results['train_img_s']:9.0f} img/s   model-only {results['train_model_only_img_s']:9.0f}"
              f" img/s   ratio {results['train_ratio']:.2f}   (GPU target >= 3,000 img/s and >= 0.80)")
    if "label_img_s" in results:
        print(f"2. labelling  ray-fer {results['label_img_s']:9.0f} img/s   model-only "
              f"{results['label_model_only_img_s']:9.0f} img/s   ratio {results['label_ratio']:.2f}   "
              f"(GPU target >= 12,000 img/s and >= 0.80)")
        print(f"              predictor alone {results['label_predictor_alone_img_s']:9.0f} img/s; the pipeline's "
              f"start-up {results['label_startup_s']:.0f} s, then {results['label_steady_img_s']:9.0f} img/s")
    if mode == "gpu":
        print(f"3. GPU        train: peak {results.get('train_gpu_mem_peak_gib')} GiB, median util "
              f"{results.get('train_gpu_util_median_pct')}%   label: peak {results.get('label_gpu_mem_peak_gib')} GiB, "
              f"median util {results.get('label_gpu_util_median_pct')}%")
    if "faces_photos_s" in results:
        print(f"4. faces      ray-fer {results['faces_photos_s']:9.0f} photos/s detector-only "
              f"{results['faces_detector_only_photos_s']:9.0f} photos/s ratio {results['faces_ratio']:.2f}   "
              f"(GPU target >= 500 photos/s; {results['faces_found']:,} faces)")
    if "video_frames_s" in results:
        print(f"5. videos     ray-fer {results['video_frames_s']:9.0f} sampled 1080p frames/s (every frame of "
              f"{results['video_frames']:,}), {results['video_frames_s'] / 2:,.0f} hours of video per hour at --fps 2   "
              f"(GPU target >= 1,000 frames/s)")
    print(json.dumps(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
