"""report.py: the evaluation outputs (metrics.json, confusion matrix, report.md), training reports,
run reports, and the `compare` and `report` commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import Y_TRUE, Y_PRED, _metrics_with_identity, _png_size, _run_cli
from ray_fer import metrics, report
from ray_fer.store import storage
from ray_fer.labels import CLASSES
from ray_fer.train.runs import report_run


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


def test_report_run_from_bundle_and_from_checkpoint(tmp_path, bundle_path):
    summary = report_run(str(Path(bundle_path).parent))
    assert summary["best_epoch"] == 2 and summary["epochs"] == 2
    # a run still going: no model.pt yet, the latest checkpoint's state holds the history
    run = tmp_path / "fer"
    for name, epochs in (("checkpoint_2026-01-01_10-00-00.000000", 1), ("checkpoint_2026-01-01_10-05-00.000000", 3)):
        (run / name).mkdir(parents=True)
        hist = [{"epoch": e, "val_loss": [1.8, 1.6, 1.7][e - 1], "val_acc": 0.3} for e in range(1, epochs + 1)]
        torch.save({"history": hist, "epoch": epochs}, run / name / "state.pt")
    summary = report_run(str(run))
    assert summary["epochs"] == 3 and summary["best_epoch"] == 2
    assert (run / "curves.png").is_file() and (run / "metrics.csv").is_file()


# --------------------------------------------------------------------------------------------
# CLI


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


def test_cli_compare_two_models_on_several_sets(tmp_path, capsys):
    """Folders of evaluations (as <model>/eval/ collects them) are paired by data set and settings."""
    from ray_fer import metrics

    def evaluation(model_id: str, data: str, y_pred: list[int], faces: str | None = None) -> dict:
        m = metrics.classification_metrics(Y_TRUE, y_pred)
        m.update(model={"id": model_id}, data=data, tta="none", ece=0.1)
        if faces:
            m.update(faces=faces, num_no_face=sum(p == metrics.MISSED for p in y_pred))
        return m

    right = list(Y_TRUE)
    missed = [metrics.MISSED] * 2 + Y_TRUE[2:]
    for model, preds in (("aaaa", Y_PRED), ("bbbb", right)):
        report.write_evaluation(str(tmp_path / model / "eval" / "val-none"), evaluation(model, "/d/val", preds))
        report.write_evaluation(str(tmp_path / model / "eval" / "dev-none"),
                                evaluation(model, "/d/dev", missed if model == "bbbb" else Y_PRED, faces="detect"))
    report.write_evaluation(str(tmp_path / "aaaa" / "eval" / "other-none"), evaluation("aaaa", "/d/other", Y_PRED))
    code, out, _ = _run_cli(["compare", str(tmp_path / "aaaa" / "eval"), str(tmp_path / "bbbb" / "eval")], capsys)
    assert code == 0
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) == {"data", "val", "dev"}  # the set only A has is left out
    assert "| 0.500 | 1.000 | +0.500 |" in rows["val"]
    assert rows["dev"].rstrip().endswith("| 0 | 2 |")  # images without a face, A and B
    sets = json.loads(out.strip().splitlines()[-1])["sets"]
    assert [s["data"] for s in sets] == ["/d/dev", "/d/val"] and sets[0]["faces"] == "detect"
    assert sets[0]["accuracy_delta"] == pytest.approx(10 / 12 - 6 / 12)

