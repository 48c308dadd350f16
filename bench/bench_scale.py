"""Labelling at scale (prints figures; not a test): start-up and the driver's memory against the
store's size.

Generates stores of small JPEGs, FER2013 faces hard-linked under many sub-folders (1,000 files a
folder, 100 folders a group), and a store of objects on a loopback S3 server (moto), then runs
`ray-fer infer` on each in a process of its own, joined to one Ray instance that the benchmark
starts first (as on a cluster, the driver is only the command). For each store it measures:

- time to the first labelled rows (the progress display's first count above 0, counted as rows
  leave the predictors; the command runs on a pseudo-terminal so that the display redraws every
  0.5 s; the first Parquet file is written once 100,000 rows are ready),
- total time and images/s (start-up included),
- the driver's peak memory (RSS of the `ray-fer infer` process, sampled every 0.1 s; and its USS,
  its own pages without shared libraries, every 1 s).

    .venv/bin/python bench/bench_scale.py                       # 100,000 and 1,000,000 local, 100,000 on S3
    .venv/bin/python bench/bench_scale.py --local 2000 --s3 500 # a quick check that it works

Targets (issue 14): the driver's peak at 1M within 1.5x of that at 100k, and under 1 GB; the first
rows within 30 s at 1M. Without --model a bundle with random weights is made (its speed is a
trained model's; its labels mean nothing). Generating the 1M store takes a few minutes and
about 100 MB of directory entries (hard links: no copies of the images).
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FACES = REPO.parent / "shared" / "data" / "fer2013" / "train"
PER_FOLDER = 1000  # files per leaf folder
PER_GROUP = 100  # leaf folders per top-level folder
PROGRESS = re.compile(r"([\d,]+)/([\d,]+) images")


def face_files(root: Path, n: int) -> list[Path]:
    files = sorted(root.rglob("*.jpg"))[:n]
    if not files:
        sys.exit(f"no FER2013 faces under {root}; pass --faces PATH")
    return files


def make_local_store(folder: Path, n: int, faces: list[Path]) -> Path:
    """N hard links to FER2013 faces: <folder>/gNNN/dNNN/iNNNNNNN.jpg; reused if complete."""
    done = folder / "_COMPLETE"
    if done.is_file() and int(done.read_text()) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    for i in range(n):
        leaf = folder / f"g{i // (PER_FOLDER * PER_GROUP):03d}" / f"d{i // PER_FOLDER % PER_GROUP:03d}"
        if i % PER_FOLDER == 0:
            leaf.mkdir(parents=True)
        os.link(faces[i % len(faces)], leaf / f"i{i:08d}.jpg")
    done.write_text(str(n))
    print(f"  made {folder} ({n:,} files) in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def start_s3() -> tuple[object, dict[str, str]]:
    """A moto S3 server on 127.0.0.1 and the environment that points boto3, pyarrow and Ray at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)
    return server, env


def make_s3_store(bucket: str, n: int, faces: list[Path]) -> str:
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    blobs = [f.read_bytes() for f in faces[:1000]]
    started = time.perf_counter()

    def put(i: int) -> None:
        key = f"store/g{i // (PER_FOLDER * PER_GROUP):03d}/d{i // PER_FOLDER % PER_GROUP:03d}/i{i:08d}.jpg"
        s3.put_object(Bucket=bucket, Key=key, Body=blobs[i % len(blobs)])

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))
    print(f"  made s3://{bucket}/store ({n:,} objects) in {time.perf_counter() - started:.0f} s", flush=True)
    return f"s3://{bucket}/store"


def small_model(path: Path) -> str:
    """EfficientNet-B0 with random weights whose batch norms are calibrated on random faces, as a
    bundle: outputs that differ from image to image, as a trained model's do (no data needed)."""
    import torch

    from ray_fer.images import EvalPreset
    from ray_fer.model import ModelBundle, build_model, save_bundle

    torch.manual_seed(0)
    model = build_model("none")
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    preset = EvalPreset(image_size=48, channels_last=False)
    with torch.no_grad():
        model.train()(preset(torch.randint(0, 256, (64, 48, 48), dtype=torch.uint8)))
        model.classifier[1].weight.normal_(0.0, 0.3)
    save_bundle(ModelBundle(state_dict=model.eval().state_dict(), image_size=48, decode_size=48), str(path))
    return str(path)


def run_infer(src: str, dst: str, model: str, env: dict[str, str], extra: list[str]) -> dict[str, object]:
    """`ray-fer infer` in its own process on a pseudo-terminal: its first progress, total time,
    peak RSS and JSON summary."""
    import psutil  # Ray's bundled copy, on sys.path once Ray is imported (main imports it first)

    cmd = [sys.executable, "-m", "ray_fer.cli", "infer", "--model", model, "--input", src, "--output", dst,
           "--faces", "whole", *extra]
    master, slave = pty.openpty()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=env, cwd=REPO, text=True)
    os.close(slave)
    peak = [0, 0]  # RSS, USS (its own pages: no shared libraries or object-store pages)
    stop = threading.Event()

    def sample() -> None:
        p = psutil.Process(proc.pid)
        ticks = 0
        while not stop.wait(0.1):
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
                if ticks % 10 == 0:  # reading smaps costs more: once a second
                    peak[1] = max(peak[1], p.memory_full_info().uss)
            except psutil.Error:
                return
            ticks += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first = None
    tail = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                chunk = b""
            if not chunk and proc.poll() is not None:
                break
            tail = (tail + chunk)[-20000:]
            if first is None:
                for done, _ in PROGRESS.findall(chunk.decode(errors="replace")):
                    if int(done.replace(",", "")) > 0:
                        first = time.perf_counter() - started
                        break
        elif proc.poll() is not None:
            break
    out = proc.stdout.read()
    proc.wait()
    total = time.perf_counter() - started
    stop.set()
    sampler.join()
    os.close(master)
    if proc.returncode != 0:
        raise SystemExit(f"ray-fer infer failed ({proc.returncode}):\n{tail.decode(errors='replace')[-3000:]}")
    summary = json.loads(out.strip().splitlines()[-1])
    return {"images": summary["images"], "first_rows_s": round(first, 1) if first is not None else None,
            "total_s": round(total, 1), "images_per_s": round(summary["images"] / total, 1),
            "driver_peak_mb": round(peak[0] / 2**20, 1), "driver_peak_uss_mb": round(peak[1] / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=int, nargs="*", default=[100_000, 1_000_000], help="local store sizes")
    parser.add_argument("--s3", type=int, nargs="*", default=[100_000], help="S3 store sizes (loopback moto)")
    parser.add_argument("--work", default="/tmp/ray-fer-scale", help="where the stores and outputs go")
    parser.add_argument("--faces", default=str(FACES), help="FER2013 faces to link (default: the train split)")
    parser.add_argument("--model", help="model.pt (default: random weights)")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    faces = face_files(Path(args.faces), 10_000)
    model = args.model or small_model(work / "random.pt")
    server, aws = start_s3() if args.s3 else (None, {})

    import ray

    ray.init(include_dashboard=False, runtime_env={"env_vars": aws} if aws else None)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, **aws}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    results: dict[str, object] = {"cpus": ray.cluster_resources().get("CPU")}
    try:
        for n in args.local:
            store = make_local_store(work / f"store-{n}", n, faces)
            dst = work / f"out-{n}"
            shutil.rmtree(dst, ignore_errors=True)
            results[f"local_{n}"] = r = run_infer(str(store), str(dst), model, env, [])
            print(f"local {n:>9,}: {r}", flush=True)
            shutil.rmtree(dst, ignore_errors=True)
        for n in args.s3:
            src = make_s3_store(f"bench-{n}", n, faces)
            results[f"s3_{n}"] = r = run_infer(src, f"s3://bench-{n}/labels", model, env, [])
            print(f"s3    {n:>9,}: {r}", flush=True)
    finally:
        ray.shutdown()
        if server is not None:
            server.stop()
    local = [results[f"local_{n}"] for n in sorted(args.local)]
    if len(local) >= 2:
        small, large = local[0], local[-1]
        results["peak_ratio"] = round(large["driver_peak_mb"] / small["driver_peak_mb"], 2)
        print(f"driver peak {large['driver_peak_mb']} MB at {large['images']:,} vs {small['driver_peak_mb']} MB at "
              f"{small['images']:,}: {results['peak_ratio']}x (target <= 1.5x and < 1024 MB); first rows at "
              f"{large['images']:,} after {large['first_rows_s']} s (target < 30 s)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
