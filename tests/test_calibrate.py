"""calibrate.py: the temperature fit, the shift along the training prior, and the calibrated bundle
(the adjustment folded into the head) labelling as the adjusted probabilities say, from a real
evaluation of the packaged model on FER2013 val faces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_fer.config import UserError
from ray_fer.label import calibrate as cal
from ray_fer.label import evaluate as ev
from ray_fer.label.predictor import predict_probs
from ray_fer.model import load_bundle
from ray_fer.model_ref import resolve_model
from ray_fer.label.decode import decode_image


def _evaluated_faces(predictions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels and true labels of the faces an evaluation saw, from its predictions.parquet."""
    import pyarrow.parquet as pq

    rows = pq.read_table(predictions).to_pylist()
    pixels = [decode_image(open(r["path"], "rb").read(), 48)[0] for r in rows]
    return torch.from_numpy(np.stack(pixels)), torch.tensor([r["true_label"] for r in rows])


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, size=(20_000, 7))
    for t_true in (0.5, 1.0, 2.5):
        p = np.exp(cal.adjust(z, np.zeros(7), 0.0, t_true))
        y = np.array([rng.choice(7, p=row) for row in p])
        assert cal.fit_temperature(z, y) == pytest.approx(t_true, rel=0.05)


def test_shift_moves_labels_along_the_prior():
    log_prior = np.log(np.array([0.5, 0.3, 0.2]))
    z = np.zeros((1, 3))  # undecided: the shift alone decides
    assert cal.adjust(z, log_prior, 1.0, 1.0).argmax() == 0  # towards the frequent class
    assert cal.adjust(z, log_prior, -1.0, 1.0).argmax() == 2  # towards the rare one
    out = cal.adjust(log_prior[None, :], log_prior, -1.0, 1.0)  # the prior itself, adjusted away: uniform
    assert np.exp(out).sum() == pytest.approx(1.0) and np.exp(out[0]) == pytest.approx([1 / 3, 1 / 3, 1 / 3])


@pytest.mark.integration
def test_calibrated_bundle_labels_as_the_adjusted_probabilities(ray_local, fer_root, tiny_bundle, tmp_path, capsys):
    val = str(fer_root / "val")
    evaluation = ev.evaluate_folder("fer2013", val, output=str(tmp_path / "val"), precision="fp32",
                                    limit_per_class=10)
    out = tmp_path / "calibrated.pt"
    summary = cal.calibrate_model("fer2013", [str(tmp_path / "val")], str(out), shift=-0.5)
    table = capsys.readouterr().out
    assert "| -0.50 <- |" in table and "val: acc / macro-F1 / ECE" in table  # the sweep, the chosen row marked
    t = summary["temperature"]
    assert 0.05 < t < 20 and summary["output_model_id"] != evaluation["model"]

    original, _ = load_bundle(resolve_model("fer2013"))
    calibrated, _ = load_bundle(str(out))
    assert calibrated.calibration["shift"] == -0.5 and calibrated.calibration["temperature"] == pytest.approx(t)
    assert calibrated.class_counts is None and sum(calibrated.calibration["prior"]) == pytest.approx(1, abs=1e-4)
    # the calibrated model's probabilities are softmax((z - 0.5 log prior) / T) of the original's logits
    x, y = _evaluated_faces(evaluation["predictions"])
    log_prior = torch.log(torch.tensor(calibrated.calibration["prior"], dtype=torch.float64))
    with torch.inference_mode():
        p0 = predict_probs(original.build_model(), original.eval_preset(channels_last=False), x).double()
        p1 = predict_probs(calibrated.build_model(), calibrated.eval_preset(channels_last=False), x).double()
    expected = torch.softmax((torch.log(p0) - 0.5 * log_prior) / t, dim=1)
    assert torch.allclose(p1, expected, atol=2e-3)
    # its figures on the set are the ones the summary reports
    acc = float((p1.argmax(1) == y).float().mean())
    assert acc == pytest.approx(summary["after"]["val"]["accuracy"], abs=1.5 / len(y))
    assert summary["before"]["val"]["accuracy"] == pytest.approx(evaluation["accuracy"], abs=1e-3)
    # a fitted temperature never raises the set's negative log-likelihood over T = 1
    nll_t1 = float(torch.nn.functional.nll_loss(torch.log(torch.softmax(torch.log(p0) - 0.5 * log_prior, 1)), y))
    assert float(torch.nn.functional.nll_loss(torch.log(p1), y)) <= nll_t1 + 1e-3

    # refused: another model's evaluation, and calibrating twice
    with pytest.raises(UserError, match="evaluates model .* not "):
        cal.calibrate_model(tiny_bundle, [str(tmp_path / "val")], str(tmp_path / "other.pt"))
    with pytest.raises(UserError, match="calibrated already"):
        cal.calibrate_model(str(out), [str(tmp_path / "val")], str(tmp_path / "again.pt"))
