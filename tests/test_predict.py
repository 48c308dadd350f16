"""predict.py: labelling a few image files in this process, and the table it prints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ray_fer.label import predict
from ray_fer.labels import CLASSES


def test_predict_files(fer_root, bundle_path, small_model, tmp_path):
    from ray_fer.label.decode import decode_image
    from ray_fer.label.predictor import predict_probs

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


def test_predict_faces_and_annotate(photos_root, bundle_path, tmp_path):
    photo = photos_root / "two_people.jpg"
    noise = tmp_path / "noise.jpg"
    Image.effect_noise((320, 240), 40).convert("RGB").save(noise)
    folder = tmp_path / "annotated"
    result = predict.predict_files(bundle_path, [str(photo), str(noise)], faces="detect", annotate=str(folder))
    rows = result["predictions"]
    faces = [r for r in rows if r["path"] == str(photo)]
    assert [r["face"] for r in faces] == [0, 1] and all(r["label"] in CLASSES and r["face_score"] > 0.95 for r in faces)
    assert [r for r in rows if r["path"] == str(noise)] == [{"path": str(noise), "face": None}]
    assert result["annotated"] == [str(folder / "two_people.jpg"), str(folder / "noise.jpg")]

    original = np.asarray(ImageOps.exif_transpose(Image.open(photo)).convert("RGB")).astype(int)
    drawn = np.asarray(Image.open(folder / "two_people.jpg").convert("RGB")).astype(int)
    assert drawn.shape == original.shape
    changed = np.abs(drawn - original).sum(axis=2) > 60  # more than JPEG's own noise
    for r in faces:  # each box's left edge is drawn where the face is; the face itself is untouched
        x, y, w, h = (round(v) for v in r["box"])
        assert changed[y + h // 4:y + 3 * h // 4, max(0, x - 1):x + 2].mean() > 0.8
        assert changed[y + h // 3:y + 2 * h // 3, x + w // 3:x + 2 * w // 3].mean() < 0.05
    outside = np.ones(changed.shape, dtype=bool)
    for r in faces:
        x, y, w, h = (round(v) for v in r["box"])
        outside[max(0, y - h // 2):y + h + 10, max(0, x - 10):x + w + 200] = False  # box and label
    assert changed[outside].mean() < 0.01
    table = predict.format_predictions(result)
    assert f"{photo} #1" in table and "no face found" in table

