"""Experiment tracking in MLflow, against a real `mlflow server` on loopback (SQLite, artifacts in
a temporary folder) and the local SQLite store: a 2-epoch training run's parameters, metrics by
epoch, report and model; a crash that ends it FAILED and the resume that continues the same MLflow
run; evaluation logged to the model's run through a registered model's URI; the local store; a
tracker that is down at the start or goes away later; MLflow not installed."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from ray_fer import tracking  # noqa: E402
from ray_fer.config import ConfigError, TrainJobConfig, UserError, load_config  # noqa: E402
from ray_fer.label.evaluate import evaluate_folder  # noqa: E402
from ray_fer.model import load_bundle  # noqa: E402
from ray_fer.model_ref import ModelFile  # noqa: E402
from ray_fer.train.trainer import TrackEpochs, run_training  # noqa: E402

from conftest import _free_port  # noqa: E402


def _cfg(fer_root: Path, storage: Path, name: str, *extra: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, [
        f"data.train={fer_root / 'train'}", f"data.val={fer_root / 'val'}",
        "data.limit_per_class=10", "data.image_size=48", "train.batch_size=16", "train.augment=none",
        "train.scheduler=constant", "run.num_workers=2", "run.tracking=mlflow",
        f"run.storage_path={storage}", f"run.name={name}", *extra,
    ])


def _steps(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def tracked_run(fer_root, ray_local, mlflow_server, tmp_path_factory):
    """A 2-epoch run logged to the server; the tests below resume it and evaluate its model."""
    storage = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        cfg = _cfg(fer_root, storage, "tracked", "train.epochs=2")
        return cfg, run_training(cfg)


@pytest.mark.integration
def test_a_tracked_run_logs_its_config_epochs_report_and_model(tracked_run, mlflow_server):
    cfg, summary = tracked_run
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "ray-fer"
    # the resolved config, flattened
    params = run.data.params
    assert params["train.epochs"] == "2" and params["data.limit_per_class"] == "10"
    assert params["run.num_workers"] == "2" and params["data.extra_train"] == "[]"
    assert params["data.train"] == cfg.data.train
    # every epoch's figures at step = epoch, as the bundle's history has them
    bundle, model_id = load_bundle(summary["model"])
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert _steps(client, run.info.run_id, key) == [
            (h["epoch"], pytest.approx(h[key], rel=1e-6)) for h in bundle.history], key
    assert run.data.metrics["best_val_loss"] == pytest.approx(summary["best_val_loss"], abs=1e-6)
    assert run.data.tags["model_id"] == model_id == summary["model_id"]
    # the report's files
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "config.yaml", "starts.jsonl", "curves.png", "metrics.csv"}
    curves = Path(client.download_artifacts(run.info.run_id, "curves.png"))
    assert curves.read_bytes() == (Path(cfg.run.storage_path) / "tracked" / "curves.png").read_bytes()
    # the bundle as the run's model: runs:/<id>/model is what `--model` takes
    run_folder = Path(cfg.run.storage_path) / "tracked"
    recorded = json.loads((run_folder / tracking.RUN_FILE).read_text())
    assert recorded["run_id"] == run.info.run_id and recorded["tracking_uri"] == mlflow_server.uri
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        fetched = ModelFile.read(f"runs:/{run.info.run_id}/model")
    assert fetched.data == (run_folder / "model.pt").read_bytes()


@pytest.mark.integration
def test_a_crashed_run_ends_failed_and_its_resume_continues_the_same_mlflow_run(tracked_run, fer_root, mlflow_server,
                                                                                monkeypatch):
    cfg, first = tracked_run
    storage = Path(cfg.run.storage_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    client = MlflowClient(mlflow_server.uri)
    # extended to 3 epochs, a worker is killed in epoch 3 and no restart is allowed: the run fails
    with pytest.raises(Exception):
        run_training(_cfg(fer_root, storage, "tracked", "train.epochs=3", "train.fail_at_epoch=3",
                          "run.max_failures=0"))
    run = client.get_run(first["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["error"]
    # re-running the command resumes from epoch 2's checkpoint, in the same MLflow run
    again = run_training(_cfg(fer_root, storage, "tracked", "train.epochs=3"))
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    run = client.get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _steps(client, run.info.run_id, "val_loss")] == [1, 2, 3]  # each epoch once
    # parameters are immutable in MLflow: the changed setting is a tag that says from when
    assert run.data.params["train.epochs"] == "2"
    assert run.data.tags["config.train.epochs"] == "3 (from epoch 3; was 2)"
    assert len(client.search_runs([run.info.experiment_id], "attributes.run_name = 'tracked'")) == 1


@pytest.mark.integration
def test_evaluate_logs_to_the_models_run_through_a_registered_model(tracked_run, fer_root, mlflow_server,
                                                                    monkeypatch, tmp_path):
    import mlflow

    cfg, summary = tracked_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(mlflow_server.uri)
    try:
        version = mlflow.register_model(f"runs:/{summary['mlflow_run_id']}/model", "fer-tracked").version
    finally:
        mlflow.set_tracking_uri(None)  # what a user's script sets stays out of the tests after this one
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # which the line above unset
    result = evaluate_folder(f"models:/fer-tracked/{version}", str(fer_root / "val"), limit_per_class=3,
                             faces="whole", track="mlflow")
    # the run's current model (a resume above may have exported a better epoch since)
    assert result["model"] == load_bundle(Path(cfg.run.storage_path) / "tracked" / "model.pt")[1]
    assert result["mlflow_run_id"] == summary["mlflow_run_id"]  # the model's own training run
    assert result["output"] == str(tmp_path / "eval" / f"models-fer-tracked-{version}" / "val-none")
    client = MlflowClient(mlflow_server.uri)
    metrics = client.get_run(summary["mlflow_run_id"]).data.metrics
    assert metrics["eval.val-none.accuracy"] == pytest.approx(result["accuracy"], abs=1e-6)
    assert metrics["eval.val-none.macro_f1"] == pytest.approx(result["macro_f1"], abs=1e-6)
    assert metrics["eval.val-none.num_images"] == 21
    assert metrics["eval.val-none.happy.recall"] == pytest.approx(result["recall"]["happy"], abs=1e-4)
    files = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "eval/val-none")}
    assert files == {"eval/val-none/metrics.json", "eval/val-none/confusion_matrix.png", "eval/val-none/report.md"}

    # a model no tracked run made (the packaged one): a run of its own, finished
    other = evaluate_folder("fer2013", str(fer_root / "val"), limit_per_class=3, faces="whole", track="mlflow")
    run = client.get_run(other["mlflow_run_id"])
    assert run.info.run_name == f"evaluate {other['model'][:12]}" and run.info.status == "FINISHED"
    assert run.data.params["model"] == "fer2013"
    assert run.data.metrics["eval.val-none.accuracy"] == pytest.approx(other["accuracy"], abs=1e-6)


@pytest.mark.integration
def test_without_a_tracking_uri_the_run_goes_to_the_local_store_beside_the_runs(tracked_run, tmp_path, monkeypatch):
    cfg, _ = tracked_run
    runs = tmp_path / "runs"
    shutil.copytree(Path(cfg.run.storage_path) / "tracked", runs / "tracked")  # a finished run, untracked here
    trained, model_id = load_bundle(runs / "tracked" / "model.pt")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = copy.deepcopy(cfg)
    cfg.run.storage_path, cfg.train.epochs = "runs", len(trained.history)
    summary = run_training(cfg)  # nothing left to train: it exports again and logs to the local store
    local = f"sqlite:///{runs / tracking.LOCAL_DB}"
    assert summary["mlflow_tracking_uri"] == local and summary["model_id"] == model_id
    client = MlflowClient(local)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["model_id"] == model_id
    history = load_bundle(summary["model"])[0].history
    assert _steps(client, run.info.run_id, "val_loss") == [(h["epoch"], pytest.approx(h["val_loss"]))
                                                           for h in history]  # every epoch the tracker missed
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (runs / tracking.LOCAL_ARTIFACTS).as_uri()
    assert (runs / tracking.LOCAL_ARTIFACTS).is_dir()
    assert json.loads((runs / "tracked" / tracking.RUN_FILE).read_text())["tracking_uri"] == local
    # its model by URI, from the local store in ./runs (no MLFLOW_TRACKING_URI)
    assert ModelFile.read(f"runs:/{run.info.run_id}/model").data == (runs / "tracked" / "model.pt").read_bytes()
    import mlflow
    assert os.environ.get("MLFLOW_TRACKING_URI") is None and mlflow.get_tracking_uri() != local  # left as it was


def test_a_tracker_that_does_not_answer_stops_the_run_before_any_work(fer_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(UserError, match=r"the MLflow tracker at http://127\.0\.0\.1:\d+ does not answer .*; start it "
                                        r"or fix MLFLOW_TRACKING_URI, or unset it"):
        run_training(_cfg(fer_root, tmp_path, "nowhere", "train.epochs=1"))
    assert not (tmp_path / "nowhere").exists()


def test_without_mlflow_tracking_fails_up_front_with_the_install_line(fer_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    with pytest.raises(ConfigError, match=r"run.tracking=mlflow needs MLflow, which is not installed here: "
                                          r"pip install 'ray-fer\[mlflow\]'"):
        run_training(_cfg(fer_root, tmp_path, "no-mlflow", "train.epochs=1"))
    with pytest.raises(ConfigError, match="needs MLflow"):
        ModelFile.read("runs:/0123/model")
    assert not (tmp_path / "no-mlflow").exists()


def test_a_tracker_that_goes_away_costs_a_warning_and_the_end_logs_what_it_missed(mlflow_server, tmp_path, caplog):
    run_folder = tmp_path / "run"
    run_folder.mkdir()
    live = tracking.start_training_run(mlflow_server.uri, name="away", experiment="ray-fer",
                                       run_folder=str(run_folder), config={"train": {"epochs": 2}}, after_epoch=0)
    gone = tracking.TrackedRun(f"http://127.0.0.1:{_free_port()}", live.experiment_id, live.run_id)
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.5 / e, "val_acc": 0.2 * e, "lr": 1e-3}
               for e in (1, 2)]
    with caplog.at_level(logging.WARNING):
        TrackEpochs(gone).after_report(None, [history[0]], None)  # the controller's callback: no exception
        (run_folder / "model.pt").write_bytes(b"weights")
        tracking.finish_training_run(gone, history=history, files=[], bundle=str(run_folder / "model.pt"),
                                     summary={"model_id": "abc", "epochs": 2, "best_epoch": 2, "best_val_loss": 0.75,
                                              "best_val_acc": 0.4})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("did not take epoch 1's metrics" in w and "training goes on" in w for w in warnings), warnings
    assert any("did not take the end of run" in w and "run the same command again" in w for w in warnings), warnings

    # the tracker answers again: the end logs both epochs, once each
    tracking.finish_training_run(live, history=history, files=[], bundle=str(run_folder / "model.pt"),
                                 summary={"model_id": "abc", "epochs": 2, "best_epoch": 2, "best_val_loss": 0.75,
                                          "best_val_acc": 0.4})
    client = MlflowClient(mlflow_server.uri)
    assert _steps(client, live.run_id, "val_loss") == [(1, 1.5), (2, 0.75)]
    assert client.get_run(live.run_id).info.status == "FINISHED"
