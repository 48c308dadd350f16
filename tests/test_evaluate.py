"""evaluate.py: a labelled folder end to end on a local Ray instance (plain and with TTA), the default
output folder, and the one-line errors of the evaluation commands."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import _png_size, _run_cli
from ray_fer.label import evaluate as ev
from ray_fer.store import storage
from ray_fer.labels import CLASSES


# --------------------------------------------------------------------------------------------
# End to end on a local Ray instance


def _read_predictions(uri: str) -> dict[str, dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    return {Path(r["path"]).stem: r for r in table.to_pylist()}


@pytest.mark.integration
def test_evaluate_fer_val_subset_end_to_end(ray_local, fer_root, bundle_path, tmp_path, s3_bucket):
    from ray_fer.label.datasets import list_image_folder
    from ray_fer.label.decode import decode_image

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
    # a photo (bigger than a face crop) in which no face is found: a miss for its class, not left out
    Image.fromarray(np.tile(np.linspace(0, 255, 200, dtype=np.uint8), (200, 1))).save(flipped / "sad" / "blank.png")
    mirror = ev.evaluate_folder(bundle_path, str(flipped), output=str(tmp_path / "mirror"), precision="fp32")
    assert mirror["images"] == 22 and mirror["errors"] == 1 and mirror["no_face"] == 1
    mirror_metrics = json.loads((tmp_path / "mirror" / "metrics.json").read_text())
    sad = mirror_metrics["per_class"]["sad"]
    assert (sad["support"], sad["missed"], mirror_metrics["num_missed"]) == (4, 1, 1)
    assert sad["recall"] <= 0.75 and 0 <= mirror["ece"] <= 1
    assert "not found in 1 " in (tmp_path / "mirror" / "report.md").read_text()
    tta = ev.evaluate_folder(bundle_path, val, output=f"s3://{s3_bucket}/eval/flip", tta="flip",
                             precision="fp32", limit_per_class=3)
    assert tta["report"] == f"s3://{s3_bucket}/eval/flip/report.md" and storage.exists(tta["confusion_matrix"])
    mirror_rows, tta_rows = _read_predictions(mirror["predictions"]), _read_predictions(tta["predictions"])
    assert mirror_rows.pop("broken")["error"]
    assert mirror_rows.pop("blank")["label"] is None
    assert set(tta_rows) == set(rows) == set(mirror_rows)
    for key, row in tta_rows.items():
        for c in CLASSES:
            want = (rows[key][f"prob_{c}"] + mirror_rows[key][f"prob_{c}"]) / 2
            assert row[f"prob_{c}"] == pytest.approx(want, abs=1e-5), (key, c)


def test_default_output_sits_beside_the_model(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert ev._default_output("model.pt", "model.pt", ".", "none") == str(tmp_path / "eval" / f"{tmp_path.name}-none")
    assert (ev._default_output("runs/fer", "runs/fer/model.pt", "data/val/", "flip")
            == str(tmp_path / "runs/fer/eval/val-flip"))
    assert (ev._default_output("s3://b/runs/fer/model.pt", "s3://b/runs/fer/model.pt", "s3://b/fer/val/", "tencrop")
            == "s3://b/runs/fer/eval/val-tencrop")
    # a packaged model's evaluations go to ./eval/<name>/, never into the installed package
    packaged = "/site-packages/ray_fer/models/fer2013.pt"
    assert ev._default_output("fer2013", packaged, "data/val", "none") == str(tmp_path / "eval/fer2013/val-none")


# --------------------------------------------------------------------------------------------
# CLI


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


def test_an_images_largest_face_stands_for_it():
    import pyarrow as pa

    rows = pa.table({"path": ["/a", "/b", "/a", "/c", "/a"], "box_w": [10.0, None, 30.0, 5.0, 20.0],
                     "box_h": [10.0, None, 30.0, 5.0, 20.0], "label": ["sad", None, "happy", "fear", "angry"]})
    chosen = ev._largest_faces(rows)
    assert chosen["path"].to_pylist() == ["/a", "/b", "/c"]
    assert chosen["label"].to_pylist() == ["happy", None, "fear"]

