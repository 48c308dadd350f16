"""Face labelling benchmark (prints figures; not a test): photos per second end to end (files ->
Parquet) through `ray-fer infer --faces detect`, against plain loops in the same run, on synthetic
1280x960 JPEGs holding 1-4 FER2013 faces each (bench/synthetic_faces.py). Medians of --repeats,
the variants taking turns.

1. end to end:
   - pipeline: `label_images(faces="detect")` on a running local Ray instance (its start-up, the
     predictor actors importing torch, is inside the timing, as in bench_infer.py);
   - plain_facenet: what one writes without Ray: facenet-pytorch's own MTCNN on each full photo
     (min_face_size scaled to search the same smallest face as ray-fer: 20 px of the 640 px copy
     is 40 px of a 1280 px photo; the same thresholds), each face's box cut square from the gray
     photo and resized to 48 px, the classifier on the photo's faces, one photo at a time, one
     process with torch's default threads, pandas to Parquet;
   - plain_ray_fer: ray-fer's own decode, detector and alignment (FacePredictor) called on one
     photo at a time in one process: the pipeline's gain beyond the detector's implementation.
2. the detector alone on the real photos (../shared/data/photos) at detection sizes 640 and
   1024: milliseconds per photo on one thread and faces found (how faces.DETECT_SIZE was chosen).

Targets on 2 CPU cores: >= 10 photos/s and >= 1.5x plain_facenet.

    .venv/bin/python bench/bench_faces.py [--photos 240] [--model fer2013] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
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
    from ray_fer.infer import label_images

    summary = label_images(InferConfig(model=model, input=folder, output=out, overwrite=True, faces="detect"))
    return summary["images"]


def plain_facenet(paths: list[str], model: str, out: str) -> int:
    import pandas as pd
    from facenet_pytorch import MTCNN

    from ray_fer.face_options import DETECT_SIZE
    from ray_fer.faces import MIN_FACE, THRESHOLDS
    from ray_fer.model import load_bundle
    from ray_fer.predictor import predict_probs

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

    from ray_fer.data import decode_photos

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
    from ray_fer.decode import IMAGE_EXTENSIONS, decode_photo
    from ray_fer.faces import FaceDetector

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=240, help="synthetic 1280x960 photos to label")
    parser.add_argument("--model", help="model bundle (default: the packaged fer2013, else one trained here)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crops", default=str(DATA / "fer2013" / "val"), help="FER2013 faces to paste")
    parser.add_argument("--skip", nargs="*", default=[], choices=["e2e", "sizes"])
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance on loopback
    tmp = tempfile.mkdtemp(prefix="bench-faces-")
    load = os.getloadavg()[0]
    results: dict[str, Any] = {"photos": args.photos, "cpus": os.cpu_count(), "load_average_at_start": round(load, 2)}
    print(f"{args.photos} synthetic photos; {os.cpu_count()} CPUs; load average {load:.2f} at start", flush=True)

    if "e2e" not in args.skip:
        import ray

        from ray_fer.face_predictor import FacePredictor

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
        e2e: dict[str, Any] = median_rates({
            "pipeline": lambda: pipeline(str(Path(tmp) / "photos"), model, out + "-ray"),
            "plain_facenet": lambda: plain_facenet(paths, model, out + "-facenet"),
            "plain_ray_fer": lambda: plain_ray_fer(paths, predictor, out + "-plain"),
        }, args.repeats)
        for name in ("plain_facenet", "plain_ray_fer"):
            e2e[f"ratio_vs_{name}"] = round(e2e["pipeline"]["images_per_s"] / e2e[name]["images_per_s"], 2)
        results["e2e"] = e2e
        print(f"\n1. end to end (files -> Parquet), {args.photos} photos of 1280x960 with 1-4 faces, "
              f"median of {args.repeats} (rates are photos/s)")
        print_rates(e2e, name_width=14)
        print(f"   pipeline / plain_facenet = {e2e['ratio_vs_plain_facenet']:.2f}x (target >= 1.5x, >= 10 photos/s); "
              f"pipeline / plain_ray_fer = {e2e['ratio_vs_plain_ray_fer']:.2f}x", flush=True)
        ray.shutdown()

    if "sizes" not in args.skip:
        sizes = detection_sizes()
        results["detection_sizes"] = sizes
        print("\n2. the detector alone on the real photos, one thread")
        for size, r in sizes.items():
            print(f"   {size:>5} px: {r}")
    results["load_average_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
