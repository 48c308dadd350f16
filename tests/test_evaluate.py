"""Evaluation: metrics against hand-computed values, pictures, reports, compare, run reports, TTA, CLI."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ray_fer import cli, storage
from ray_fer import evaluate as ev
from ray_fer import metrics, predict, report
from ray_fer.images import EvalPreset, tta_views
from ray_fer.labels import CLASSES
from ray_fer.model import ModelBundle, build_model, save_bundle

# A small known set: angry 4, disgust 2, fear 3, happy 1, neutral 0 (but predicted once), sad 2 (never
# predicted), surprise 0 (never predicted).
Y_TRUE = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 5, 5]
Y_PRED = [0, 0, 1, 2, 1, 0, 2, 2, 4, 3, 0, 2]


# --------------------------------------------------------------------------------------------
# Metrics


def test_metrics_match_hand_computed_values():
    m = metrics.classification_metrics(Y_TRUE, Y_PRED)
    pc = m["per_class"]
    assert m["num_images"] == 12
    assert m["accuracy"] == pytest.approx(6 / 12)
    assert pc["angry"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 4, "predicted": 4}
    assert pc["disgust"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "predicted": 2}
    assert pc["fear"]["precision"] == pytest.approx(2 / 4)
    assert pc["fear"]["recall"] == pytest.approx(2 / 3)
    assert pc["fear"]["f1"] == pytest.approx(4 / 7)
    assert pc["happy"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1, "predicted": 1}
    # no samples, one false positive: precision 0, recall and F1 undefined
    assert pc["neutral"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0, "predicted": 1}
    # samples but never predicted: precision 0 (nothing right), recall 0, F1 0
    assert pc["sad"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2, "predicted": 0}
    # neither samples nor predictions: all undefined
    assert pc["surprise"] == {"precision": None, "recall": None, "f1": None, "support": 0, "predicted": 0}
    # macro averages over the five classes with samples
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 4 / 7 + 1.0 + 0.0) / 5)
    assert m["macro_precision"] == pytest.approx((0.5 + 0.5 + 0.5 + 1.0 + 0.0) / 5)
    assert m["macro_recall"] == pytest.approx((0.5 + 0.5 + 2 / 3 + 1.0 + 0.0) / 5)
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() == 12
    assert cm[0].tolist() == [2, 1, 1, 0, 0, 0, 0]
    assert cm[5].tolist() == [1, 0, 1, 0, 0, 0, 0]
    assert cm[:, 4].tolist() == [0, 0, 1, 0, 0, 0, 0]
    json.dumps(m)  # JSON-ready: plain ints, floats and None


def test_metrics_edge_cases():
    perfect = metrics.classification_metrics([0, 1, 2], [0, 1, 2])
    assert perfect["accuracy"] == 1.0 and perfect["macro_f1"] == 1.0
    empty = metrics.classification_metrics([], [])
    assert empty["num_images"] == 0 and empty["accuracy"] is None and empty["macro_f1"] is None
    with pytest.raises(ValueError, match="outside"):
        metrics.confusion_matrix([0, 7], [0, 1])
    with pytest.raises(ValueError, match="length"):
        metrics.confusion_matrix([0, 1], [0])


# --------------------------------------------------------------------------------------------
# Pictures and reports


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def _metrics_with_identity() -> dict:
    m = metrics.classification_metrics(Y_TRUE, Y_PRED)
    m.update(model={"uri": "runs/x/model.pt", "id": "0123456789abcdef", "image_size": 64},
             data="/data/val", tta="flip", num_errors=1)
    return m


def test_evaluation_outputs_agree(tmp_path):
    m = _metrics_with_identity()
    paths = report.write_evaluation(str(tmp_path), m)
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    w, h = _png_size((tmp_path / "confusion_matrix.png").read_bytes())
    assert 800 <= w <= 2500 and 700 <= h <= 2500
    text = (tmp_path / "report.md").read_text()
    assert "0123456789abcdef" in text and "flip" in text and "confusion_matrix.png" in text
    assert f"accuracy {m['accuracy']:.2%}" in text and f"macro-F1 {m['macro_f1']:.3f}" in text
    # every per-class row of the table equals metrics.json at the printed precision
    for name in CLASSES:
        row = re.search(rf"^\| {name} \| (.+) \|$", text, re.M).group(1).split(" | ")
        want = m["per_class"][name]
        for cell, key in zip(row, ("precision", "recall", "f1")):
            assert cell == ("–" if want[key] is None else f"{want[key]:.3f}"), (name, key)
        assert int(row[3].replace(",", "")) == want["support"]
        assert int(row[4].replace(",", "")) == want["predicted"]
    assert set(paths) == {"metrics", "confusion_matrix", "report"}


def test_training_report_local_and_s3(tmp_path, s3_bucket):
    history = [
        {"epoch": e, "train_loss": 2.0 - 0.2 * e, "val_loss": 1.9 - 0.15 * e + 0.05 * max(0, e - 3) ** 2,
         "train_acc": 0.2 + 0.1 * e, "val_acc": 0.2 + 0.08 * e, "lr": 1e-3}
        for e in range(1, 7)
    ]
    assert metrics.best_epoch_of(history) == 4  # lowest val_loss
    for run_dir in (str(tmp_path / "run"), f"s3://{s3_bucket}/runs/fer"):
        paths = report.write_training_report(run_dir, history)
        w, h = _png_size(storage.read_bytes(paths["curves"]))
        assert w >= 1000 and h >= 400
        lines = storage.read_bytes(paths["metrics_csv"]).decode().splitlines()
        assert lines[0] == "epoch,train_loss,val_loss,train_acc,val_acc,lr"
        assert len(lines) == 7
        assert float(lines[4].split(",")[2]) == pytest.approx(history[3]["val_loss"])


def test_history_keeps_the_last_row_of_a_repeated_epoch():
    rows = metrics.clean_history([{"epoch": 1, "val_loss": 2.0}, {"epoch": 2, "val_loss": 1.0},
                             {"epoch": 2, "val_loss": 1.5}])
    assert [r["val_loss"] for r in rows] == [2.0, 1.5]
    # one epoch, or no validation metrics, still draws
    _png_size(report.plot_training_curves([{"epoch": 1, "train_loss": 1.9}], best_epoch=None))


def test_compare(tmp_path):
    a = _metrics_with_identity()
    b = metrics.classification_metrics(Y_TRUE, Y_TRUE)
    b.update(model={"id": "fedcba9876543210"}, data="/data/val", tta="tencrop")
    cmp = metrics.compare_metrics(a, b)
    assert cmp["accuracy_delta"] == pytest.approx(0.5)
    assert cmp["per_class"]["sad"]["recall_delta"] == pytest.approx(1.0)
    assert cmp["per_class"]["neutral"]["f1_delta"] is None
    assert cmp["warnings"] == []
    text = report.format_comparison(a, b, cmp)
    assert "| sad | 2 | 0.000 | 1.000 | +1.000 |" in text
    b["data"] = "/other"
    assert "different data" in metrics.compare_metrics(a, b)["warnings"][0]


# --------------------------------------------------------------------------------------------
# Runs and models on disk


def _small_bundle(seed: int = 0) -> ModelBundle:
    """An EfficientNet-B0 bundle whose predictions depend on the image, built in seconds.

    A freshly initialised network in eval mode maps every image to nearly the same features
    (BatchNorm's running statistics are 0 and 1); calibrating them on a few random batches and
    drawing a random head makes the outputs differ from image to image, as a trained model's do.
    """
    torch.manual_seed(seed)
    model = build_model("none")
    preset = EvalPreset(image_size=48, channels_last=False)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of exactly these batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(preset(torch.randint(0, 256, (32, 48, 48), dtype=torch.uint8)))
        model.classifier[1].weight.normal_(0.0, 0.3)
        model.classifier[1].bias.zero_()
    history = [{"epoch": 1, "train_loss": 1.9, "val_loss": 1.8, "train_acc": 0.3, "val_acc": 0.32},
               {"epoch": 2, "train_loss": 1.7, "val_loss": 1.75, "train_acc": 0.36, "val_acc": 0.35}]
    return ModelBundle(state_dict=model.state_dict(), image_size=48, decode_size=48,
                       metrics=history[1], history=history)


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("run") / "model.pt"
    save_bundle(_small_bundle(), str(path))
    return str(path)


def test_report_run_from_bundle_and_from_checkpoint(tmp_path, bundle_path):
    summary = report.report_run(str(Path(bundle_path).parent))
    assert summary["best_epoch"] == 2 and summary["epochs"] == 2
    # a run still going: no model.pt yet, the latest checkpoint's state holds the history
    run = tmp_path / "fer"
    for name, epochs in (("checkpoint_2026-01-01_10-00-00.000000", 1), ("checkpoint_2026-01-01_10-05-00.000000", 3)):
        (run / name).mkdir(parents=True)
        hist = [{"epoch": e, "val_loss": [1.8, 1.6, 1.7][e - 1], "val_acc": 0.3} for e in range(1, epochs + 1)]
        torch.save({"history": hist, "epoch": epochs}, run / name / "state.pt")
    summary = report.report_run(str(run))
    assert summary["epochs"] == 3 and summary["best_epoch"] == 2
    assert (run / "curves.png").is_file() and (run / "metrics.csv").is_file()


# --------------------------------------------------------------------------------------------
# Test-time augmentation


def test_tta_views_are_flips_and_crops():
    x = torch.randint(0, 256, (2, 48, 48), dtype=torch.uint8)
    assert len(tta_views(x, "none")) == 1
    plain, mirror = tta_views(x, "flip")
    assert torch.equal(mirror, torch.from_numpy(np.ascontiguousarray(x.numpy()[:, :, ::-1])))
    views = tta_views(x, "tencrop")
    assert len(views) == 10 and all(v.shape == (2, 43, 43) for v in views)
    assert torch.equal(views[0], x[:, :43, :43]) and torch.equal(views[3], x[:, 5:, 5:])
    assert torch.equal(views[4], x[:, 2:45, 2:45])
    assert torch.equal(views[5], torch.flip(views[0], dims=(-1,)))
    with pytest.raises(ValueError, match="choose one of"):
        tta_views(x, "fivecrop")


@pytest.fixture(scope="module")
def small_model(bundle_path):
    from ray_fer.model import load_bundle

    bundle, _ = load_bundle(bundle_path)
    return bundle.build_model(), bundle.eval_preset(channels_last=False)


def test_tta_equals_averaging_hand_made_views(small_model):
    from ray_fer.predictor import predict_probs

    net, preset = small_model
    x = torch.randint(0, 256, (6, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def probs(pixels):
        with torch.no_grad():
            return torch.softmax(net(preset(pixels)), dim=1)

    plain = predict_probs(net, preset, x, tta="none")
    assert plain.std(dim=0).max() > 1e-3, "the test model must tell images apart"
    by_hand = (probs(x) + probs(torch.from_numpy(np.ascontiguousarray(x.numpy()[:, :, ::-1])))) / 2
    assert torch.allclose(predict_probs(net, preset, x, tta="flip"), by_hand, atol=1e-6)
    crops = [x[:, r:r + 43, c:c + 43] for r, c in ((0, 0), (0, 5), (5, 0), (5, 5), (2, 2))]
    crops += [torch.from_numpy(np.ascontiguousarray(c.numpy()[:, :, ::-1])) for c in crops]
    by_hand = torch.stack([probs(c) for c in crops]).mean(dim=0)
    assert torch.allclose(predict_probs(net, preset, x, tta="tencrop"), by_hand, atol=1e-6)


def test_predict_files(fer_root, bundle_path, small_model, tmp_path):
    from ray_fer.decode import decode_image
    from ray_fer.predictor import predict_probs

    files = sorted(str(p) for p in (fer_root / "val" / "fear").glob("*.jpg"))[:3]
    (tmp_path / "notes.jpg").write_text("not an image")
    result = predict.predict_files(bundle_path, [*files, str(tmp_path / "notes.jpg")], tta="flip", top=2)
    rows = result["predictions"]
    assert [r["path"] for r in rows] == [*files, str(tmp_path / "notes.jpg")]
    assert "error" in rows[3] and "label" not in rows[3]
    net, preset = small_model
    pixels = torch.from_numpy(np.stack([decode_image(open(f, "rb").read(), 48)[0] for f in files]))
    want = predict_probs(net, preset, pixels, tta="flip")
    for row, p in zip(rows, want):
        assert row["label"] == CLASSES[int(p.argmax())]
        assert [name for name, _ in row["top"]] == [CLASSES[i] for i in torch.argsort(p, descending=True)[:2]]
        assert row["confidence"] == pytest.approx(float(p.max()), abs=1e-4)
    table = predict.format_predictions(result)
    assert "error: " in table and rows[0]["label"] in table.splitlines()[1]


# --------------------------------------------------------------------------------------------
# End to end on a local Ray instance


def _read_predictions(uri: str) -> dict[str, dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    return {Path(r["path"]).stem: r for r in table.to_pylist()}


@pytest.mark.integration
def test_evaluate_fer_val_subset_end_to_end(ray_local, fer_root, bundle_path, tmp_path, s3_bucket):
    from ray_fer.data import list_image_folder
    from ray_fer.decode import decode_image

    val = str(fer_root / "val")
    plain = ev.evaluate_folder(bundle_path, val, output=str(tmp_path / "none"), precision="fp32", limit_per_class=3)
    assert plain["images"] == 21 and plain["errors"] == 0
    metrics = json.loads((tmp_path / "none" / "metrics.json").read_text())
    assert metrics["num_images"] == 21 and metrics["tta"] == "none" and metrics["model"]["id"] == plain["model"]
    assert plain["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert all(metrics["per_class"][c]["support"] == 3 for c in CLASSES)
    # metrics.json says what predictions.parquet says
    rows = _read_predictions(plain["predictions"])
    assert sum(r["label"] == CLASSES[r["true_label"]] for r in rows.values()) == round(metrics["accuracy"] * 21)
    w, h = _png_size((tmp_path / "none" / "confusion_matrix.png").read_bytes())
    assert w >= 800 and h >= 700
    assert f"accuracy {metrics['accuracy']:.2%}" in (tmp_path / "none" / "report.md").read_text()

    # flip TTA through Ray Data == the mean of the plain run and a run over the same faces flipped by hand
    flipped = tmp_path / "flipped"
    for path, label in zip(*list_image_folder(val, limit_per_class=3).to_pydict().values()):
        pixels = decode_image(open(path, "rb").read(), 48)[0]
        (flipped / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(pixels[:, ::-1])).save(flipped / CLASSES[label] / f"{Path(path).stem}.png")
    (flipped / "angry" / "broken.png").write_bytes(b"\x89PNG truncated")  # counted, not fatal
    mirror = ev.evaluate_folder(bundle_path, str(flipped), output=str(tmp_path / "mirror"), precision="fp32")
    assert mirror["images"] == 21 and mirror["errors"] == 1
    tta = ev.evaluate_folder(bundle_path, val, output=f"s3://{s3_bucket}/eval/flip", tta="flip",
                             precision="fp32", limit_per_class=3)
    assert tta["report"] == f"s3://{s3_bucket}/eval/flip/report.md" and storage.exists(tta["confusion_matrix"])
    mirror_rows, tta_rows = _read_predictions(mirror["predictions"]), _read_predictions(tta["predictions"])
    assert mirror_rows.pop("broken")["error"]
    assert set(tta_rows) == set(rows) == set(mirror_rows)
    for key, row in tta_rows.items():
        for c in CLASSES:
            want = (rows[key][f"prob_{c}"] + mirror_rows[key][f"prob_{c}"]) / 2
            assert row[f"prob_{c}"] == pytest.approx(want, abs=1e-5), (key, c)


def test_default_output_sits_beside_the_model(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert ev._default_output("model.pt", ".", "none") == str(tmp_path / "eval" / f"{tmp_path.name}-none")
    assert ev._default_output("runs/fer/model.pt", "data/val/", "flip") == str(tmp_path / "runs/fer/eval/val-flip")
    assert ev._default_output("s3://b/runs/fer/model.pt", "s3://b/fer/val/", "tencrop") == "s3://b/runs/fer/eval/val-tencrop"


# --------------------------------------------------------------------------------------------
# CLI


def _run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_compare_and_report(tmp_path, capsys, bundle_path):
    a, b = tmp_path / "a", tmp_path / "b"
    report.write_evaluation(str(a), _metrics_with_identity())
    report.write_evaluation(str(b), _metrics_with_identity())
    code, out, _ = _run_cli(["compare", str(a / "metrics.json"), str(b)], capsys)
    assert code == 0 and "| angry |" in out
    assert json.loads(out.strip().splitlines()[-1])["accuracy_delta"] == 0.0
    run = str(Path(bundle_path).parent)
    code, out, _ = _run_cli(["report", run], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["curves"].endswith("curves.png")


@pytest.mark.parametrize("argv, message", [
    (["compare", "/nope/metrics.json", "/nope/b.json"], "cannot read '/nope/metrics.json'"),
    (["report", "/nope/run"], "run folder '/nope/run' does not exist"),
    (["predict", "--model", "/nope/model.pt", "/nope/a.jpg"], "no such image file: /nope/a.jpg"),
    (["predict", "--model", "/nope/model.pt", "/tmp"], "/tmp is a folder; pass image files"),
    (["evaluate", "--model", "/nope/model.pt", "--data", "/nope/val", "--tta", "flipp"], "unknown --tta 'flipp'"),
    (["evaluate", "--model", "/nope/model.pt", "--data", "/nope/val"], "model '/nope/model.pt' does not exist"),
])
def test_cli_user_errors_are_one_line(argv, message, capsys):
    code, out, err = _run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
