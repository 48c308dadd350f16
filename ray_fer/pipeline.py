"""The labelling chain that `infer` and `evaluate` both run: read + decode tasks
(`data.decoded_dataset`) -> an actor pool of `predictor.Predictor` (one row per file) or
`face_predictor.FacePredictor` (one row per face), sized by `predictor.plan_predictors`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ray_fer import cluster
from ray_fer.data import DECODE_BATCH, decoded_dataset
from ray_fer.face_predictor import FacePredictor
from ray_fer.faces import DETECT_SIZE, check_faces
from ray_fer.model import ModelBundle, load_bundle
from ray_fer.predictor import Predictor, plan_predictors

if TYPE_CHECKING:
    import ray

log = logging.getLogger(__name__)


def prediction_dataset(
    source: "pa.Table | ray.data.Dataset",
    model: str | ModelBundle,
    *,
    model_id: str | None = None,
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
) -> "ray.data.Dataset":
    """The lazy Ray Dataset of predictions for a `path` column (local or s3://): a pyarrow Table
    (a labelled folder), or a Ray Dataset streamed from listing tasks or a manifest (labelling).

    `faces`: "whole" labels each file's whole image (one row per file); "detect" finds, aligns
    and labels every face (`face_predictor.FacePredictor`: one row per face, one for a file
    without a face or with an error); "auto" labels an image of at most `data.AUTO_WHOLE_SIDE`
    pixels whole (a face crop) and detects faces in the others.

    Extra columns of `source` (e.g. a true label) are passed through. Stages: read and decode on
    CPU tasks (`data.decode_batch`, one row per file, `error` set where it fails) -> `Predictor`
    actors sized by `plan_predictors`. `tally` (a `pathsets.Tally` actor) is told the digest of
    every block that reaches the decode tasks. Nothing runs until the dataset is consumed (write_parquet,
    iter_batches); results stream, nothing is collected on the driver. Starts Ray if needed.
    With `compile` each actor torch.compiles its model once before its first batch.
    """
    import ray

    if isinstance(source, pa.Table) and "path" not in source.column_names:
        raise ValueError(f"the table of inputs needs a 'path' column; it has: {', '.join(source.column_names)}")
    if isinstance(model, str):
        model, model_id = load_bundle(model)
    if model_id is None:
        raise ValueError("pass model_id (the bundle's identity from load_bundle) with a ModelBundle")
    private = cluster.connect()
    check_faces(faces)
    photos = faces != "whole"
    plan = plan_predictors(ray.cluster_resources(), device=device, actors=actors, batch_size=batch_size,
                           autoscaling=not private, faces=photos)
    pool = f"{plan.min_actors}-{plan.actors}" if plan.min_actors < plan.actors else str(plan.actors)
    log.info("predictors: %s actor(s) on %s, %d thread(s) and %g CPU each, batch %d",
             pool, plan.device, plan.threads, plan.num_cpus, plan.batch_size)
    ds = decoded_dataset(source, decode_size=model.decode_size, decode_batch_size=decode_batch_size,
                         num_cpus=plan.decode_cpus, faces=faces, detect_size=detect_size, tally=tally)
    return ds.map_batches(
        FacePredictor if photos else Predictor,
        fn_constructor_args=(ray.put(model),),
        fn_constructor_kwargs={"model_id": model_id, "tta": tta, "precision": precision,
                               "device": plan.device, "threads": plan.threads, "compile": compile,
                               "batch_size": plan.batch_size},
        batch_size=plan.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.actors,
                                           max_tasks_in_flight_per_actor=plan.tasks_in_flight),
        num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, memory=plan.memory,
    )
