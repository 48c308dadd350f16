"""Video labelling benchmark (prints figures; not a test): sampled frames per second end to end
(video files -> Parquet, `ray-fer infer` at --fps 2) against a plain loop in the same run, and the
decode tasks' and predictor actors' peak memory on a short and a long 1080p video.

Videos: generated 1920x1080 H.264 at 25 frames/s (ray_fer/video/synthetic.py), three FER2013
faces of 240-300 px moving across a textured backdrop, people entering and leaving.

1. end to end, on --short-min minutes of video (medians of --repeats, taking turns):
   - pipeline: `label_images` on a running local Ray instance (its start-up and the actors'
     torch import inside the timing, as in bench_faces.py): segments of 60 s decoded by their own
     tasks, frames through the predictor actors, then the tracking pass;
   - plain: what one writes without Ray: PyAV decodes the video once, each sampled frame goes
     through the same detector, alignment and classifier, one frame at a time in one process
     (`ray-fer predict`'s own path), tracks at the end.
2. memory: the pipeline's peak RSS and USS per decode task and predictor actor (sampled from
   /proc, bench_faces.PeakMemory) on the short and on a --long-min video: flat in the video's
   length when decoding streams. The USS is the process's own memory; pages of Ray's object
   store that only it maps at the time are printed apart (bench_faces.private_bytes: they are the
   store's, which Ray sizes, and they had made an actor's USS look 2.3x bigger on 30 minutes).

Targets on 2 CPU cores: pipeline >= 1.5x plain; the peaks on the long video within 1.25x of
those on the short one.

    .venv/bin/python bench/bench_video.py [--short-min 1] [--long-min 30] [--repeats 3] [--skip memory]
        [--videos DIR]  (keeps the generated videos there, and reuses them: 30 minutes take 8 min to make)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_faces import ROLES, PeakMemory

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FPS = 2.0


def make(path: Path, minutes: float, seed: int = 0) -> int:
    """A 1080p25 video of `minutes` with three FER2013 faces; returns its sampled frames at FPS."""
    from ray_fer.video.synthetic import CODECS, Person, make_video

    CODECS["h264-fast"] = ("libx264", {"crf": "23", "preset": "ultrafast"})
    faces = sorted((DATA / "fer2013" / "val" / "happy").glob("*.jpg"))[:3]
    sad = sorted((DATA / "fer2013" / "val" / "sad").glob("*.jpg"))[:3]
    seconds = minutes * 60
    people = []
    for k in range(int(seconds // 20) + 1):  # a new cast every 20 s: people come and go
        t0 = 20.0 * k
        people += [Person([str(faces[0]), str(sad[0])], [t0, t0 + 10], t0, t0 + 20, (100, 200), (900, 260), side=280),
                   Person([str(faces[1])], [t0 + 3], t0 + 3, t0 + 17, (1500, 600), (1000, 500), side=240),
                   Person([str(sad[1]), str(faces[2])], [t0 + 5, t0 + 12], t0 + 5, t0 + 20, (400, 700), (600, 650), side=260)]
    make_video(path, people, duration_s=seconds, fps=25, size=(1920, 1080), codec="h264-fast", gop=50, seed=seed)
    return int(seconds * FPS)


def video(folder: Path, minutes: float, seed: int) -> int:
    """`folder` holding one generated video of `minutes` (made unless already there, as --videos
    keeps it); returns its sampled frames at FPS."""
    path = folder / "video.mp4"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        partial = folder / "video.part.mp4"  # named .mp4 for the encoder; renamed once whole
        frames = make(partial, minutes, seed=seed)
        partial.rename(path)
        print(f"made a {minutes:g}-minute 1080p video ({frames} frames at {FPS:g}/s) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return int(minutes * 60 * FPS)  # as make() counts them


def pipeline(folder: str, out: str) -> dict:
    from ray_fer.config import InferConfig
    from ray_fer.label.infer import label_images

    return label_images(InferConfig(input=folder, output=out, overwrite=True, fps=FPS))


def plain(video: str) -> int:
    from ray_fer.label.predict import predict_files

    result = predict_files("fer2013", [video], fps=FPS)
    return sum(1 for r in result["predictions"] if r.get("label"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short-min", type=float, default=1.0)
    parser.add_argument("--long-min", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["e2e", "memory"])
    parser.add_argument("--videos", type=Path, help="folder to keep the generated videos in and reuse them from")
    args = parser.parse_args()

    import ray
    import torch

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    results: dict = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "fps": FPS}
    with tempfile.TemporaryDirectory() as tmp:
        videos = args.videos or Path(tmp)
        short_dir = videos / f"{args.short_min:g}-min"
        frames = video(short_dir, args.short_min, seed=0)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        if "e2e" not in args.skip:
            rates: dict[str, list[float]] = {"pipeline": [], "plain": []}
            for r in range(args.repeats):
                t = time.perf_counter()
                pipeline(str(short_dir), os.path.join(tmp, "out"))
                rates["pipeline"].append(frames / (time.perf_counter() - t))
                t = time.perf_counter()
                plain(str(short_dir / "video.mp4"))
                rates["plain"].append(frames / (time.perf_counter() - t))
                print(f"repeat {r + 1}: pipeline {rates['pipeline'][-1]:.1f}, plain {rates['plain'][-1]:.1f} "
                      "sampled frames/s", flush=True)
            med = {k: statistics.median(v) for k, v in rates.items()}
            results["e2e"] = {"sampled_frames": frames, "frames_per_s": {k: round(v, 2) for k, v in med.items()},
                              "ratio": round(med["pipeline"] / med["plain"], 2)}
            print(f"\n1. end to end, {args.short_min:g} min of 1080p25 at {FPS:g} sampled frames/s (median of "
                  f"{args.repeats}): pipeline {med['pipeline']:.1f} frames/s, plain loop {med['plain']:.1f}: "
                  f"ratio {med['pipeline'] / med['plain']:.2f} (target >= 1.5)", flush=True)
        if "memory" not in args.skip:
            long_dir = videos / f"{args.long_min:g}-min"
            long_frames = video(long_dir, args.long_min, seed=1)
            memory = {}
            for name, folder, n in (("short", short_dir, frames), ("long", long_dir, long_frames)):
                with PeakMemory() as peaks:
                    t = time.perf_counter()
                    pipeline(str(folder), os.path.join(tmp, f"out-{name}"))
                    seconds = time.perf_counter() - t
                memory[name] = {"sampled_frames": n, "seconds": round(seconds, 1),
                                "frames_per_s": round(n / seconds, 2), **peaks.summary()}
                for role in ROLES:  # within one run: the peak over its first sixth against the whole run's
                    memory[name][role]["peak_uss_mb_first_sixth"] = peaks.peak_uss_until(role, seconds / 6)
            results["memory"] = memory
            print(f"\n2. peak memory per process (MB; USS: its own pages), {args.short_min:g} vs {args.long_min:g} min:")
            for role in ROLES:
                s, lg = memory["short"][role], memory["long"][role]
                print(f"   {role}: RSS {s['peak_rss_mb']:,} -> {lg['peak_rss_mb']:,}, USS {s['peak_uss_mb']:,} -> "
                      f"{lg['peak_uss_mb']:,} (ratio {lg['peak_uss_mb'] / max(s['peak_uss_mb'], 1):.2f}; target <= 1.25); "
                      f"object store pages mapped by it alone {s['peak_store_private_mb']:,} -> "
                      f"{lg['peak_store_private_mb']:,}")
                first = lg["peak_uss_mb_first_sixth"]  # 0: no process of the role sampled that early
                ratio = f"ratio {lg['peak_uss_mb'] / first:.2f}" if first else "none sampled by then"
                print(f"      within the long run: USS {first:,} by its first sixth, {lg['peak_uss_mb']:,} over the "
                      f"whole run ({ratio})")
            print(f"   long video: {memory['long']['frames_per_s']} sampled frames/s over {memory['long']['seconds']} s")
        ray.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
