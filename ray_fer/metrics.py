"""Numbers from labels: accuracy, per-class precision / recall / F1, the confusion matrix,
a comparison of two evaluations, and the per-epoch history of a training run.

Conventions for classes that are absent (as in scikit-learn with zero_division=0 where defined):
- recall and F1 are None for a class with no samples; macro averages use only classes with samples;
- precision is 0.0 for a class that has samples but is never predicted, None when it has neither.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ray_fer.labels import CLASSES, NUM_CLASSES


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts (num_classes, num_classes) int64: rows are true classes, columns predicted ones."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    for name, arr in (("y_true", t), ("y_pred", p)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} holds class indices outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


MISSED = -1  # a y_pred value: the image got no label (no face was found in it); a miss for its class


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str] = CLASSES
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and per-class metrics of integer labels.

    A prediction of MISSED (an image in which no face was found) counts against accuracy and its
    class's recall, and is in no class's precision; each class's `missed` says how many."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    miss = p == MISSED
    missed = np.bincount(t[miss], minlength=len(classes)) if miss.any() else None
    return metrics_from_confusion(confusion_matrix(t[~miss], p[~miss], len(classes)), classes, missed=missed)


def metrics_from_confusion(cm: np.ndarray, classes: Sequence[str] = CLASSES,
                           missed: np.ndarray | None = None) -> dict[str, Any]:
    """The metrics dict of a confusion matrix (rows true, columns predicted) and the images of
    each class that got no label (`missed`); JSON-ready."""
    cm = np.asarray(cm, dtype=np.int64)
    assert cm.shape == (len(classes), len(classes)), cm.shape
    missed = np.zeros(len(classes), dtype=np.int64) if missed is None else np.asarray(missed, dtype=np.int64)
    tp = np.diag(cm)
    support = cm.sum(axis=1) + missed
    predicted = cm.sum(axis=0)
    n = int(cm.sum() + missed.sum())
    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(classes):
        recall = float(tp[i] / support[i]) if support[i] else None
        if predicted[i]:
            precision: float | None = float(tp[i] / predicted[i])
        else:
            precision = 0.0 if support[i] else None
        if recall is None:
            f1 = None
        else:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1,
                           "support": int(support[i]), "predicted": int(predicted[i]), "missed": int(missed[i])}
    present = [per_class[c] for c in classes if per_class[c]["support"] > 0]

    def macro(key: str) -> float | None:
        return float(np.mean([m[key] for m in present])) if present else None

    return {
        "num_images": n,
        "num_missed": int(missed.sum()),
        "accuracy": float(tp.sum() / n) if n else None,
        "macro_f1": macro("f1"),
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),  # = balanced accuracy
        "classes": list(classes),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = 15) -> float | None:
    """ECE: the mean gap between confidence and accuracy over `bins` equal-width confidence bins,
    weighted by the share of predictions in each (Guo et al. 2017); None without predictions."""
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != hit.shape:
        raise ValueError(f"confidence and correct differ in length: {conf.size} vs {hit.size}")
    if not conf.size:
        return None
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, weights=conf, minlength=bins) - np.bincount(which, weights=hit, minlength=bins))
    return float(gap.sum() / conf.size) if count.sum() else None


def top_confusions(metrics: dict[str, Any], k: int = 3) -> list[tuple[str, str, int, float]]:
    """The k largest off-diagonal counts as (true, predicted, count, share of the true class)."""
    cm = np.asarray(metrics["confusion_matrix"])
    classes = metrics["classes"]
    cells = [
        (classes[i], classes[j], int(cm[i, j]), float(cm[i, j] / cm[i].sum()))
        for i in range(len(classes)) for j in range(len(classes))
        if i != j and cm[i, j] > 0
    ]
    return sorted(cells, key=lambda c: (-c[2], -c[3]))[:k]



def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def compare_metrics(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """B minus A: overall and per-class recall and F1, plus warnings when they are not comparable."""
    warnings = []
    if a.get("data") != b.get("data") or a["num_images"] != b["num_images"]:
        warnings.append(f"different data: A has {a['num_images']:,} images from {a.get('data')}, "
                        f"B {b['num_images']:,} from {b.get('data')}")
    if a["classes"] != b["classes"]:
        warnings.append(f"different classes: {a['classes']} vs {b['classes']}")
    per_class = {}
    for name in [c for c in a["classes"] if c in b["per_class"]]:
        ma, mb = a["per_class"][name], b["per_class"][name]
        per_class[name] = {
            "support": [ma["support"], mb["support"]],
            "recall": [ma["recall"], mb["recall"]], "recall_delta": _delta(ma["recall"], mb["recall"]),
            "f1": [ma["f1"], mb["f1"]], "f1_delta": _delta(ma["f1"], mb["f1"]),
        }
    return {
        "accuracy": [a["accuracy"], b["accuracy"]], "accuracy_delta": _delta(a["accuracy"], b["accuracy"]),
        "macro_f1": [a["macro_f1"], b["macro_f1"]], "macro_f1_delta": _delta(a["macro_f1"], b["macro_f1"]),
        "per_class": per_class,
        "warnings": warnings,
    }



# --------------------------------------------------------------------------------------------
# Training history


def clean_history(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-epoch rows sorted by epoch; a repeated epoch (a restart redid it) keeps its last row."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for i, row in enumerate(history):
        epoch = row.get("epoch", i)
        by_epoch[int(epoch)] = dict(row, epoch=int(epoch))
    return [by_epoch[e] for e in sorted(by_epoch)]


def best_epoch_of(history: Sequence[dict[str, Any]], key: str = "val_loss", mode: str = "min") -> int | None:
    """The epoch with the best `key` (training ranks checkpoints by the lowest val_loss)."""
    scored = [(r[key], r["epoch"]) for r in clean_history(history) if not math.isnan(as_float(r.get(key)))]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored)[1]



def as_float(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan

