"""metrics.py: classification metrics against hand-computed values, training history, compare."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import Y_PRED, Y_TRUE, _metrics_with_identity, _png_size
from ray_fer import metrics, report


def test_metrics_match_hand_computed_values():
    m = metrics.classification_metrics(Y_TRUE, Y_PRED)
    pc = m["per_class"]
    assert m["num_images"] == 12
    assert m["accuracy"] == pytest.approx(6 / 12)
    assert pc["angry"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 4, "predicted": 4, "missed": 0}
    assert pc["disgust"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "predicted": 2, "missed": 0}
    assert pc["fear"]["precision"] == pytest.approx(2 / 4)
    assert pc["fear"]["recall"] == pytest.approx(2 / 3)
    assert pc["fear"]["f1"] == pytest.approx(4 / 7)
    assert pc["happy"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1, "predicted": 1, "missed": 0}
    # no samples, one false positive: precision 0, recall and F1 undefined
    assert pc["neutral"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0, "predicted": 1, "missed": 0}
    # samples but never predicted: precision 0 (nothing right), recall 0, F1 0
    assert pc["sad"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2, "predicted": 0, "missed": 0}
    # neither samples nor predictions: all undefined
    assert pc["surprise"] == {"precision": None, "recall": None, "f1": None, "support": 0, "predicted": 0, "missed": 0}
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


def test_an_image_without_a_face_is_a_miss_for_its_class():
    # 4 happy (3 right, 1 without a face), 2 sad (1 right, 1 taken for happy)
    happy, sad = 3, 5
    m = metrics.classification_metrics([happy] * 4 + [sad] * 2, [happy] * 3 + [metrics.MISSED, sad, happy])
    assert m["num_images"] == 6 and m["num_missed"] == 1
    assert m["accuracy"] == pytest.approx(4 / 6)
    h = m["per_class"]["happy"]
    assert (h["support"], h["missed"], h["recall"], h["precision"]) == (4, 1, 0.75, 0.75)
    assert m["per_class"]["sad"]["recall"] == 0.5 and m["per_class"]["sad"]["missed"] == 0
    assert np.asarray(m["confusion_matrix"]).sum() == 5  # the matrix holds the labelled images only


def test_expected_calibration_error():
    assert metrics.expected_calibration_error([], []) is None
    # confident and right, or unsure and right half of the time: calibrated
    assert metrics.expected_calibration_error([1.0, 1.0, 0.5, 0.5], [True, True, True, False]) == pytest.approx(0.0)
    # 90% confident, right 60% of the time: a gap of 0.3
    assert metrics.expected_calibration_error([0.9] * 10, [True] * 6 + [False] * 4) == pytest.approx(0.3)
    # two bins, weighted by their share: (2 x |0.95 - 1| + 2 x |0.35 - 0|) / 4
    ece = metrics.expected_calibration_error([0.95, 0.95, 0.35, 0.35], [True, True, False, False])
    assert ece == pytest.approx((2 * 0.05 + 2 * 0.35) / 4)


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
