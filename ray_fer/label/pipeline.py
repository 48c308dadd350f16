"""The labelling chain that `infer` and `evaluate` both run: read + decode tasks
(`data.decoded_dataset`) -> an actor pool of `predictor.Predictor` (one row per file) or
`face_predictor.FacePredictor` (one row per face), sized by `plan.plan_predictors`.

This module, like everything the driver of a labelling job imports, imports no torch: the model
is a `model_ref.ModelRef`, and the actor classes below import their predictor (and torch) in
the actor.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa

from ray_fer import cluster
from ray_fer.config import UserError
from ray_fer.label.datasets import DECODE_BATCH, VideoOptions, decoded_dataset
from ray_fer.faces.options import DETECT_SIZE, check_faces
from ray_fer.model_ref import OPEN_CPUS, ModelFile, ModelRef, cache_entry, remember, remembered
from ray_fer.label.plan import plan_predictors

if TYPE_CHECKING:
    import ray

log = logging.getLogger(__name__)


def prediction_dataset(
    source: "pa.Table | ray.data.Dataset",
    model: str | ModelRef,
    *,
    tta: str = "none",
    precision: str = "auto",
    device: str = "auto",
    batch_size: int | None = None,
    decode_batch_size: int = DECODE_BATCH,
    actors: int | None = None,
    compile: bool = False,
    faces: str = "whole",
    detect_size: int = DETECT_SIZE,
    tally: Any = None,
    videos: VideoOptions | None = None,
    finish: Callable[[pa.Table], pa.Table] | None = None,
) -> "ray.data.Dataset":
    """The lazy Ray Dataset of predictions for a `path` column (local or s3://): a pyarrow Table
    (a labelled folder), or a Ray Dataset streamed from listing tasks or a manifest (labelling).
    `model`: a ModelRef (`open_model`), or what --model takes.

    `faces`: "whole" labels each file's whole image (one row per file); "detect" finds, aligns
    and labels every face (`face_predictor.FacePredictor`: one row per face, one for a file
    without a face or with an error); "auto" labels an image of at most `data.AUTO_WHOLE_SIDE`
    pixels whole (a face crop) and detects faces in the others.

    Extra columns of `source` (e.g. a true label) are passed through. Stages: read and decode on
    CPU tasks (`data.decode_batch`, one row per file, `error` set where it fails) -> `Predictor`
    actors sized by `plan_predictors`. `tally` (a `pathsets.Tally` actor) is told the digest of
    every block that reaches the decode tasks. `finish` (picklable) is applied to each batch of
    predictions in the actor that made it (infer's `schema.to_output`): a stage of its own would
    need worker processes of its own, started while the actors run (on 2 cores, a minute of a
    5-minute video's run went to them). Nothing runs until the dataset is consumed (write_parquet,
    iter_batches); results stream, nothing is collected on the driver. Starts Ray if needed.
    With `compile` each actor torch.compiles its model once before its first batch. With `videos`
    (and faces), video paths become one row per face per sampled frame (label/videos.py), not yet
    tracked.
    """
    import ray

    if isinstance(source, pa.Table) and "path" not in source.column_names:
        raise ValueError(f"the table of inputs needs a 'path' column; it has: {', '.join(source.column_names)}")
    private = cluster.connect()
    if isinstance(model, str):
        model = open_model(ModelFile.read(model))
    check_faces(faces)
    photos = faces != "whole"
    plan = plan_predictors(ray.cluster_resources(), device=device, actors=actors, batch_size=batch_size,
                           autoscaling=not private, faces=photos)
    pool = f"{plan.min_actors}-{plan.actors}" if plan.min_actors < plan.actors else str(plan.actors)
    log.info("predictors: %s actor(s) on %s, %d thread(s) and %g CPU each, batch %d",
             pool, plan.device, plan.threads, plan.num_cpus, plan.batch_size)
    ds = decoded_dataset(source, decode_size=model.decode_size, decode_batch_size=decode_batch_size,
                         num_cpus=plan.decode_cpus, faces=faces, detect_size=detect_size, tally=tally,
                         videos=videos)
    return ds.map_batches(
        FacePredictorActor if photos else PredictorActor,
        fn_constructor_args=(model.bundle,),
        fn_constructor_kwargs={"model_id": model.model_id, "tta": tta, "precision": precision,
                               "device": plan.device, "threads": plan.threads, "compile": compile,
                               "batch_size": plan.batch_size, "finish": finish},
        # faces: pyarrow, so that the photos' pixel columns reach the predictor without a copy each
        batch_size=plan.batch_size, batch_format="pyarrow" if photos else "numpy",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.actors,
                                           max_tasks_in_flight_per_actor=plan.tasks_in_flight),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, memory=plan.memory,
    )



def open_model(file: ModelFile) -> ModelRef:
    """The bundle in `file` in the object store and what the driver needs to know of it (Ray must
    be connected). The first time a bundle is seen here a Ray task loads it and its ModelLoadError
    (a state dict or another kind of file) is raised here as itself, one line; what it says is kept
    on this machine's disk (`model_ref.remember`), and later runs of the same bytes put the bytes
    in the object store for the actors to open, with no task and no wait."""
    import ray

    entry = cache_entry(file.data)
    info = remembered(entry)
    if info is not None:
        return ModelRef(bundle=ray.put(file.data), **info)
    # max_calls=1: the worker exits once the bundle is open. It has imported torch (~260 MB), and
    # Ray would hand the same process the decode tasks next, which need none of it
    opener = ray.remote(num_returns=2, num_cpus=OPEN_CPUS, max_retries=0, max_calls=1)(_open_bundle)
    about, bundle = opener.remote(ray.put(file.data), file.uri)
    try:
        info = ray.get(about)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise e.cause from None
        raise
    remember(entry, info)
    return ModelRef(bundle=bundle, **info)


def _open_bundle(data: bytes, uri: str) -> tuple[dict[str, Any], Any]:
    """(what the driver needs, the ModelBundle); runs in a Ray worker, which imports torch."""
    from ray_fer.model import ModelBundle, model_id

    bundle = ModelBundle.from_bytes(data, uri)
    info = {"model_id": model_id(bundle), "classes": tuple(bundle.classes), "image_size": bundle.image_size,
            "decode_size": bundle.decode_size}
    return info, bundle


class PredictorActor:
    """The class Ray Data starts in each predictor actor: it imports `predictor.Predictor` there,
    with torch, and hands it every batch. (Ray Data needs the class on the driver; the real one
    would import torch into the driver.) Ray names the actor's process after this class:
    "ray::MapWorker(MapBatches(PredictorActor))"."""

    predictor = "ray_fer.label.predictor:Predictor"

    def __init__(self, *args: Any, finish: Callable[[pa.Table], pa.Table] | None = None, **kwargs: Any) -> None:
        module, name = self.predictor.split(":")
        self.impl = getattr(importlib.import_module(module), name)(*args, **kwargs)
        self.finish = finish

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        out = self.impl(batch)
        return self.finish(out) if self.finish is not None else out


class FacePredictorActor(PredictorActor):
    """`face_predictor.FacePredictor` in an actor, as PredictorActor."""

    predictor = "ray_fer.label.face_predictor:FacePredictor"
