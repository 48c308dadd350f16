"""The labelling pipeline: an image store in, a Parquet table of expressions out.

    inputs.list_inputs (driver: folder, s3:// prefix or manifest -> paths)
      -> output.OutputRun (driver: the output's lease, --overwrite / --skip-existing, before any cluster work)
      -> data.decoded_dataset (CPU tasks: read bytes, decode to small uint8 faces, or each photo
         once to the detector's small RGB copy and a gray copy to crop from)
      -> predictor.Predictor (actors: the model loaded once each, on a GPU or CPU threads), or
         face_predictor.FacePredictor (the same plus the face detector: detect, align, label)
      -> output.to_output -> write_parquet into the run's staging folder
      -> OutputRun.check (each path's rows) -> OutputRun.commit (the rows in place, then `_SUCCESS`)

With --faces whole every listed file becomes exactly one row; with detect (and auto, for
photos) one row per face, and one row for a file without a face. A file that cannot be read or
decoded gets one row with `error` set and the job goes on. The output protocol (lease, staging,
commit) is described in output.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ray_fer import __version__, cluster, console, storage
from ray_fer.config import InferConfig
from ray_fer.faces import check_detector
from ray_fer.inputs import list_inputs
from ray_fer.model import ModelBundle, load_bundle
from ray_fer.output import ROWS_PER_FILE, OutputRun, output_schema, to_output
from ray_fer.predictor import prediction_dataset
from ray_fer.runs import resolve_model

log = logging.getLogger(__name__)


def label_images(cfg: InferConfig) -> dict[str, Any]:
    """Label every image under `cfg.input` into a Parquet data set at `cfg.output`.

    Checks the model, the input and the output before any cluster work; holds the output's lease
    while it runs, and replaces or extends the output only once every new row is written and
    checked (the protocol is in output.py). Returns the summary that
    `_SUCCESS` also holds: images, labelled and errors (the whole output; with faces also faces
    and no_face: files read fine without a face, not counted as labelled), processed and skipped
    (this run), output, model, seconds and images_per_s (this run's images over its wall time).
    """
    cfg.check()
    if cfg.faces != "whole":
        check_detector()
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    bundle, model_id = load_bundle(resolve_model(cfg.model))
    inputs = list_inputs(cfg.input)
    cluster.connect()
    cluster.refuse_local_paths({"input": cfg.input, "output": cfg.output})
    faces = cfg.faces != "whole"
    with OutputRun(cfg.output, overwrite=cfg.overwrite, skip_existing=cfg.skip_existing, model_id=model_id,
                   faces=faces) as out:
        done = out.done  # paths with a row that stays: not labelled again
        todo = inputs.filter(pc.invert(pc.is_in(inputs["path"], value_set=done))) if len(done) else inputs
        skipped = inputs.num_rows - todo.num_rows
        if skipped:
            log.info("--skip-existing: %d of %d images are already in %s", skipped, inputs.num_rows, cfg.output)
        if todo.num_rows:
            _label(todo, bundle, model_id, cfg, out.new_dir)
        counts = out.check(todo["path"])
        seconds = time.perf_counter() - t0
        summary = {
            "images": counts["images"], "labelled": counts["labelled"], "errors": counts["errors"],
            **({"faces": counts["faces"], "no_face": counts["no_face"]} if faces else {}),
            "processed": todo.num_rows, "skipped": skipped, "output": cfg.output, "model": model_id,
            "seconds": round(seconds, 2), "images_per_s": round(todo.num_rows / seconds, 1),
        }
        out.commit(summary | {
            "model_uri": cfg.model, "input": cfg.input, "files": counts["files"],
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ray_fer_version": __version__, "config": asdict(cfg),
        })
    found = f", {counts['faces']:,} faces, {counts['no_face']:,} images without a face" if faces else ""
    log.info("labelled %s images (%s errors%s) into %s in %.1f s", f"{todo.num_rows:,}", f"{counts['errors']:,}",
             found, cfg.output, seconds)
    return summary


def _label(todo: pa.Table, bundle: ModelBundle, model_id: str, cfg: InferConfig, dst: str) -> None:
    """The Ray Data pipeline over the paths in `todo`: one Parquet row per path (with faces, per
    face, and one for a file without a face), written to `dst`."""
    ds = prediction_dataset(
        todo, bundle, model_id=model_id, tta=cfg.tta, precision=cfg.precision, device=cfg.device,
        batch_size=cfg.batch_size, decode_batch_size=cfg.decode_batch_size, actors=cfg.actors,
        compile=cfg.compile, faces=cfg.faces, detect_size=cfg.face_detect_size,
    )
    counter = console.RayCounter()
    schema = output_schema(bundle.classes, faces=cfg.faces != "whole")
    # half a CPU for the cheap write stage, so it fits beside decode tasks and actors on any cluster
    ds = ds.map_batches(to_output, fn_kwargs={"schema": schema, "counter": counter.actor},
                        batch_format="pyarrow", batch_size=None, num_cpus=0.5)
    advice = "Nothing was committed and the output is as it was: run again once the store answers"
    with storage.stop_on_read_errors(advice), counter.watch(console.Progress(todo.num_rows)):
        ds.write_parquet(dst, min_rows_per_file=ROWS_PER_FILE, ray_remote_args={"num_cpus": 0.5})
