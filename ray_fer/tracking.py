"""Experiment tracking in MLflow: a training run's settings, per-epoch metrics, report and model
bundle; an evaluation's figures; and MLflow model URIs (runs:/<id>/model, models:/<name>/<version>)
wherever --model is taken.

Where the tracker lives: MLFLOW_TRACKING_URI, as MLflow users expect. Unset, a SQLite store
beside the runs (<run.storage_path>/mlflow.db, artifacts in <run.storage_path>/mlartifacts), so
one machine needs no server: `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`.

Only the driver and Ray Train's controller (which Ray places on the driver's node) talk to the
tracker, never the training workers. A tracker that does not answer at the start stops the
command with one line before any training; one that goes away later costs a warning, never the
run, and the run's end (or its next start: re-running a finished run's command) logs what it missed.

    check_tracker(uri)                 before any work: MLflow installed, the tracker answers
    start_training_run(...)            a new MLflow run, or the one the run folder names (a resume)
    log_epochs(run, rows)              metrics by epoch (the controller's callback, and the catch-up)
    finish_training_run(...)           missed epochs, the report's files, the model; FINISHED
    fail_training_run(run, error)      FAILED (KILLED on Ctrl-C)
    log_evaluation(...)                `ray-fer evaluate --tracking mlflow`
    download_model(uri)                runs:/ and models:/ URIs -> a local model.pt
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from ray_fer.config import ConfigError, UserError, flatten
from ray_fer.store import storage

log = logging.getLogger(__name__)

TRACKERS = ("none", "mlflow")
INSTALL = "pip install 'ray-fer[mlflow]'"
ENV = "MLFLOW_TRACKING_URI"
RUN_FILE = "mlflow.json"  # in a run folder: the MLflow run it logs to, and where that run lives
LOCAL_DB = "mlflow.db"  # the local store, in run.storage_path
LOCAL_ARTIFACTS = "mlartifacts"  # its artifacts, beside it
DEFAULT_EXPERIMENT = "ray-fer"
MODEL_NAME = "model"  # the logged model's name: the training run's bundle is runs:/<run id>/model
MODEL_ID_TAG = "model_id"  # on the training run and its logged model: model.model_id of the bundle
# MLflow retries a failing request 7 times over about two minutes by default; a tracker that has
# gone away should cost seconds, not minutes per epoch (a user's own settings win)
_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
_PARAM_MAX = 6000  # MLflow's longest parameter value
_BATCH = 100  # MLflow's most parameters per log_batch call


def require_mlflow(what: str) -> None:
    """ConfigError with the install line where MLflow is not installed."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs MLflow, which is not installed here: {INSTALL}") from None


def tracking_uri(local_root: str | None) -> str:
    """MLFLOW_TRACKING_URI; unset, the SQLite store in `local_root` (a local folder)."""
    if os.environ.get(ENV):
        return absolute(os.environ[ENV])
    if local_root is None or storage.is_remote(local_root):
        raise ConfigError(f"{ENV} is not set and {local_root!r} is not a local folder for the local MLflow store; "
                          f"set {ENV} to your tracking server (e.g. http://mlflow.internal:5000)")
    return "sqlite:///" + os.path.join(os.path.abspath(os.path.expanduser(local_root)), LOCAL_DB)


def absolute(uri: str) -> str:
    """A local store's URI with an absolute path (sqlite:///runs/mlflow.db is relative to the working
    folder, which differs in Ray Train's controller); servers' URIs as they are."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    if uri.startswith("file:") and not uri.startswith("file:///"):
        return Path(uri.removeprefix("file:")).absolute().as_uri()
    if "://" not in uri and ":" not in uri.split("/", 1)[0]:  # a bare path: MLflow's file store
        return Path(uri).absolute().as_uri()
    return uri


def _local_artifacts(uri: str) -> str | None:
    """The artifact location for new experiments of a local SQLite store (beside it); None for a
    server, which has its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).parent.joinpath(LOCAL_ARTIFACTS).as_uri()


@contextmanager
def _quick_requests() -> Iterator[None]:
    """Fewer, shorter retries; urllib3's line per retry stays off the console (the error says it)."""
    saved = {k: os.environ.get(k) for k in _QUICK}
    for key, value in _QUICK.items():
        os.environ.setdefault(key, value)
    retries = logging.getLogger("urllib3.connectionpool")
    level = retries.level
    retries.setLevel(logging.ERROR)
    try:
        yield
    finally:
        retries.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def short_error(e: BaseException) -> str:
    """One short line for an error from MLflow: the socket's own reason where there is one
    ("[Errno 111] Connection refused"), not the pages of retries around it."""
    text = str(e).strip()
    errno = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    if errno:
        return errno.group(0).strip()
    lines = text.splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def check_tracker(uri: str, what: str):
    """Check that the tracker at `uri` answers; else one UserError line, before any work."""
    require_mlflow(what)
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        os.makedirs(Path(uri.removeprefix("sqlite:///")).parent, exist_ok=True)
    client = MlflowClient(uri)
    try:
        with _quick_requests():
            client.search_experiments(max_results=1)
    except Exception as e:
        local = "" if ENV not in os.environ else ", or unset it to track in the local store beside the runs"
        raise UserError(f"the MLflow tracker at {uri} does not answer ({short_error(e)}); start it or fix {ENV}{local}; "
                        "nothing was run") from None


def _experiment_id(client, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise UserError(f"MLflow experiment {name!r} at {uri} is deleted; restore it (mlflow experiments restore) "
                            "or pick another with --set run.experiment=NAME")
        return found.experiment_id
    return client.create_experiment(name, artifact_location=_local_artifacts(uri))


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run and where it lives; what the run folder's mlflow.json holds."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)


def run_link(run: TrackedRun) -> str:
    """The run's page on a tracking server; for a local store, the command that shows it."""
    if run.tracking_uri.startswith(("http://", "https://")):
        return f"{run.tracking_uri.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
    return f"mlflow ui --backend-store-uri {run.tracking_uri}"


def read_run_file(folder: str) -> TrackedRun | None:
    uri = storage.join(folder, RUN_FILE)
    if not storage.exists(uri):
        return None
    return TrackedRun(**json.loads(storage.read_bytes(uri)))


def flat_config(tree: Mapping[str, Any]) -> dict[str, str]:
    """A config as MLflow parameters: dotted keys (`config.flatten`), values as text (lists as JSON)."""
    return {key: (json.dumps(value) if isinstance(value, (list, tuple)) else str(value))[:_PARAM_MAX]
            for key, value in flatten(tree).items()}


# --------------------------------------------------------------------------------------------
# A training run


def start_training_run(uri: str, *, name: str, experiment: str, run_folder: str, config: Mapping[str, Any],
                       after_epoch: int) -> TrackedRun:
    """The MLflow run of a training run that starts (or resumes after `after_epoch` epochs).

    A run folder whose mlflow.json names a live run in this tracker continues that run (RUNNING
    again); otherwise a new run named after the training run is created and recorded there. The
    config is logged as parameters; settings changed by a resume, which MLflow keeps immutable
    as parameters, are tagged `config.<key>` with their new value."""
    with _quick_requests():
        return _start_training_run(uri, name=name, experiment=experiment, run_folder=run_folder, config=config,
                                   after_epoch=after_epoch)


def _start_training_run(uri: str, *, name: str, experiment: str, run_folder: str, config: Mapping[str, Any],
                        after_epoch: int) -> TrackedRun:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(uri)
    recorded = read_run_file(run_folder)
    run = None
    if recorded is not None and recorded.tracking_uri == uri:
        try:
            found = client.get_run(recorded.run_id)
            if found.info.lifecycle_stage == "active":
                run = recorded
                client.update_run(run.run_id, status="RUNNING")
                log.info("MLflow: continuing run %s after epoch %d: %s", run.run_id, after_epoch, run_link(run))
        except Exception as e:
            if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise UserError(f"the MLflow tracker at {uri} did not give run {recorded.run_id} ({short_error(e)}); "
                                "nothing was trained: run the command again once it answers") from None
            log.warning("the MLflow run %s this run folder names is not in %s; starting a new one",
                        recorded.run_id, uri)
    elif recorded is not None:
        log.warning("this run was tracked in %s; %s=%s now, so it gets a new MLflow run there",
                    recorded.tracking_uri, ENV, uri)
    if run is None:
        experiment_id = _experiment_id(client, experiment, uri)
        created = client.create_run(experiment_id, run_name=name, tags={"ray_fer.run_folder": run_folder})
        run = TrackedRun(uri, experiment_id, created.info.run_id)
        storage.write_bytes(storage.join(run_folder, RUN_FILE), (json.dumps(asdict(run), indent=2) + "\n").encode())
        log.info("MLflow: run %s in experiment %r: %s", run.run_id, experiment, run_link(run))

    params = flat_config(config)
    logged = client.get_run(run.run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    for i in range(0, len(new), _BATCH):
        client.log_batch(run.run_id, params=new[i:i + _BATCH])
    for key, value in params.items():
        if key in logged and logged[key] != value:
            client.set_tag(run.run_id, f"config.{key}", f"{value} (from epoch {after_epoch + 1}; was {logged[key]})")
    return run


def _epoch_metrics(rows: list[Mapping[str, Any]]):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, int(row["epoch"]))
            for row in rows for key, value in row.items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)]


def log_epochs(run: TrackedRun, rows: list[Mapping[str, Any]]) -> None:
    """Each row's numbers (train_loss, val_acc, lr, ...) as metrics at step = its epoch."""
    metrics = _epoch_metrics(rows)
    if not metrics:
        return
    with _quick_requests():
        client = run.client()
        for i in range(0, len(metrics), 1000):
            client.log_batch(run.run_id, metrics=metrics[i:i + 1000])


def logged_epochs(client, run: TrackedRun) -> set[int]:
    return {m.step for m in client.get_metric_history(run.run_id, "val_loss")}


def finish_training_run(run: TrackedRun, *, history: list[Mapping[str, Any]], files: list[str], bundle: str,
                        summary: Mapping[str, Any]) -> None:
    """The end of a training run: the epochs the tracker missed, the run folder's `files` (config,
    starts, curves, metrics.csv) as artifacts, the bundle as the run's logged model `model` (tagged
    with its model_id; once per model_id), the best epoch's figures, FINISHED. A tracker that
    fails here costs a warning: the run folder is complete, and re-running the command logs again."""
    try:
        with _quick_requests(), tempfile.TemporaryDirectory(prefix="ray-fer-mlflow-") as tmp:
            client = run.client()
            done = logged_epochs(client, run)
            log_epochs(run, [row for row in history if int(row["epoch"]) not in done])
            report = Path(tmp, "report")
            report.mkdir()
            for uri in files:
                if storage.exists(uri):
                    (report / storage.basename(uri)).write_bytes(storage.read_bytes(uri))
            client.log_artifacts(run.run_id, str(report))
            model_id = str(summary["model_id"])
            _log_model(client, run, bundle, model_id, int(summary["epochs"]), Path(tmp, "model"))
            client.set_tag(run.run_id, MODEL_ID_TAG, model_id)
            client.set_tag(run.run_id, "best_epoch", str(summary["best_epoch"]))
            client.log_metric(run.run_id, "best_val_loss", float(summary["best_val_loss"]))
            client.log_metric(run.run_id, "best_val_acc", float(summary["best_val_acc"]))
            client.set_terminated(run.run_id, "FINISHED")
    except Exception as e:
        log.warning("MLflow did not take the end of run %s (%s): the run folder is complete; run the same command "
                    "again once the tracker answers to log it", run.run_id, short_error(e))


def _log_model(client, run: TrackedRun, bundle: str, model_id: str, epochs: int, folder: Path) -> None:
    """The bundle as a logged model named `model` of the run. A run extended later logs its new
    model beside the old (registered versions may name it); runs:/<id>/model is the newest, and
    the run's outputs give each its epoch count, which mlflow.register_model uses to pick it."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    existing = client.search_logged_models(
        experiment_ids=[run.experiment_id],
        filter_string=f"source_run_id = '{run.run_id}' AND name = '{MODEL_NAME}'")
    if any(m.tags.get(MODEL_ID_TAG) == model_id and m.status == LoggedModelStatus.READY for m in existing):
        return  # logged by an earlier end of this run (a re-export of the same checkpoint)
    folder.mkdir()
    (folder / storage.basename(bundle)).write_bytes(storage.read_bytes(bundle))
    logged = client.create_logged_model(run.experiment_id, name=MODEL_NAME, source_run_id=run.run_id)
    try:
        client.log_model_artifacts(logged.model_id, str(folder))
        client.log_outputs(run.run_id, [LoggedModelOutput(logged.model_id, step=epochs)])
        client.set_logged_model_tags(logged.model_id, {MODEL_ID_TAG: model_id})  # last: a tagged model is whole
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except Exception:
        try:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        except Exception:  # noqa: BLE001 - the tracker is away; the first error says so
            pass
        raise
    log.info("MLflow: logged the model as runs:/%s/%s (%s)", run.run_id, MODEL_NAME, logged.model_id)


def fail_training_run(run: TrackedRun, error: BaseException) -> None:
    """Mark the run FAILED (KILLED for Ctrl-C), with the error as a tag; a warning if it cannot.
    Ray Train's own Ctrl-C handler aborts the run and exits (SystemExit), Python's raises
    KeyboardInterrupt: both are KILLED."""
    status = "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"
    try:
        with _quick_requests():
            client = run.client()
            client.set_tag(run.run_id, "error", short_error(error))
            client.set_terminated(run.run_id, status)
    except Exception as e:
        log.warning("could not mark MLflow run %s %s (%s)", run.run_id, status, short_error(e))


# --------------------------------------------------------------------------------------------
# Evaluations


def evaluation_tracker(model_file: str) -> str:
    """Where `ray-fer evaluate --tracking mlflow` logs: MLFLOW_TRACKING_URI; else the tracker that
    the run folder of the model file names (its mlflow.json); else the local store in ./runs."""
    if os.environ.get(ENV):
        return absolute(os.environ[ENV])
    recorded = read_run_file(model_file.rsplit("/", 1)[0]) if "/" in model_file else None
    return recorded.tracking_uri if recorded is not None else tracking_uri("runs")


def log_evaluation(uri: str, *, model_id: str, name: str, metrics: Mapping[str, Any], files: Mapping[str, str],
                   params: Mapping[str, Any]) -> dict[str, str]:
    """Log an evaluation's figures as `eval.<name>.*` metrics and its files under eval/<name>/:
    to the training run that carries the model's id (tag model_id), else to a new run
    "evaluate <model id>" in the ray-fer experiment. Returns the run's id."""
    from mlflow import MlflowClient

    with _quick_requests():
        return _log_evaluation(MlflowClient(uri), uri, model_id=model_id, name=name, metrics=metrics, files=files,
                               params=params)


def _log_evaluation(client, uri: str, *, model_id: str, name: str, metrics: Mapping[str, Any],
                    files: Mapping[str, str], params: Mapping[str, Any]) -> dict[str, str]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    run_id, created = _run_of_model(client, experiments, model_id), False
    if run_id is None:
        experiment_id = _experiment_id(client, DEFAULT_EXPERIMENT, uri)
        run_id = client.create_run(experiment_id, run_name=f"evaluate {model_id[:12]}",
                                   tags={MODEL_ID_TAG: model_id}).info.run_id
        created = True
    try:
        _log_figures(client, run_id, name=name, metrics=metrics, files=files,
                     params=flat_config(params) if created else {})
    except BaseException:
        if created:
            client.set_terminated(run_id, "FAILED")
        raise
    if created:
        client.set_terminated(run_id, "FINISHED")
    return {"mlflow_run_id": run_id, "mlflow_tracking_uri": uri}


def _run_of_model(client, experiments: list[str], model_id: str) -> str | None:
    """The training run that logged the model with this id (a resumed run keeps each model it
    logged, while its own model_id tag names only the newest), else a run tagged with it."""
    if not experiments:
        return None
    models = client.search_logged_models(experiment_ids=experiments,
                                         filter_string=f"tags.{MODEL_ID_TAG} = '{model_id}'")
    for model in models:
        if model.source_run_id:
            return model.source_run_id
    runs = client.search_runs(experiments, filter_string=f"tags.{MODEL_ID_TAG} = '{model_id}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _log_figures(client, run_id: str, *, name: str, metrics: Mapping[str, Any], files: Mapping[str, str],
                 params: Mapping[str, str]) -> None:
    from mlflow.entities import Metric, Param

    if params:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    now = int(time.time() * 1000)
    name = re.sub(r"[^\w.\- /]", "_", name)  # what MLflow allows in metric keys
    prefix = f"eval.{name}."
    figures = {key: metrics[key] for key in ("accuracy", "macro_f1", "macro_precision", "macro_recall", "ece",
                                             "num_images", "num_errors", "num_no_face") if key in metrics}
    for cls, per in metrics.get("per_class", {}).items():
        figures |= {f"{cls}.{k}": per[k] for k in ("precision", "recall", "f1", "support")}
    client.log_batch(run_id, metrics=[Metric(prefix + k, float(v), now, 0)
                                      for k, v in figures.items() if isinstance(v, (int, float))])
    with tempfile.TemporaryDirectory(prefix="ray-fer-mlflow-") as tmp:
        for uri_ in files.values():
            Path(tmp, storage.basename(uri_)).write_bytes(storage.read_bytes(uri_))
        client.log_artifacts(run_id, tmp, artifact_path=f"eval/{name}")


# --------------------------------------------------------------------------------------------
# MLflow model URIs as --model


def _local_default_for_models() -> str:
    local = tracking_uri("runs")
    if not Path(local.removeprefix("sqlite:///")).exists():
        raise UserError(f"{ENV} is not set and there is no local MLflow store at ./runs/{LOCAL_DB}; set {ENV} to the "
                        "tracker that holds the model (runs:/ and models:/ URIs name models there)")
    return local


def download_model(uri: str) -> str:
    """The local model.pt of an MLflow model URI, downloaded into a folder removed at exit.

    runs:/<run id>/model is the model a training run logged; models:/<name>/<version> (or
    @<alias>) a version registered from it, e.g. with mlflow.register_model("runs:/<id>/model", name)."""
    require_mlflow(f"--model {uri}")
    import mlflow
    import mlflow.artifacts

    tracker = absolute(os.environ[ENV]) if os.environ.get(ENV) else _local_default_for_models()
    dst = tempfile.mkdtemp(prefix="ray-fer-model-")
    atexit.register(shutil.rmtree, dst, True)
    before = os.environ.get(ENV)
    try:
        with _quick_requests():
            # models:/ lookups inside MLflow read the process's tracking URI, not the argument
            mlflow.set_tracking_uri(tracker)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracker))
    except Exception as e:
        raise UserError(f"cannot fetch model {uri} from the MLflow tracker at {tracker} ({short_error(e)}); check the run "
                        f"id or model name and version, and {ENV}") from None
    finally:
        mlflow.set_tracking_uri(before)  # None: back to MLflow's default, and the variable unset
    found = [local] if local.is_file() else sorted(local.rglob("*.pt"))  # a training run logs its model.pt
    if len(found) != 1:
        raise UserError(f"{uri} holds {len(found)} .pt files where a ray-fer model holds one model.pt; pass the model "
                        f"a ray-fer training run logged (runs:/<run id>/{MODEL_NAME}) or a version registered from it")
    return str(found[0])
