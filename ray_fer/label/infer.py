"""The labelling pipeline: an image store in, a Parquet table of expressions out.

    model_ref.ModelFile (driver: reads --model; a Ray task opens it: the driver imports no torch)
    inputs.find_inputs (driver: checks the folder, s3:// prefix or manifest; plans the listing)
      -> output.OutputRun (driver: the output's lease, --overwrite / --skip-existing, before any
         labelling; under --skip-existing the sorted keys of the paths already labelled)
      -> inputs.input_dataset (listing tasks, or tasks reading the manifest: blocks of paths)
      -> resume.drop_done (--skip-existing: the paths already labelled leave the stream)
      -> data.decoded_dataset (CPU tasks: read bytes, decode to small uint8 faces, or each photo
         once to the detector's small RGB copy and a gray copy to crop from)
      -> predictor.Predictor (actors: the model loaded once each, on a GPU or CPU threads), or
         face_predictor.FacePredictor (the same plus the face detector: detect, align, label)
      -> schema.to_output (in the same actors) -> write_parquet into the run's staging folder
      -> OutputRun.check (the rows' digest against the paths' one) -> OutputRun.commit

Nothing on the driver grows with the store: the paths stream from task to task, and a
`pathsets.Tally` actor sums the digests of the blocks listed and of those decoded. With
--faces whole every listed file becomes exactly one row; with detect (and auto, for photos) one
row per face, and one row for a file without a face. A file that cannot be read or decoded gets
one row with `error` set and the job goes on. The output protocol is described in store/output.py.
"""

from __future__ import annotations

import _thread
import functools
import logging
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

from ray_fer import __version__, cluster, console

from ray_fer.store import storage
from ray_fer.config import InferConfig
from ray_fer.label.datasets import PHOTO_DECODE_BATCH, VideoOptions
from ray_fer.faces.options import check_detector
from ray_fer.label.inputs import blocks_of, find_inputs, input_dataset, no_images
from ray_fer.label.listing import LIST_CPUS
from ray_fer.model_ref import ModelFile, ModelRef
from ray_fer.schema import KIND_COLUMN, TRACKED_KIND, VIDEO_KIND, output_schema, to_output
from ray_fer.store.output import ROWS_PER_FILE, OutputRun
from ray_fer.store.pathsets import Tally, tally_block
from ray_fer.label.pipeline import open_model, prediction_dataset
from ray_fer.label.videos import track_videos
from ray_fer.store.resume import drop_done

log = logging.getLogger(__name__)


def label_images(cfg: InferConfig) -> dict[str, Any]:
    """Label every image under `cfg.input` into a Parquet data set at `cfg.output`.

    Checks the model, the input and the output before any labelling; holds the output's lease
    while it runs, and replaces or extends the output only once every new row is written and
    checked (the protocol is in store/output.py). Returns the summary that
    `_SUCCESS` also holds: images, labelled and errors (the whole output, counted in files; with
    faces also faces, no_face: files read fine without a face, not counted as labelled, and
    videos: how many of the files are videos), processed and skipped (this run), output, model,
    seconds and images_per_s (this run's files over its wall time).
    """
    cfg.check()
    if cfg.faces != "whole":
        check_detector()
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    model_file = ModelFile.read(cfg.model)  # the file's bytes only: torch opens it in a Ray task below
    faces = cfg.faces != "whole"
    inputs = find_inputs(cfg.input, videos=faces)
    # then the output's lease: a second run on a live output is refused in seconds, before Ray
    # starts or the model is opened
    with OutputRun(cfg.output, overwrite=cfg.overwrite, skip_existing=cfg.skip_existing, faces=faces) as out:
        cluster.connect()
        cluster.refuse_local_paths({"input": cfg.input, "output": cfg.output})
        model = open_model(model_file)
        out.prepare(model.model_id)
        tally = Tally()
        with blocks_of(min(cfg.decode_batch_size, PHOTO_DECODE_BATCH[cfg.faces]) if faces else cfg.decode_batch_size):
            paths = input_dataset(inputs).map_batches(
                tally_block, fn_kwargs={"tally": tally.actor, "name": "listed"}, batch_size=None,
                batch_format="pyarrow", num_cpus=LIST_CPUS)
        if out.done_count:  # the anti-join: paths with a row that stays are not labelled again
            paths = paths.map_batches(drop_done, fn_kwargs={"done": out.done}, batch_size=None,
                                      batch_format="pyarrow", num_cpus=LIST_CPUS)
        _label_while_holding(out, paths, model, cfg, tally)
        listed = tally.counts().get("listed", 0)
        if not listed:
            raise no_images(cfg.input, inputs.extensions)
        todo = tally.total("todo")
        what = _counted(faces)
        log.info("listed %s %s under %s", f"{listed:,}", what, cfg.input)
        skipped = listed - todo.count
        if skipped:
            log.info("--skip-existing: %d of %d %s are already in %s", skipped, listed, what, cfg.output)
        counts = out.check(todo)
        seconds = time.perf_counter() - t0
        summary = {
            "images": counts["images"], "labelled": counts["labelled"], "errors": counts["errors"],
            **({k: counts[k] for k in ("faces", "no_face", "videos")} if faces else {}),
            "processed": todo.count, "skipped": skipped, "output": cfg.output, "model": model.model_id,
            "seconds": round(seconds, 2), "images_per_s": _rate(todo.count, seconds),
        }
        out.commit(summary | {
            "model_uri": cfg.model, "input": cfg.input, "files": counts["files"],
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ray_fer_version": __version__, "config": asdict(cfg),
        })
    found = f", {counts['faces']:,} faces, {counts['no_face']:,} files without a face" if faces else ""
    log.info("labelled %s %s (%s errors%s) into %s in %.1f s", f"{todo.count:,}", what, f"{counts['errors']:,}",
             found, cfg.output, seconds)
    return summary


def _counted(faces: bool) -> str:
    """What the console calls the inputs: with faces videos are listed beside the images, so files."""
    return "files" if faces else "images"


def _rate(count: int, seconds: float) -> float:
    """count / seconds, to one decimal, or to 3 significant digits below 10 (a few long videos)."""
    rate = count / max(seconds, 1e-9)
    return round(rate, 1) if rate >= 10 else float(f"{rate:.3g}")


def _label_while_holding(out: OutputRun, paths: Any, model: ModelRef, cfg: InferConfig, tally: Tally) -> None:
    """`_label` into the run's staging folder, stopped as soon as the heartbeat finds the lease
    lost (a driver frozen past the timeout, whose output another run took over): the labelling
    is interrupted as Ctrl-C would, and the run ends with the lease's one-line error."""
    assert out.lease is not None
    out.lease.on_lost = _thread.interrupt_main
    try:
        _label(paths, model, cfg, out.new_dir, tally)
    except KeyboardInterrupt:
        if out.lease.lost is None:
            raise
        out.lease.renew()  # raises the LeaseError that says who took the output
    finally:
        out.lease.on_lost = None


def _label(paths: Any, model: ModelRef, cfg: InferConfig, dst: str, tally: Tally) -> None:
    """The Ray Data pipeline over a stream of paths: one Parquet row per path (with faces, per
    face, and one for a file without a face; per face per sampled frame of a video), written to
    `dst`. With faces the rows are staged partitioned on their kind: images' rows are final in
    dst/kind=image/; videos' go to dst/kind=video/ first, and a second pass tracks each video's
    faces into dst/kind=tracked/ (label/videos.py)."""
    faces = cfg.faces != "whole"
    counter = console.RayCounter(tally.actor)
    schema = output_schema(model.classes, faces=faces)
    ds = prediction_dataset(
        paths, model, tta=cfg.tta, precision=cfg.precision, device=cfg.device,
        batch_size=cfg.batch_size, decode_batch_size=cfg.decode_batch_size, actors=cfg.actors,
        compile=cfg.compile, faces=cfg.faces, detect_size=cfg.face_detect_size, tally=tally.actor,
        videos=VideoOptions(fps=cfg.fps, segment_s=cfg.segment_s) if faces else None,
        # in the actors, as each batch is done: the rows counted for the progress display then,
        # not when the write has a file's worth
        finish=functools.partial(to_output, schema=schema, counter=counter.actor, kinds=faces),
    )
    advice = "Nothing was committed and the output is as it was: run again once the store answers"
    progress = console.Progress(0, what=_counted(faces))
    with storage.stop_on_read_errors(advice), counter.watch(progress, total=lambda: tally.counts().get("todo", 0)):
        ds.write_parquet(dst, min_rows_per_file=ROWS_PER_FILE, ray_remote_args={"num_cpus": 0.2},
                         **({"partition_cols": [KIND_COLUMN]} if faces else {}))
        if faces:
            frames = storage.join(dst, f"{KIND_COLUMN}={VIDEO_KIND}")
            track_videos(frames, storage.join(dst, f"{KIND_COLUMN}={TRACKED_KIND}"), schema=schema,
                         counter=counter.actor)
            if storage.exists(frames):
                storage.delete_dir(frames)
