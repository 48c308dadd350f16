"""Batch labelling: the model call, the predictor, input and output checks, and real runs on a local
Ray instance over FER2013 images, generated odd files and a loopback S3 server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ray_fer import storage
from ray_fer.cli import main
from ray_fer.config import ConfigError, InferConfig, load_config
from ray_fer.decode import decode_image
from ray_fer.config import UserError
from ray_fer.infer import label_images
from ray_fer.inputs import InputError, list_inputs
from ray_fer.output import SUCCESS_FILE, OutputError, prepare_output
from ray_fer.precision import autocast_dtype, cpu_has_native_bf16
from ray_fer.predictor import PlanError, Predictor, fold_batchnorm, plan_predictors, predict_probs
from ray_fer.labels import CLASSES, PROB_COLUMNS
from ray_fer.model import ModelBundle, build_model, load_bundle, save_bundle
from test_decode import corrupt_jpeg, encode, halves, png_header_only

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Models made here (no downloads)


def _fer_pixels(root: Path, split: str, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / split / name).glob("*.jpg"))[:per_class]:
            images.append(decode_image(path.read_bytes(), 48)[0])
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


@pytest.fixture(scope="module")
def random_bundle(fer_root, tmp_path_factory) -> str:
    """EfficientNet-B0 with random weights whose batch-norm statistics are calibrated on FER faces
    and a random head: varied labels for a fraction of a second of compute."""
    torch.manual_seed(0)
    model = build_model("none")
    torch.nn.init.normal_(model.classifier[1].weight, std=0.05)
    bundle = ModelBundle(state_dict={}, image_size=48, decode_size=48)
    x, _ = _fer_pixels(fer_root, "train", 24)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 56):
            model(bundle.eval_preset()(x[i:i + 56]))
    bundle.state_dict = model.eval().state_dict()
    path = tmp_path_factory.mktemp("models") / "random.pt"
    save_bundle(bundle, str(path))
    return str(path)


TRAIN_RECIPE = {"per_class": 1000, "epochs": 5, "image_size": 48, "lr": 1e-3, "seed": 0}


@pytest.fixture(scope="module")
def trained_bundle(request, fer_root, tmp_path_factory) -> str:
    """EfficientNet-B0 trained from scratch on a balanced FER2013 subset (TRAIN_RECIPE; about two
    minutes on 2 cores), kept in pytest's cache so that later runs reuse it."""
    from ray_fer.images import train_preset
    from ray_fer.train import train_one_epoch

    key = "-".join(f"{k}{v}" for k, v in TRAIN_RECIPE.items())
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("ray-fer-models") if cache is not None else tmp_path_factory.mktemp("models")
    path = Path(folder) / f"trained-{key}.pt"
    if path.exists():
        return str(path)
    torch.manual_seed(TRAIN_RECIPE["seed"])
    x, y = _fer_pixels(fer_root, "train", TRAIN_RECIPE["per_class"])
    model = build_model("none").to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_RECIPE["lr"], weight_decay=0.05)
    preset = train_preset("flip_rotate", image_size=TRAIN_RECIPE["image_size"])
    for _ in range(TRAIN_RECIPE["epochs"]):
        order = torch.randperm(len(x))
        batches = [{"image": x[order[i:i + 64]], "label": y[order[i:i + 64]]} for i in range(0, len(x), 64)]
        train_one_epoch(model, batches, preset, optimizer, device=torch.device("cpu"))
    bundle = ModelBundle(state_dict=model.eval().state_dict(), image_size=TRAIN_RECIPE["image_size"], decode_size=48)
    save_bundle(bundle, str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> str:
    """Random weights, no data: for shape and plumbing tests."""
    torch.manual_seed(1)
    model = build_model("none")
    torch.nn.init.normal_(model.classifier[1].weight, std=0.05)
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_bundle(ModelBundle(state_dict=model.eval().state_dict(), image_size=32, decode_size=48), str(path))
    return str(path)


def _predictor(uri: str, **kwargs) -> Predictor:
    bundle, model_id = load_bundle(uri)
    return Predictor(bundle, model_id=model_id, device="cpu", **kwargs)


def _direct_probs(uri: str, files: list[str], precision: str = "fp32") -> np.ndarray:
    """The same bundle called in this process on the same files, without Ray."""
    bundle, _ = load_bundle(uri)
    net = bundle.build_model()
    pixels = torch.from_numpy(np.stack([decode_image(Path(f).read_bytes(), bundle.decode_size)[0] for f in files]))
    dtype = autocast_dtype(precision, torch.device("cpu"))
    return predict_probs(net, bundle.eval_preset(channels_last=False), pixels, autocast_dtype=dtype).numpy()


# --------------------------------------------------------------------------------------------
# predict_probs and precision


def test_predict_probs_shape_dtype_and_sum(tiny_bundle):
    bundle, _ = load_bundle(tiny_bundle)
    net = bundle.build_model()
    pixels = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    probs = predict_probs(net, bundle.eval_preset(), pixels)
    assert probs.shape == (5, 7) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    bf16 = predict_probs(net, bundle.eval_preset(), pixels, autocast_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and torch.allclose(bf16.sum(1), torch.ones(5), atol=1e-5)


def test_bf16_near_ties_are_recomputed_in_fp32(random_bundle, fer_root, monkeypatch):
    """Rows whose two top classes are closer than NEAR_TIE under bf16 get fp32's probabilities;
    the others keep bf16's. The calibrated random model has many near-ties."""
    import ray_fer.predictor as predictor

    threshold = predictor.NEAR_TIE
    bundle, _ = load_bundle(random_bundle)
    net, preset = bundle.build_model(), bundle.eval_preset()
    pixels, _ = _fer_pixels(fer_root, "val", 20)
    fp32 = predict_probs(net, preset, pixels)
    checked = predict_probs(net, preset, pixels, autocast_dtype=torch.bfloat16)
    monkeypatch.setattr(predictor, "NEAR_TIE", 0.0)
    raw = predict_probs(net, preset, pixels, autocast_dtype=torch.bfloat16)
    top2 = raw.topk(2, dim=1).values
    near = (top2[:, 0] - top2[:, 1]) < threshold
    assert 0 < near.sum() < len(pixels), "the fixture should give some near-ties and some clear rows"
    assert torch.allclose(checked[near], fp32[near], atol=1e-6)
    assert torch.equal(checked[~near], raw[~near])
    agree = lambda probs: int((probs.argmax(1) == fp32.argmax(1)).sum())  # noqa: E731
    assert agree(checked) >= agree(raw)  # re-computed rows can only join fp32's labels


def test_predict_probs_flip_averages_the_mirror_image(tiny_bundle):
    bundle, _ = load_bundle(tiny_bundle)
    net, preset = bundle.build_model(), bundle.eval_preset()
    pixels = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    expected = (predict_probs(net, preset, pixels) + predict_probs(net, preset, pixels.flip(-1))) / 2
    assert torch.allclose(predict_probs(net, preset, pixels, tta="flip"), expected, atol=1e-6)
    assert predict_probs(net, preset, pixels, tta="tencrop").shape == (3, 7)
    with pytest.raises(ValueError, match="none, flip, tencrop"):
        predict_probs(net, preset, pixels, tta="mirror")


def test_folded_batchnorm_gives_the_same_probabilities(tiny_bundle):
    
    bundle, _ = load_bundle(tiny_bundle)
    pixels = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8)
    plain = predict_probs(bundle.build_model(), bundle.eval_preset(), pixels)
    folded = fold_batchnorm(bundle.build_model())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(predict_probs(folded, bundle.eval_preset(), pixels), plain, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The predictor, called in this process


def _batch(n_ok: int, errors: list[str], *, all_null_as_nan: bool = False) -> dict[str, np.ndarray]:
    n = n_ok + len(errors)
    error = np.array([None] * n_ok + errors, dtype=object)
    if all_null_as_nan and not errors:
        error = np.full(n, np.nan, dtype=np.float32)  # what Ray makes of an all-null column
    return {
        "path": np.array([f"/x/{i}.jpg" for i in range(n)], dtype=object),
        "image": np.random.default_rng(0).integers(0, 256, (n, 48, 48), dtype=np.uint8),
        "width": np.full(n, 48, dtype=np.int32),
        "true_label": np.arange(n) % 7,
        "error": error,
    }


def test_predictor_passes_columns_through_and_nulls_error_rows(tiny_bundle):
    out = _predictor(tiny_bundle, precision="fp32")(_batch(3, ["empty file", "not an image"]))
    assert isinstance(out, pa.Table) and out.num_rows == 5
    assert out.column_names == ["path", "width", "true_label", "label", "confidence", *PROB_COLUMNS,
                                "error", "model"]
    rows = out.to_pylist()
    assert [r["path"] for r in rows] == [f"/x/{i}.jpg" for i in range(5)]
    assert [r["true_label"] for r in rows] == [0, 1, 2, 3, 4]
    for r in rows[:3]:
        assert r["label"] in CLASSES and r["error"] is None
        assert abs(sum(r[c] for c in PROB_COLUMNS) - 1) < 1e-5
        assert r["confidence"] == max(r[c] for c in PROB_COLUMNS)
    for r, reason in zip(rows[3:], ["empty file", "not an image"]):
        assert r["error"] == reason and r["label"] is None and r["confidence"] is None
        assert all(r[c] is None for c in PROB_COLUMNS)
    assert out.schema.field("confidence").type == pa.float32()
    assert {r["model"] for r in rows} == {load_bundle(tiny_bundle)[1]}


def test_predictor_reads_ray_all_null_error_column_and_all_error_batches(tiny_bundle):
    predictor = _predictor(tiny_bundle)
    out = predictor(_batch(4, [], all_null_as_nan=True))
    assert out["error"].null_count == 4 and out["label"].null_count == 0
    out = predictor(_batch(0, ["empty file", "empty file"]))
    assert out["label"].null_count == 2 and out.schema.field("label").type == pa.string()


def test_predictor_refuses_a_column_it_would_overwrite(tiny_bundle):
    batch = _batch(2, [])
    batch["label"] = batch.pop("true_label")
    with pytest.raises(ValueError, match="'label' would be overwritten"):
        _predictor(tiny_bundle)(batch)


def test_predictor_loads_from_a_uri_and_checks_tta(tiny_bundle):
    predictor = Predictor(tiny_bundle, device="cpu", tta="flip")
    assert predictor.model_id == load_bundle(tiny_bundle)[1]
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        Predictor(tiny_bundle, device="cpu", tta="sideways")


# --------------------------------------------------------------------------------------------
# Resource plans: the pool never takes every CPU


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 8, 16, 64])
def test_cpu_plan_leaves_a_cpu_for_decoding(cpus):
    plan = plan_predictors({"CPU": cpus})
    assert plan.device == "cpu" and plan.num_gpus == 0
    assert plan.actors * plan.num_cpus + plan.decode_cpus <= cpus
    assert 1 <= plan.threads <= cpus and plan.memory > 0


def test_plan_declares_memory_the_cluster_has():
    assert plan_predictors({"CPU": 2, "memory": 16 * 1024**3}).memory == 2 * 1024**3
    small = plan_predictors({"CPU": 4, "memory": 2 * 1024**3}, actors=2)
    assert 0 < small.actors * small.memory <= 1024**3


def test_gpu_plan_is_one_actor_per_gpu():
    plan = plan_predictors({"CPU": 16, "GPU": 4})
    assert (plan.device, plan.actors, plan.num_gpus) == ("gpu", 4, 1)
    assert plan.tasks_in_flight > 2 and plan.actors * plan.num_cpus < 16
    assert plan_predictors({"CPU": 16, "GPU": 4}, device="cpu").device == "cpu"
    assert plan_predictors({"CPU": 2, "GPU": 1}).num_cpus <= 1


def test_plan_errors_name_the_fix():
    with pytest.raises(PlanError, match="no GPUs; use --set device=auto"):
        plan_predictors({"CPU": 4}, device="gpu")
    with pytest.raises(PlanError, match="actors=3 but the Ray cluster has 2 GPUs"):
        plan_predictors({"CPU": 4, "GPU": 2}, actors=3)


# --------------------------------------------------------------------------------------------
# Inputs and outputs, checked before any cluster work


def test_list_inputs_recurses_and_filters_extensions(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/1.jpg", "a/b/2.PNG", "3.webp", "a/b/4.tiff", "notes.txt", "a/5.parquet"]:
        (tmp_path / name).write_bytes(b"x")
    paths = list_inputs(str(tmp_path))["path"].to_pylist()
    assert [Path(p).relative_to(tmp_path).as_posix() for p in paths] == ["3.webp", "a/1.jpg", "a/b/2.PNG", "a/b/4.tiff"]


def test_list_inputs_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(InputError, match=f"input '{tmp_path}/nope' does not exist; pass a folder"):
        list_inputs(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images under .*empty"):
        list_inputs(str(tmp_path / "empty"))
    (tmp_path / "face.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="is a file; pass a folder"):
        list_inputs(str(tmp_path / "face.jpg"))
    with pytest.raises(InputError, match="unsupported storage scheme"):
        list_inputs("gs://bucket/faces")


def test_manifests_parquet_and_csv(tmp_path):
    pq.write_table(pa.table({"path": ["faces/a.jpg", str(tmp_path / "b.jpg"), "faces/a.jpg"], "id": [1, 2, 3]}),
                   tmp_path / "list.parquet")
    paths = list_inputs(str(tmp_path / "list.parquet"))["path"].to_pylist()
    assert paths == [str(tmp_path / "faces" / "a.jpg"), str(tmp_path / "b.jpg")]  # relative to it, once each
    (tmp_path / "list.csv").write_text("path,label\ns3://bucket/x.jpg,happy\nfaces/c.png,sad\n")
    assert list_inputs(str(tmp_path / "list.csv"))["path"].to_pylist() == [
        "s3://bucket/x.jpg", str(tmp_path / "faces" / "c.png")]
    (tmp_path / "bad.csv").write_text("file,label\nx.jpg,happy\n")
    with pytest.raises(InputError, match="has no 'path' column \\(it has: file, label\\)"):
        list_inputs(str(tmp_path / "bad.csv"))


def test_output_checks(tmp_path):
    assert len(prepare_output(str(tmp_path / "new"), overwrite=False, skip_existing=False, model_id="m")) == 0
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"path": ["/a.jpg"], "model": ["m"]}), out / "part.parquet")
    with pytest.raises(OutputError, match="is not empty \\(1 files\\); pass --overwrite .* --skip-existing"):
        prepare_output(str(out), overwrite=False, skip_existing=False, model_id="m")
    with pytest.raises(OutputError, match="labelled by model m, not other; pass the same --model"):
        prepare_output(str(out), overwrite=False, skip_existing=True, model_id="other")
    assert prepare_output(str(out), overwrite=False, skip_existing=True, model_id="m").to_pylist() == ["/a.jpg"]
    (out / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match="holds files ray-fer did not write .*notes.md"):
        prepare_output(str(out), overwrite=True, skip_existing=False, model_id="m")
    assert (out / "part.parquet").exists()  # nothing deleted
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        prepare_output(str(tmp_path / "file"), overwrite=False, skip_existing=False, model_id="m")


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


def _one_line_error(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_errors_are_one_line(capsys, tmp_path, tiny_bundle):
    err = _one_line_error(capsys, ["infer", "--model", tiny_bundle, "--ouput", str(tmp_path / "o")])
    assert "unrecognized arguments: --ouput" in err and "did you mean --output?" in err
    # the hint comes from the subcommand's own options: train has no --output to suggest
    err = _one_line_error(capsys, ["train", "--ouput", str(tmp_path / "o")])
    assert "unrecognized arguments: --ouput" in err and "did you mean" not in err
    err = _one_line_error(capsys, ["train", "--overwrite"])  # no far-fetched --verbose either
    assert "unrecognized arguments: --overwrite" in err and "did you mean" not in err
    err = _one_line_error(capsys, ["infer", "--model", tiny_bundle, "--input", str(tmp_path / "missing"),
                                   "--output", str(tmp_path / "o")])
    assert f"input '{tmp_path}/missing' does not exist" in err
    err = _one_line_error(capsys, ["infer", "--model", str(tmp_path / "nope.pt"), "--input", str(tmp_path),
                                   "--output", str(tmp_path / "o")])
    assert "nope.pt" in err and "check the path" in err
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    err = _one_line_error(capsys, ["infer", "--model", str(tmp_path / "junk.pt"), "--input", str(tmp_path),
                                   "--output", str(tmp_path / "o")])
    assert "junk.pt" in err and "not a loadable PyTorch weights file" in err
    err = _one_line_error(capsys, ["infer", "--model", tiny_bundle, "--input", str(tmp_path),
                                   "--output", str(tmp_path / "o"), "--set", "batchsize=3"])
    assert "unknown key batchsize; valid keys:" in err
    err = _one_line_error(capsys, ["infer", "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert "model is not set: pass --model" in err


# --------------------------------------------------------------------------------------------
# Real runs on a local Ray instance

BAD = {  # generated files that must become error rows, with a word of the expected reason
    "odd/corrupt.jpg": "cannot decode",
    "odd/truncated.jpg": "truncated",
    "odd/empty.jpg": "empty file",
    "odd/notes.jpg": "not an image",
    "odd/bomb.png": "decompression bomb",
}


def _odd_files(folder: Path) -> dict[str, tuple[int, int]]:
    """Write the bad files above and some odd but good ones; returns the good ones' (width, height)."""
    (folder / "odd" / "deeper").mkdir(parents=True)
    face = encode(Image.effect_noise((64, 64), 64), "JPEG")
    (folder / "odd/corrupt.jpg").write_bytes(corrupt_jpeg())
    (folder / "odd/truncated.jpg").write_bytes(face[: len(face) // 2])
    (folder / "odd/empty.jpg").write_bytes(b"")
    (folder / "odd/notes.jpg").write_text("this is a text file renamed to .jpg\n")
    (folder / "odd/bomb.png").write_bytes(png_header_only(30_000, 30_000))
    (folder / "odd/readme.txt").write_text("not listed: not an image extension")
    rgba = Image.new("RGBA", (50, 40), (200, 10, 10, 128))
    (folder / "odd/rgba.png").write_bytes(encode(rgba, "PNG"))
    big = Image.radial_gradient("L").resize((4000, 3000)).convert("RGB")
    (folder / "odd/deeper/big.jpg").write_bytes(encode(big, "JPEG", quality=80))
    (folder / "odd/deeper/cmyk.jpg").write_bytes(encode(halves((60, 60), 0, 255, "RGB").convert("CMYK"), "JPEG"))
    exif = Image.Exif()
    exif[0x0112] = 6
    (folder / "odd/rotated.jpg").write_bytes(encode(halves((80, 40), 0, 255, "RGB"), "JPEG", exif=exif))
    ramp = Image.fromarray(np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1)))
    (folder / "odd/gray16.png").write_bytes(encode(ramp, "PNG"))
    return {"odd/rgba.png": (50, 40), "odd/deeper/big.jpg": (4000, 3000), "odd/deeper/cmyk.jpg": (60, 60),
            "odd/rotated.jpg": (40, 80), "odd/gray16.png": (32, 32)}


def _fer_folder(fer_root: Path, folder: Path, per_class: int, start: int = 0) -> list[Path]:
    """Copy a few FER2013 val images per class into a temporary folder (never into the repo)."""
    copied = []
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for src in sorted((fer_root / "val" / name).glob("*.jpg"))[start:start + per_class]:
            copied.append(Path(shutil.copy(src, folder / name / src.name)))
    return copied


def _read_output(dst: str) -> pa.Table:
    fs, path = storage.filesystem(dst)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


@pytest.mark.integration
def test_fer_images_and_odd_files_one_row_each(ray_local, fer_root, random_bundle, tmp_path):
    folder = tmp_path / "images"
    faces = _fer_folder(fer_root, folder, per_class=40)
    good_sizes = _odd_files(folder)
    out = tmp_path / "labels"
    cfg = InferConfig(model=random_bundle, input=str(folder), output=str(out), precision="fp32",
                      decode_batch_size=64)
    summary = label_images(cfg)

    n_files = len(faces) + len(good_sizes) + len(BAD)
    assert (summary["images"], summary["errors"], summary["labelled"]) == (n_files, len(BAD), n_files - len(BAD))
    table = _read_output(str(out))
    assert table.num_rows == n_files
    rows = {Path(r["path"]).relative_to(folder).as_posix(): r for r in table.to_pylist()}
    assert len(rows) == n_files  # each file exactly once
    errors = {k: r["error"] for k, r in rows.items() if r["error"] is not None}
    assert set(errors) == set(BAD)
    for name, word in BAD.items():
        assert word in errors[name], (name, errors[name])
        assert rows[name]["label"] is None and rows[name]["width"] is None
    for name, size in good_sizes.items():
        assert (rows[name]["width"], rows[name]["height"]) == size and rows[name]["label"] in CLASSES

    good = table.filter(pa.compute.is_null(table["error"]))
    probs = np.stack([good[c].to_numpy() for c in PROB_COLUMNS], axis=1)
    assert probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(good["confidence"].to_numpy(), probs.max(axis=1))
    assert len(set(good["label"].to_pylist())) > 1  # a model that tells faces apart

    # the same bundle called directly in this process on the same files gives the same answers
    paths = good["path"].to_pylist()
    direct = _direct_probs(random_bundle, paths)
    assert good["label"].to_pylist() == [CLASSES[i] for i in direct.argmax(axis=1)]
    assert np.allclose(probs, direct, atol=1e-3)  # batch-norm folding changes the rounding only

    # the _SUCCESS file, written last, holds the counts, the model identity and the timing
    success = json.loads((out / SUCCESS_FILE).read_text())
    assert success["images"] == n_files and success["errors"] == len(BAD)
    assert success["model"] == load_bundle(random_bundle)[1] == summary["model"]
    assert set(table["model"].to_pylist()) == {summary["model"]}
    assert success["seconds"] > 0 and success["files"] and all(f.endswith(".parquet") for f in success["files"])
    # readable without further work: one schema, and pandas sees floats and nulls
    assert table.schema.field("width").type == pa.int32() and table.schema.field("label").type == pa.string()
    df = pq.read_table(out).to_pandas()
    assert len(df) == n_files and df["error"].notna().sum() == len(BAD)


@pytest.mark.integration
def test_overwrite_refusal_and_skip_existing_resume(ray_local, fer_root, random_bundle, tiny_bundle, tmp_path):
    folder = tmp_path / "images"
    _fer_folder(fer_root, folder, per_class=4)
    (folder / "broken.jpg").write_bytes(b"")
    out = tmp_path / "labels"
    cfg = InferConfig(model=random_bundle, input=str(folder), output=str(out))
    first = label_images(cfg)
    assert (first["images"], first["errors"]) == (29, 1)

    with pytest.raises(UserError, match="is not empty .* pass --overwrite"):
        label_images(cfg)
    again = label_images(InferConfig(model=random_bundle, input=str(folder), output=str(out), overwrite=True))
    assert (again["images"], again["processed"]) == (29, 29)
    assert _read_output(str(out)).num_rows == 29  # replaced, not appended

    # a crashed job: more images arrived, _SUCCESS is gone and a write left half a file behind
    _fer_folder(fer_root, folder, per_class=2, start=4)
    (out / SUCCESS_FILE).unlink()
    (out / "crashed_000001.parquet").write_bytes(b"PAR1 half a file")
    resumed = label_images(InferConfig(model=random_bundle, input=str(folder), output=str(out), skip_existing=True))
    assert (resumed["processed"], resumed["skipped"], resumed["images"], resumed["errors"]) == (14, 29, 43, 1)
    table = _read_output(str(out))
    assert table.num_rows == 43 and len(set(table["path"].to_pylist())) == 43
    assert not (out / "crashed_000001.parquet").exists()
    assert json.loads((out / SUCCESS_FILE).read_text())["images"] == 43

    # nothing left to do: no cluster work, the same counts
    done = label_images(InferConfig(model=random_bundle, input=str(folder), output=str(out), skip_existing=True))
    assert (done["processed"], done["images"]) == (0, 43)
    # resuming with another model would mix two models in one table
    with pytest.raises(UserError, match="labelled by model .*pass the same --model"):
        label_images(InferConfig(model=tiny_bundle, input=str(folder), output=str(out), skip_existing=True))


@pytest.mark.integration
@pytest.mark.s3
def test_s3_round_trip_with_the_model_on_s3(ray_local, s3_bucket, fer_root, random_bundle, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    local = tmp_path / "images"
    faces = _fer_folder(fer_root, local, per_class=3)
    for path in faces:
        s3.upload_file(str(path), s3_bucket, f"in/{path.parent.name}/{path.name}")
    s3.put_object(Bucket=s3_bucket, Key="in/odd/notes.jpg", Body=b"not an image")
    s3.put_object(Bucket=s3_bucket, Key="in/odd/readme.md", Body=b"not listed")
    s3.upload_file(random_bundle, s3_bucket, "models/model.pt")

    dst = f"s3://{s3_bucket}/out/labels"
    summary = label_images(InferConfig(model=f"s3://{s3_bucket}/models/model.pt", input=f"s3://{s3_bucket}/in",
                                       output=dst))
    assert (summary["images"], summary["errors"]) == (len(faces) + 1, 1)
    assert summary["model"] == load_bundle(random_bundle)[1]
    table = _read_output(dst)
    assert table.num_rows == len(faces) + 1
    assert all(p.startswith(f"s3://{s3_bucket}/in/") for p in table["path"].to_pylist())
    marker = json.loads(s3.get_object(Bucket=s3_bucket, Key="out/labels/_SUCCESS")["Body"].read())
    assert marker["images"] == len(faces) + 1
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in json.dumps(marker) and secret not in json.dumps(summary)

    with pytest.raises(UserError, match="is not empty"):
        label_images(InferConfig(model=random_bundle, input=f"s3://{s3_bucket}/in", output=dst))
    with pytest.raises(UserError, match=f"no images under 's3://{s3_bucket}/nothing'"):
        label_images(InferConfig(model=random_bundle, input=f"s3://{s3_bucket}/nothing", output=dst + "2"))
    with pytest.raises(UserError, match="input bucket s3://no-such-bucket-here does not exist"):
        label_images(InferConfig(model=random_bundle, input="s3://no-such-bucket-here/in", output=str(tmp_path / "o")))


@pytest.mark.integration
def test_cli_as_a_user_runs_it(fer_root, random_bundle, tmp_path):
    """`ray-fer infer` in its own process (its own Ray): the last stdout line is the JSON summary."""
    folder = tmp_path / "images"
    faces = _fer_folder(fer_root, folder, per_class=2)
    out = tmp_path / "labels"
    cmd = [sys.executable, "-m", "ray_fer.cli", "infer", "--model", random_bundle, "--input", str(folder),
           "--output", str(out), "--set", "batch_size=8"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["images"] == len(faces) and summary["output"] == str(out)
    assert {"images", "labelled", "errors", "output", "seconds", "images_per_s", "model"} <= set(summary)


# --------------------------------------------------------------------------------------------
# The bf16 fast path on a trained model


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (auto precision is fp32 here)")
def test_bf16_labels_agree_with_fp32_on_fer_val(fer_root, trained_bundle):
    """The fast path exactly as the Predictor runs it (batch norms folded, channels_last, bf16)
    against the plain fp32 model."""
    bundle, _ = load_bundle(trained_bundle)
    net = bundle.build_model()
    fast = fold_batchnorm(bundle.build_model()).to(memory_format=torch.channels_last)
    preset = bundle.eval_preset()
    files = sorted((fer_root / "val").glob("*/*.jpg"))
    pixels = torch.from_numpy(np.stack([decode_image(f.read_bytes(), 48)[0] for f in files]))
    fp32, bf16 = [], []
    for i in range(0, len(pixels), 256):
        fp32.append(predict_probs(net, preset, pixels[i:i + 256]).argmax(1))
        bf16.append(predict_probs(fast, preset, pixels[i:i + 256], autocast_dtype=torch.bfloat16).argmax(1))
    agree = (torch.cat(fp32) == torch.cat(bf16)).float().mean().item()
    assert len(files) == 3589
    assert agree >= 0.995, f"bf16 and fp32 labels agree on {agree:.2%} of FER2013 val"


@pytest.mark.slow
def test_compiled_predictor_matches_eager_and_pads_short_batches(fer_root, trained_bundle):
    """compile=True: one compilation at construction, batches of any length padded to batch_size,
    the same labels as the eager predictor on FER2013 val faces (the compile takes ~1 min here)."""
    pixels, _ = _fer_pixels(fer_root, "val", 15)  # 105 faces: 3 full batches of 32 and one of 9
    n = len(pixels)
    batch = {"path": np.array([f"/x/{i}.jpg" for i in range(n)], dtype=object), "image": pixels.numpy(),
             "error": np.full(n, None, dtype=object)}
    eager = _predictor(trained_bundle)(batch)
    compiled = _predictor(trained_bundle, compile=True, batch_size=32)
    out = compiled(batch)
    assert out.num_rows == n and out["path"].to_pylist() == batch["path"].tolist()
    agree = np.mean(np.array(out["label"].to_pylist()) == np.array(eager["label"].to_pylist()))
    assert agree >= 0.98, f"compiled and eager labels agree on {agree:.1%}"
    probs = lambda t: np.stack([t[c].to_numpy() for c in PROB_COLUMNS], axis=1)  # noqa: E731
    assert np.abs(probs(out) - probs(eager)).max() < 0.05
    assert compiled(dict(batch, path=batch["path"][:5], image=batch["image"][:5], error=batch["error"][:5])).num_rows == 5


def test_compile_failure_falls_back_to_the_eager_model(tiny_bundle, monkeypatch, caplog):
    """Where inductor cannot run (no C++ compiler on a node, say), compile=true must not fail the job."""
    def broken_compile(fn, **kwargs):
        def call(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level("WARNING", logger="ray_fer.infer"):
        predictor = _predictor(tiny_bundle, compile=True, batch_size=4)
    assert predictor.forward is None and "No working C++ compiler" in caplog.text
    eager = _predictor(tiny_bundle)(_batch(3, []))
    out = predictor(_batch(3, []))
    assert out["label"].to_pylist() == eager["label"].to_pylist()
