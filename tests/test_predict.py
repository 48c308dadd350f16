"""predict.py: labelling a few image files in this process, and the table it prints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_fer import predict
from ray_fer.labels import CLASSES


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
