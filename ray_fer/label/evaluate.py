"""Evaluation: a model bundle over a labelled image folder, through labelling's own chain.

`evaluate_folder` lists `<data>/<class>/*`, runs `pipeline.prediction_dataset` (the same
decode, eval preset and predictor as `ray-fer infer`), turns the labels into `metrics` and writes
metrics.json, confusion_matrix.png, report.md (`report`) and predictions.parquet.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from typing import Any

import pyarrow as pa

from ray_fer import cluster, console, tracking

from ray_fer.store import storage
from ray_fer.config import UserError
from ray_fer.label.datasets import DataError, find_split, list_image_folder
from ray_fer.faces.options import check_detector, check_faces
from ray_fer.images import check_tta
from ray_fer.labels import CLASSES
from ray_fer.metrics import MISSED, classification_metrics, expected_calibration_error
from ray_fer.model_ref import MLFLOW_SCHEMES, PACKAGED_MODELS, ModelFile
from ray_fer.schema import FACE_COLUMNS, files_in
from ray_fer.label.pipeline import open_model, prediction_dataset
from ray_fer.report import write_evaluation

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"


def evaluate_folder(
    model: str,
    data: str,
    *,
    output: str | None = None,
    tta: str = "none",
    precision: str = "auto",
    limit_per_class: int | None = None,
    faces: str = "auto",
    track: str = "none",
) -> dict[str, Any]:
    """Run a model bundle over a labelled image folder (local or s3://) and write the evaluation.

    Uses labelling's own chain (`pipeline.prediction_dataset`: the same decode, eval preset and
    predictor), so the numbers describe what `ray-fer infer` produces. Writes metrics.json,
    confusion_matrix.png, report.md and predictions.parquet (one row per image, for error
    analysis) into `output` (default <model folder>/eval/<data folder>-<tta>); returns the summary.
    Unreadable images are counted in num_errors and left out of the metrics.

    `faces` as `ray-fer infer` (auto: images up to 128 px, such as FER2013's, are face crops; the
    others are searched for faces). Where faces are detected, an image's prediction is its
    largest face's; an image without a face counts as a miss for its class (num_no_face, and
    each class's `missed`), and predictions.parquet holds one row per face. `ece` is the expected
    calibration error of the labelled images' confidences.

    `track` "mlflow" logs the figures and the report's files to the model's training run in MLflow
    (or a new run; `tracking.log_evaluation`); the tracker is checked before any work.
    """
    check_tta(tta)
    check_faces(faces)
    if faces != "whole":
        check_detector()
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"unknown precision {precision!r}; choose one of: auto, bf16, fp32")
    if track not in tracking.TRACKERS:
        raise UserError(f"unknown --tracking {track!r}; choose one of: {', '.join(tracking.TRACKERS)}")
    model_file = ModelFile.read(model)
    model_uri = model_file.uri
    table = _list_labelled(data, limit_per_class)
    tracker = None
    if track == "mlflow":
        tracker = tracking.evaluation_tracker(model_uri)
        tracking.check_tracker(tracker, "--tracking mlflow")
    cluster.connect()
    cluster.refuse_local_paths({"--data": data})
    ref = open_model(model_file)
    model_id = ref.model_id
    if ref.classes != CLASSES:
        raise UserError(f"model {model_uri!r} predicts {', '.join(ref.classes)}; evaluation needs {', '.join(CLASSES)}")
    if output is None:
        output = _default_output(model, model_uri, data, tta)
    log.info("evaluating model %s on %s images of %s (tta %s) into %s", model_id, f"{table.num_rows:,}", data, tta,
             output)

    t0 = time.perf_counter()
    # the predictor adds its own `label` column (the prediction): the truth travels as true_label
    ds = prediction_dataset(table.rename_columns(["path", "true_label"]), ref, tta=tta, precision=precision, faces=faces)
    face_columns = list(FACE_COLUMNS) if faces != "whole" else []
    keep = ["path", "true_label", *face_columns, "label", "confidence", *[f"prob_{c}" for c in CLASSES], "error"]
    parts = []
    progress = console.Progress(table.num_rows)
    with storage.stop_on_read_errors("Nothing was written: run the evaluation again once the store answers"):
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            parts.append(batch.select(keep))
            progress.update(progress.done + files_in(batch))  # with faces, rows are faces
    progress.close()
    seconds = time.perf_counter() - t0
    predictions = pa.concat_tables(parts) if parts else pa.table({k: [] for k in keep})
    per_file = _largest_faces(predictions) if face_columns else predictions
    if per_file.num_rows != table.num_rows:  # the chain keeps each file; anything else is a bug
        raise RuntimeError(f"expected {table.num_rows} predictions, got {per_file.num_rows}")

    errors = per_file["error"].to_pylist()
    failed = [(p, e) for p, e in zip(per_file["path"].to_pylist(), errors) if e is not None]
    for path, err in failed[:5]:
        log.warning("could not evaluate %s: %s", path, err)
    if len(failed) > 5:
        log.warning("... and %d more unreadable files (see predictions.parquet)", len(failed) - 5)
    labels = per_file["label"].to_pylist()
    read = [e is None for e in errors]  # unreadable files are left out; a file without a face is a miss
    no_face = sum(good and label is None for good, label in zip(read, labels))
    if no_face:
        log.warning("no face was found in %d of %d images; each counts as a miss for its class", no_face,
                    table.num_rows)
    y_true = [t for t, good in zip(per_file["true_label"].to_pylist(), read) if good]
    y_pred = [MISSED if p is None else CLASSES.index(p) for p, good in zip(labels, read) if good]
    if no_face == len(y_true):
        reason = f"first error: {failed[0][1]}" if failed else "no face was found in any (try --faces whole)"
        raise UserError(f"none of the {table.num_rows} images in {data!r} could be labelled; {reason}")
    confidence = [c for c, p, good in zip(per_file["confidence"].to_pylist(), labels, read) if good and p is not None]
    correct = [t == p for t, p in zip(y_true, y_pred) if p != MISSED]

    metrics = {
        "model": {"uri": model_uri, "id": model_id, "image_size": ref.image_size, "decode_size": ref.decode_size},
        "data": data if storage.is_remote(data) else os.path.abspath(data),  # compare matches on it
        "tta": tta,
        "precision": precision,
        "num_errors": len(failed),
        **({"faces": faces, "num_no_face": no_face} if face_columns else {}),
        **classification_metrics(y_true, y_pred),
        "ece": expected_calibration_error(confidence, correct),
        "seconds": round(seconds, 2),
        "images_per_s": round(table.num_rows / seconds, 1),
    }
    paths = write_evaluation(output, metrics)
    paths["predictions"] = storage.join(output, PREDICTIONS_FILE)
    _write_parquet(paths["predictions"], predictions)
    tracked = {}
    if tracker is not None:
        try:
            tracked = tracking.log_evaluation(
                tracker, model_id=model_id, name=storage.basename(output), metrics=metrics,
                files={k: paths[k] for k in ("metrics", "confusion_matrix", "report")},
                params={"model": model, "model_id": model_id, "data": metrics["data"], "tta": tta, "faces": faces,
                        "precision": precision})
            log.info("MLflow: logged the evaluation to run %s", tracked["mlflow_run_id"])
        except Exception as e:
            log.warning("MLflow did not take the evaluation (%s); its files are in %s", tracking.short_error(e), output)
    found = f", a face found in {metrics['num_images'] - no_face}" if face_columns else ""
    log.info("accuracy %.2f%%, macro-F1 %.3f, ECE %.3f on %d images%s (tta %s); report: %s",
             100 * metrics["accuracy"], metrics["macro_f1"], metrics["ece"], metrics["num_images"], found, tta,
             paths["report"])
    return {
        "accuracy": round(metrics["accuracy"], 6), "macro_f1": round(metrics["macro_f1"], 6),
        "ece": round(metrics["ece"], 6),
        "recall": {c: None if m["recall"] is None else round(m["recall"], 4) for c, m in metrics["per_class"].items()},
        "images": metrics["num_images"], "errors": len(failed), **({"no_face": no_face} if face_columns else {}),
        "tta": tta, "model": model_id,
        "seconds": metrics["seconds"], "images_per_s": metrics["images_per_s"], "output": output, **paths,
        **tracked,
    }


def _default_output(model: str, model_uri: str, data: str, tta: str) -> str:
    """<model folder>/eval/<data folder name>-<tta>: a run's evaluations collect beside its model;
    a packaged model's in ./eval/<its name>/ (never inside the installed package)."""
    if not storage.is_remote(data):
        data = os.path.abspath(data)
    if model in PACKAGED_MODELS:
        return os.path.join(os.path.abspath("eval"), model, f"{storage.basename(data)}-{tta}")
    if model.startswith(MLFLOW_SCHEMES):  # downloaded into a temporary folder: ./eval/runs-<id>-model/...
        return os.path.join(os.path.abspath("eval"), re.sub(r"[^\w.@-]+", "-", model).strip("-"),
                            f"{storage.basename(data)}-{tta}")
    if not storage.is_remote(model_uri):
        model_uri = os.path.abspath(model_uri)
    return storage.join(model_uri.rsplit("/", 1)[0], "eval", f"{storage.basename(data)}-{tta}")


def _list_labelled(data: str, limit_per_class: int | None):
    if limit_per_class is not None and limit_per_class < 1:
        raise UserError(f"--limit-per-class must be >= 1, got {limit_per_class}")
    try:
        return list_image_folder(data, limit_per_class=limit_per_class)
    except DataError as e:
        try:  # a data root holding train/ and val/ rather than one split: say which folder to pass
            split = find_split(data, "val")
        except DataError:
            raise e from None
        raise DataError(f"{e}. {data!r} looks like a data root: pass one split, e.g. --data {split}") from None


def _largest_faces(predictions: pa.Table) -> pa.Table:
    """One row per file: its largest face (by box area), or its one row without a face."""
    import numpy as np
    import pyarrow.compute as pc

    area = pc.fill_null(pc.multiply(predictions["box_w"], predictions["box_h"]), -1.0)
    order = pc.sort_indices(predictions.append_column("_area", area),
                            sort_keys=[("path", "ascending"), ("_area", "descending")])
    ordered = predictions.take(order)
    paths = ordered["path"].to_numpy(zero_copy_only=False)
    first = np.ones(len(paths), dtype=bool)
    first[1:] = paths[1:] != paths[:-1]
    return ordered.filter(pa.array(first))


def _write_parquet(uri: str, table) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())

