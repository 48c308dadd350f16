"""The run folder: deciding whether a re-used run name may resume, the record of starts, and
exporting a checkpoint as a bundle. Fake run folders, no Ray."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from ray_fer.config import ConfigError, TrainJobConfig, UserError, load_config, to_yaml
from ray_fer.train.runs import (CONFIG_FILE, best_state_and_history, bundle_from_state, config_changes, plan_resume,
                          read_starts, record_start, run_dir, write_state)


def _cfg(tmp_path: Path, *extra: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, ["data.train=/data/train", "data.val=/data/val", "train.epochs=5",
                                              f"run.storage_path={tmp_path}", "run.name=fer", *extra])


def _trained(cfg: TrainJobConfig, epoch: int = 3, *, config_yaml: bool = True) -> Path:
    """A run folder as training leaves it: config.yaml and a checkpoint after `epoch`."""
    folder = Path(run_dir(cfg))
    checkpoint = folder / "checkpoint_2025-01-01_00-00-00.000000"
    checkpoint.mkdir(parents=True)
    write_state(checkpoint, {"epoch": epoch, "config": asdict(cfg), "model": {}, "metrics": {}, "history": []})
    if config_yaml:
        (folder / CONFIG_FILE).write_text(to_yaml(cfg))
    return folder


def test_a_new_name_or_a_folder_without_checkpoints_starts_afresh(tmp_path):
    cfg = _cfg(tmp_path)
    assert plan_resume(cfg) is None
    folder = Path(run_dir(cfg))
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(to_yaml(_cfg(tmp_path, "train.lr=0.5")))  # a start that never checkpointed
    assert plan_resume(cfg) is None


def test_settings_that_may_change_resume_and_are_listed_in_one_line(tmp_path, caplog):
    _trained(_cfg(tmp_path))
    cfg = _cfg(tmp_path, "train.epochs=8", "run.max_failures=4", "run.num_workers=2", "run.use_gpu=false",
               "train.fail_at_epoch=6")
    with caplog.at_level(logging.INFO, logger="ray_fer"):
        resume = plan_resume(cfg)
    assert resume.epochs_done == 3
    assert resume.changes == {"train.epochs": (5, 8), "train.fail_at_epoch": (None, 6), "run.num_workers": (1, 2),
                              "run.use_gpu": ("auto", False), "run.max_failures": (2, 4)}
    lines = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert lines == ["run fer resumes after epoch 3 with changed settings: train.epochs 5 -> 8, "
                     "train.fail_at_epoch null -> 6, run.num_workers 1 -> 2, run.use_gpu auto -> false, "
                     "run.max_failures 2 -> 4"]


def test_settings_that_shape_the_weights_are_refused_with_the_keys_and_the_fix(tmp_path):
    folder = _trained(_cfg(tmp_path))
    cfg = _cfg(tmp_path, "train.lr=0.01", "data.image_size=64", "train.epochs=8")
    with pytest.raises(ConfigError) as e:
        plan_resume(cfg)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"run 'fer' ({folder}) has trained 3 epoch(s) with other settings: "
                              "data.image_size 224 -> 64, train.lr 0.001 -> 0.01; pass a new run.name")
    assert message.endswith("or --set run.resume=force to resume this run with them")
    assert "train.epochs" not in message and "model.weights=" not in message  # no model.pt yet
    (folder / "model.pt").write_bytes(b"")  # a finished run: its weights can seed a new one
    with pytest.raises(ConfigError, match=f"add model.weights={folder / 'model.pt'} to start from its best weights"):
        plan_resume(cfg)


def test_run_resume_force_resumes_with_the_new_settings_and_warns(tmp_path, caplog):
    _trained(_cfg(tmp_path))
    cfg = _cfg(tmp_path, "train.lr=0.01", "run.resume=force")
    with caplog.at_level(logging.INFO, logger="ray_fer"):
        resume = plan_resume(cfg)
    assert resume.changes == {"train.lr": (0.001, 0.01)}
    [record] = [r for r in caplog.records if "changed settings" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == ("run fer resumes after epoch 3 with changed settings (run.resume=force): "
                                   "train.lr 0.001 -> 0.01")


def test_fewer_epochs_than_trained_are_refused(tmp_path):
    _trained(_cfg(tmp_path), epoch=4)
    with pytest.raises(ConfigError, match=r"train.epochs=3 is below the 4 epochs run 'fer' has trained already .*"
                                          r"pass train.epochs=4 or more to resume it, or a new run.name"):
        plan_resume(_cfg(tmp_path, "train.epochs=3", "run.resume=force"))


def test_all_epochs_done_exports_again_and_says_so(tmp_path, caplog):
    _trained(_cfg(tmp_path), epoch=5)
    with caplog.at_level(logging.INFO, logger="ray_fer"):
        assert plan_resume(_cfg(tmp_path)).changes == {}
    assert "run fer has trained all 5 epochs already: nothing to train" in caplog.text


def test_the_previous_settings_are_config_yaml_else_the_latest_checkpoints(tmp_path):
    folder = _trained(_cfg(tmp_path))  # the checkpoint was trained with lr 0.001
    (folder / CONFIG_FILE).write_text(to_yaml(_cfg(tmp_path, "train.lr=0.01")))  # a later start forced 0.01
    resume = plan_resume(_cfg(tmp_path, "train.lr=0.01"))
    assert resume.changes == {} and resume.source == str(folder / CONFIG_FILE)
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(ConfigError, match="train.lr 0.001 -> 0.01"):
        plan_resume(_cfg(tmp_path, "train.lr=0.01"))


def test_the_same_folder_written_another_way_is_no_change(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _trained(_cfg(tmp_path, "data.train=data/train"))
    assert plan_resume(_cfg(tmp_path, f"data.train={tmp_path / 'data' / 'train'}")).changes == {}


def test_a_config_from_an_older_version_compares_by_defaults():
    now = asdict(load_config(TrainJobConfig, None, ["data.train=a", "data.val=b"]))
    older = asdict(load_config(TrainJobConfig, None, ["data.train=a", "data.val=b"]))
    del older["run"]["resume"]  # a key added since: its default
    older["train"]["retired_key"] = 1  # a key removed since: ignored
    assert config_changes(older, now) == {}


def test_record_start_keeps_config_yaml_and_the_history_of_starts(tmp_path):
    first = _cfg(tmp_path)
    record_start(first, None)
    _trained(first, config_yaml=False)
    again = _cfg(tmp_path, "train.epochs=8")
    record_start(again, plan_resume(again))
    folder = Path(run_dir(first))
    assert (folder / CONFIG_FILE).read_text() == to_yaml(again)
    starts = read_starts(str(folder))
    assert [(s["after_epoch"], s["changed"]) for s in starts] == [(0, {}), (3, {"train.epochs": [5, 8]})]
    assert starts[0]["config"] == asdict(first) and starts[1]["config"] == asdict(again)


def test_a_bundle_takes_its_preprocessing_from_the_checkpoint_it_exports(tmp_path):
    trained_with = _cfg(tmp_path, "data.image_size=48", "data.decode_size=40")
    state = {"model": {"w": torch.ones(2)}, "config": asdict(trained_with), "metrics": {"epoch": 2}, "epoch": 2}
    bundle = bundle_from_state(state, history=[{"epoch": 1}, {"epoch": 2}])
    assert (bundle.image_size, bundle.decode_size) == (48, 40)  # whatever the current config says
    assert bundle.config == asdict(trained_with) and bundle.metrics == {"epoch": 2} and len(bundle.history) == 2


def test_the_best_checkpoint_and_the_latest_history_are_read_from_storage(tmp_path):
    folder = tmp_path / "run"
    history = [{"epoch": 1, "val_loss": 1.5}, {"epoch": 2, "val_loss": 1.2}, {"epoch": 3, "val_loss": 1.4}]
    for epoch in (2, 3):  # Ray kept the best (2) and the latest (3)
        checkpoint = folder / f"checkpoint_2025-01-01_00-00-0{epoch}.000000"
        checkpoint.mkdir(parents=True)
        write_state(checkpoint, {"epoch": epoch, "metrics": history[epoch - 1], "history": history[:epoch]})
    best, latest_history = best_state_and_history(str(folder))
    assert best["epoch"] == 2 and latest_history == history
    last, _ = best_state_and_history(str(folder), export="last")  # run.export=last
    assert last["epoch"] == 3
    with pytest.raises(UserError, match="holds no checkpoint_"):
        best_state_and_history(str(tmp_path))
