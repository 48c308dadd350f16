"""Config loading: YAML + --set overrides, and errors that name the key and the fix."""

from __future__ import annotations

import pytest

from ray_fer.config import ConfigError, InferConfig, TrainJobConfig, load_config, parse_overrides, to_yaml

BASE = ["data.train=/tmp/train", "data.val=/tmp/val"]


def test_defaults_match_the_documented_ones():
    cfg = load_config(TrainJobConfig, None, BASE)
    assert (cfg.data.image_size, cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (224, 15, 32, 0.001)
    assert (cfg.run.storage_path, cfg.run.num_workers, cfg.run.use_gpu) == ("./runs", 1, "auto")
    assert (cfg.run.max_failures, cfg.run.checkpoints_to_keep, cfg.data.limit_per_class) == (2, 2, None)
    assert cfg.model.weights == "none"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: /a\n  val: /b\n  image_size: 96\ntrain:\n  epochs: 3\n  lr: 1e-4\n")
    cfg = load_config(TrainJobConfig, path, ["train.epochs=7", "run.use_gpu=false", "data.limit_per_class=null"])
    assert cfg.data.image_size == 96 and cfg.train.epochs == 7 and cfg.train.lr == 1e-4
    assert cfg.run.use_gpu is False and cfg.data.limit_per_class is None
    # the saved form loads back to the same config
    again = tmp_path / "again.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(TrainJobConfig, again) == cfg


def test_int_is_accepted_for_float_and_choices_ignore_case():
    cfg = load_config(TrainJobConfig, None, BASE + ["train.lr=1", "run.use_gpu=AUTO", "train.optimizer=AdamW"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.run.use_gpu == "auto" and cfg.train.optimizer == "adamw"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochz=3", "unknown key train.epochz; valid keys in train: epochs"),
        ("trian.epochs=3", "unknown key trian; valid keys: data, model, train, run"),
        ("train.optimizer=sgdd", "train.optimizer: 'sgdd' is not valid; choose one of: adam, adamw, sgd"),
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),
        ("train.epochs=2.5", "train.epochs must be an integer, got 2.5"),
        ("train.lr=fast", "train.lr must be a number, got 'fast'"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("run.use_gpu=maybe", "run.use_gpu: 'maybe' is not valid; choose one of: auto, true, false"),
        ("data.image_size=16", "data.image_size must be >= 32, got 16"),
        ("train.label_smoothing=1.5", "train.label_smoothing must be in [0, 1)"),
        ("train.ema_decay=1", "train.ema_decay must be in [0, 1)"),
        ("train.consistency=-1", "train.consistency must be >= 0"),
        ("run.name=a/b", "run.name must be a non-empty name without '/'"),
        ("train.channels_last=yes please", "train.channels_last must be true or false"),
        ("train=3", "train must be a mapping"),
        ("data.extra_train=3", "data.extra_train must be a list, got 3"),
        ("data.extra_train=['']", "data.extra_train holds an empty path"),
        ("data.extra_repeat=0", "data.extra_repeat must be >= 1, got 0"),
        ("data.faces=detect", "data.faces: 'detect' is not valid; choose one of: whole, auto"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TrainJobConfig, None, BASE + [override])
    assert message in str(e.value)


def test_extra_training_folders_are_a_list_of_paths():
    cfg = load_config(TrainJobConfig, None, BASE + ["data.extra_train=[/a, s3://b/c]"])
    assert cfg.data.extra_train == ["/a", "s3://b/c"]
    assert load_config(TrainJobConfig, None, BASE + ["data.extra_train=/a"]).data.extra_train == ["/a"]


def test_missing_data_paths_say_what_to_pass():
    with pytest.raises(ConfigError, match=r"data.train is not set: pass --set data.train=PATH"):
        load_config(TrainJobConfig, None, [])


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainJobConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainJobConfig, bad)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["train.epochs"])


def test_config_checks():
    cfg = load_config(InferConfig, overrides={"model": "m.pt", "input": "in", "output": "out", "batch_size": 8})
    assert cfg.batch_size == 8 and cfg.precision == "auto"
    with pytest.raises(ConfigError, match="unknown key batchsize; valid keys: model, input"):
        load_config(InferConfig, overrides=["batchsize=8"])
    with pytest.raises(ConfigError, match="precision: 'fp16' is not valid; choose one of: auto, bf16, fp32"):
        load_config(InferConfig, overrides={"model": "m", "input": "i", "output": "o", "precision": "fp16"})
    with pytest.raises(ConfigError, match="overwrite and skip_existing exclude each other"):
        load_config(InferConfig, overrides={"model": "m", "input": "i", "output": "o",
                                            "overwrite": True, "skip_existing": True})


def test_consistency_needs_an_augmentation():
    with pytest.raises(ConfigError, match="train.augment=none makes them the same"):
        load_config(TrainJobConfig, None, BASE + ["train.consistency=6", "train.augment=none"])
    assert load_config(TrainJobConfig, None, BASE + ["train.consistency=6"]).train.consistency == 6.0
    # the face stage's crop is a second view of its own, with or without augmentation
    face = load_config(TrainJobConfig, None, BASE + ["train.consistency=6", "train.augment=none",
                                                     "train.consistency_view=face"])
    assert face.train.consistency_view == "face"
    with pytest.raises(ConfigError, match="train.consistency_view=face gives each face a second view for "
                                          "train.consistency, which is 0"):
        load_config(TrainJobConfig, None, BASE + ["train.consistency_view=face"])
