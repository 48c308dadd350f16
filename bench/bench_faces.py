"""Face labelling benchmark (prints figures; not a test): photos per second end to end (files ->
Parquet) through `ray-fer infer --faces detect`, against plain loops in the same run, on synthetic
1280x960 JPEGs holding 1-4 FER2013 faces each (bench/synthetic_faces.py). Medians of --repeats,
the variants taking turns.

1. end to end:
   - pipeline: `label_images(faces="detect")` on a running local Ray instance (its start-up, the
     predictor actors importing torch, is inside the timing, as in bench_infer.py), on --photos
     and on the first --small of them: seconds = start-up + photos / running rate, fitted from the
     two medians, says what a bigger store would see;
   - plain_facenet: what one writes without Ray: facenet-pytorch's own MTCNN on each full photo
     (min_face_size scaled to search the same smallest face as ray-fer: 20 px of the 640 px copy
     is 40 px of a 1280 px photo; the same thresholds), each face's box cut square from the gray
     photo and resized to 48 px, the classifier on the photo's faces, one photo at a time, one
     process with torch's default threads, pandas to Parquet;
   - plain_ray_fer: ray-fer's own decode, detector and alignment (FacePredictor) called on one
     photo at a time in one process: the pipeline's gain beyond the detector's implementation.
2. the detector alone on the real photos (../shared/data/photos) at detection sizes 640 and
   1024: milliseconds per photo on one thread and faces found (how faces.DETECT_SIZE was chosen).
3. memory: the pipeline's peak memory per process (RSS, and USS: its own pages, without shared
   libraries; object-store pages that only it maps are printed apart, see private_bytes) for the
   predictor actors and the decode tasks, sampled from
   /proc while it labels --photos files of 1280x960 and then the same photos enlarged to 24
   megapixels (5664x4248; --memory-distinct distinct images, hard-linked to --photos files).

Targets on 2 CPU cores: >= 10 photos/s and >= 1.5x plain_facenet; the actors' peak USS on
24-megapixel photos within the memory they declare (plan.FACE_PREDICTOR_MEMORY, 4 GiB): bounded
by the decoded copies (at most a 1,920-px gray and a 640-px RGB copy of each photo: 3.6 MB), not
the photos' size (a 128-photo batch of full-size copies would hold 12 GB).

    .venv/bin/python bench/bench_faces.py [--photos 960] [--small 240] [--model fer2013] [--repeats 3] [--skip e2e sizes]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench_infer import median_rates, print_rates, quick_trained_bundle
from synthetic_faces import make_photo

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def make_photos(folder: Path, n: int, crops_dir: Path, seed: int = 0) -> list[str]:
    """n 1280x960 JPEGs (quality 90) with 1-4 FER2013 faces of 80-300 px, rolled by up to 10 degrees."""
    files = sorted(crops_dir.glob("*/*.jpg"))[::7]
    crops = [np.asarray(Image.open(f).convert("L")) for f in files]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img, _ = make_photo(rng, crops, faces=int(rng.integers(1, 5)), max_angle=10.0)
        paths.append(str(folder / f"{i:05d}.jpg"))
        img.save(paths[-1], quality=90)
    return paths


def resolve_bundle(model: str | None, tmp: str) -> str:
    """The bundle to time: --model, else the packaged fer2013 model, else one trained here (~2 min)."""
    from ray_fer.model_ref import resolve_model

    try:
        return resolve_model(model or "fer2013")
    except Exception as e:  # noqa: BLE001 - no packaged model in this checkout
        if model:
            raise
        print(f"no packaged model ({e}); training a bundle for the timings (~2 min)", flush=True)
        return quick_trained_bundle(os.path.join(tmp, "model.pt"), 64, str(DATA / "fer2013" / "train"))


# --------------------------------------------------------------------------------------------
# 1. End to end


def pipeline(folder: str, model: str, out: str) -> int:
    from ray_fer.config import InferConfig
    from ray_fer.label.infer import label_images

    summary = label_images(InferConfig(model=model, input=folder, output=out, overwrite=True, faces="detect"))
    return summary["images"]


def plain_facenet(paths: list[str], model: str, out: str) -> int:
    import pandas as pd
    from facenet_pytorch import MTCNN

    from ray_fer.faces.options import DETECT_SIZE
    from ray_fer.faces.detector import MIN_FACE, THRESHOLDS
    from ray_fer.model import load_bundle
    from ray_fer.label.predictor import predict_probs

    bundle, model_id = load_bundle(model)
    net = bundle.build_model()
    preset = bundle.eval_preset(channels_last=False)
    mtcnn = MTCNN(keep_all=True, min_face_size=round(MIN_FACE * 1280 / DETECT_SIZE), thresholds=list(THRESHOLDS))
    rows: list[dict[str, Any]] = []
    for path in paths:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        boxes, scores = mtcnn.detect(rgb)
        if boxes is None:
            rows.append({"path": path, "face": None})
            continue
        gray = rgb.convert("L")
        crops = []
        for x1, y1, x2, y2 in boxes:
            side = max(x2 - x1, y2 - y1)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            square = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            crops.append(np.asarray(gray.crop(square).resize((48, 48), Image.Resampling.BILINEAR)))
        probs = predict_probs(net, preset, torch.from_numpy(np.stack(crops))).numpy()
        for k, (box, score, p) in enumerate(zip(boxes, scores, probs)):
            rows.append({"path": path, "face": k, "box_x": float(box[0]), "box_y": float(box[1]),
                         "face_score": float(score), "label": bundle.classes[int(p.argmax())],
                         "confidence": float(p.max()), "model": model_id})
    os.makedirs(out, exist_ok=True)
    pd.DataFrame(rows).to_parquet(os.path.join(out, "part-0.parquet"))
    return len(paths)


def plain_ray_fer(paths: list[str], predictor: Any, out: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_fer.label.datasets import decode_photos

    tables = []
    for path in paths:
        [block] = decode_photos({"path": np.array([path], dtype=object)}, decode_size=48, detect_size=640,
                                faces="detect")
        tables.append(predictor(block))
    os.makedirs(out, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), os.path.join(out, "part-0.parquet"))
    return len(paths)


# --------------------------------------------------------------------------------------------
# 2. The detector alone, by detection size


def detection_sizes(sizes: tuple[int, ...] = (640, 1024)) -> dict[str, Any]:
    from ray_fer.label.decode import IMAGE_EXTENSIONS, decode_photo
    from ray_fer.faces.detector import FaceDetector

    folder = DATA / "photos"
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        return {"skipped": f"no photos in {folder}"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    detector = FaceDetector("cpu")
    out = {}
    for size in sizes:
        copies = [decode_photo(f.read_bytes(), detect_size=size, size=48).detect for f in files]
        detector.detect(copies[:1])  # warm-up
        times, faces = [], 0
        for c in copies:
            start = time.perf_counter()
            faces += len(detector.detect([c])[0])
            times.append(time.perf_counter() - start)
        out[str(size)] = {"photos": len(files), "faces": faces, "ms_per_photo_median": round(1000 * statistics.median(times), 1),
                          "ms_per_photo_mean": round(1000 * statistics.fmean(times), 1)}
    torch.set_num_threads(threads)
    return out


# --------------------------------------------------------------------------------------------
# 3. Memory on big photos

BIG = (5664, 4248)  # 24.06 megapixels, 4:3 like the 1280x960 photos it is enlarged from
ROLES = {"actors": "FacePredictorActor", "decode tasks": "decode_photos"}  # in Ray's process titles


def private_bytes(pid: int) -> tuple[int, int]:
    """A process's private (USS) bytes from /proc/<pid>/smaps, split in two: its own memory, and
    the pages of Ray's object store (the `/dev/shm/plasma*` mapping) that only it maps now.

    smaps calls a page of a shared mapping private when one process alone maps it. An object
    store page that a decode task wrote and an actor read is shared while both map it; once the
    writer's worker process is gone (Ray reaps idle workers), it counts in the actor's USS, and the
    longer the run, the more such pages: on a 30-minute video an actor's USS peaked at 1,742 MB
    while its own memory stayed at 767 MB. Those pages belong to the object store, which Ray sizes
    (`object_store_memory`), not to the process, so they are reported apart."""
    own = store = 0
    in_store = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                kb = int(line.split()[1]) * 1024
                if in_store:
                    store += kb
                else:
                    own += kb
            elif not line[0].isupper():  # a mapping's header line: "start-end perms offset dev inode [path]"
                fields = line.split(None, 5)
                in_store = len(fields) > 5 and os.path.basename(fields[5].strip()).startswith("plasma")
    return own, store


class PeakMemory:
    """Peak RSS and USS per Ray process whose title names a pipeline stage (ROLES), sampled from
    /proc: RSS every 0.2 s, USS (reading smaps costs more) every second. The USS is the process's
    own memory; the object store's pages that only it maps at a sample are counted apart
    (`peak_store_private_mb`, see private_bytes). `timeline` keeps each USS sample (seconds from
    the start, role, bytes), so a long run shows whether a process keeps growing or levels off."""

    def __init__(self) -> None:
        self.peaks: dict[str, dict[int, list[int]]] = {role: {} for role in ROLES}
        self.timeline: list[tuple[float, str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil  # Ray's bundled copy, on sys.path once Ray is imported

        tick = 0
        start = time.perf_counter()
        while not self._stop.wait(0.2):
            for p in psutil.process_iter(["pid", "cmdline"]):
                title = " ".join(p.info["cmdline"] or ())
                role = next((r for r, name in ROLES.items() if name in title), None)
                if role is None:
                    continue
                try:
                    peak = self.peaks[role].setdefault(p.pid, [0, 0, 0])
                    peak[0] = max(peak[0], p.memory_info().rss)
                    if tick % 5 == 0:
                        own, store = private_bytes(p.pid)
                        peak[1], peak[2] = max(peak[1], own), max(peak[2], store)
                        self.timeline.append((time.perf_counter() - start, role, own))
                except (psutil.Error, OSError):
                    continue
            tick += 1

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per role: the processes seen and the largest peak RSS, USS (own memory) and object
        store pages mapped by it alone among them, in MB."""
        def mb(peaks: dict[int, list[int]], k: int) -> int:
            return round(max((p[k] for p in peaks.values()), default=0) / 2**20)

        return {role: {"processes": len(peaks), "peak_rss_mb": mb(peaks, 0), "peak_uss_mb": mb(peaks, 1),
                       "peak_store_private_mb": mb(peaks, 2)}
                for role, peaks in self.peaks.items()}

    def peak_uss_until(self, role: str, seconds: float) -> int:
        """The largest USS (MB) of a process of `role` sampled in the first `seconds` of the run."""
        return round(max((b for t, r, b in self.timeline if r == role and t <= seconds), default=0) / 2**20)


def make_big_photos(small: list[str], folder: Path, distinct: int) -> None:
    """As many files in `folder` as `small` has: its first `distinct` photos enlarged to BIG (JPEG
    quality 90), hard-linked in turn (the same bytes, so the files cost no disk and decode alike)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = small[:distinct]
    for i, path in enumerate(sources):
        with Image.open(path) as im:
            im.resize(BIG, Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    for i in range(len(sources), len(small)):
        os.link(folder / f"{i % len(sources):05d}.jpg", folder / f"{i:05d}.jpg")


def memory(photos: Path, tmp: str, model: str, distinct: int) -> dict[str, Any]:
    """The pipeline's peak memory per stage on the 1280x960 photos in folder `photos` and on the
    same photos enlarged to 24 megapixels; one run each, Ray started afresh for each."""
    import ray

    big = Path(tmp) / "memory-big"
    small = sorted(str(p) for p in photos.glob("*.jpg"))
    start = time.perf_counter()
    make_big_photos(small, big, distinct)
    print(f"{len(small)} photos of {BIG[0]}x{BIG[1]} ({distinct} distinct) written in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    out: dict[str, Any] = {}
    for name, folder in (("1280x960", photos), (f"{BIG[0]}x{BIG[1]}", big)):
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        with PeakMemory() as peaks:
            start = time.perf_counter()
            n = pipeline(str(folder), model, os.path.join(tmp, f"memory-out-{name}"))
            seconds = time.perf_counter() - start
        ray.shutdown()
        out[name] = {"photos": n, "seconds": round(seconds, 1), "photos_per_s": round(n / seconds, 1), **peaks.summary()}
    small_uss, big_uss = (out[k]["actors"]["peak_uss_mb"] for k in out)
    out["actor_uss_ratio"] = round(big_uss / max(small_uss, 1), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=960, help="synthetic 1280x960 photos to label")
    parser.add_argument("--small", type=int, default=240,
                        help="the pipeline also labels the first SMALL photos, to fit its start-up and running rate (0: not)")
    parser.add_argument("--model", help="model bundle (default: the packaged fer2013, else one trained here)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crops", default=str(DATA / "fer2013" / "val"), help="FER2013 faces to paste")
    parser.add_argument("--memory-distinct", type=int, default=16, help="distinct 24-megapixel photos (section 3)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["e2e", "sizes", "memory"])
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance on loopback
    tmp = tempfile.mkdtemp(prefix="bench-faces-")
    load = os.getloadavg()[0]
    results: dict[str, Any] = {"photos": args.photos, "cpus": os.cpu_count(), "load_average_at_start": round(load, 2)}
    print(f"{args.photos} synthetic photos; {os.cpu_count()} CPUs; load average {load:.2f} at start", flush=True)

    if "e2e" not in args.skip:
        import ray

        from ray_fer.label.face_predictor import FacePredictor

        model = resolve_bundle(args.model, tmp)
        results["model"] = model
        start = time.perf_counter()
        paths = make_photos(Path(tmp) / "photos", args.photos, Path(args.crops))
        print(f"photos written in {time.perf_counter() - start:.1f} s; model {model}", flush=True)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        predictor = FacePredictor(model)
        out = os.path.join(tmp, "out")
        plain_facenet(paths[:2], model, out + "-warm")  # warm the page cache and oneDNN, untimed
        timed = {"pipeline": lambda: pipeline(str(Path(tmp) / "photos"), model, out + "-ray")}
        if 0 < args.small < args.photos:  # the first --small photos, for the start-up fit
            small = Path(tmp) / "photos-small"
            small.mkdir()
            for path in paths[:args.small]:
                os.link(path, small / Path(path).name)
            timed[f"pipeline_{args.small}"] = lambda: pipeline(str(small), model, out + "-ray-small")
        e2e: dict[str, Any] = median_rates(timed | {
            "plain_facenet": lambda: plain_facenet(paths, model, out + "-facenet"),
            "plain_ray_fer": lambda: plain_ray_fer(paths, predictor, out + "-plain"),
        }, args.repeats)
        for name in ("plain_facenet", "plain_ray_fer"):
            e2e[f"ratio_vs_{name}"] = round(e2e["pipeline"]["images_per_s"] / e2e[name]["images_per_s"], 2)
        fit: dict[str, Any] = {}
        if len(timed) == 2:  # seconds = start-up + photos / running rate, from the two sizes' medians
            per_photo = ((e2e["pipeline"]["seconds"] - e2e[f"pipeline_{args.small}"]["seconds"])
                         / (args.photos - args.small))
            fit = {"startup_s": round(e2e[f"pipeline_{args.small}"]["seconds"] - args.small * per_photo, 1),
                   "running_photos_per_s": round(1 / per_photo, 1) if per_photo > 0 else None}
        results["e2e"] = e2e | ({"fit": fit} if fit else {})
        print(f"\n1. end to end (files -> Parquet), {args.photos} photos of 1280x960 with 1-4 faces, "
              f"median of {args.repeats} (rates are photos/s)")
        print_rates(e2e, name_width=14)
        print(f"   pipeline / plain_facenet = {e2e['ratio_vs_plain_facenet']:.2f}x (target >= 1.5x, >= 10 photos/s); "
              f"pipeline / plain_ray_fer = {e2e['ratio_vs_plain_ray_fer']:.2f}x", flush=True)
        if fit:
            print(f"   pipeline, fitted from {args.small} and {args.photos} photos: {fit['startup_s']} s of start-up "
                  f"(Ray's workers, the actors importing torch and loading the models), then "
                  f"{fit['running_photos_per_s']} photos/s", flush=True)
        ray.shutdown()

    if "sizes" not in args.skip:
        sizes = detection_sizes()
        results["detection_sizes"] = sizes
        print("\n2. the detector alone on the real photos, one thread")
        for size, r in sizes.items():
            print(f"   {size:>5} px: {r}")
    if "memory" not in args.skip:
        model = results.get("model") or resolve_bundle(args.model, tmp)
        photos = Path(tmp) / "photos"  # section 1's, else made here
        if not photos.is_dir():
            make_photos(photos, args.photos, Path(args.crops))
        mem = memory(photos, tmp, model, args.memory_distinct)
        results["memory"] = mem
        print(f"\n3. peak memory per process while labelling {args.photos} photos (MB; USS: its own pages)")
        for name, r in mem.items():
            if isinstance(r, dict):
                stages = "; ".join(f"{role}: {v['processes']} seen, RSS {v['peak_rss_mb']:,}, USS {v['peak_uss_mb']:,} "
                                   f"(+{v['peak_store_private_mb']:,} of the object store's)"
                                   for role, v in r.items() if isinstance(v, dict))
                print(f"   {name:>9}: {r['photos_per_s']} photos/s; {stages}")
        from ray_fer.label.plan import FACE_PREDICTOR_MEMORY

        big = mem[f"{BIG[0]}x{BIG[1]}"]["actors"]["peak_uss_mb"]
        print(f"   actors' peak USS on 24 megapixels: {big:,} MB, {mem['actor_uss_ratio']:.2f}x that on 1280x960 "
              f"(target: within the {FACE_PREDICTOR_MEMORY / 2**20:,.0f} MB they declare)", flush=True)
    results["load_average_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
