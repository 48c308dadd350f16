"""`ray-fer calibrate`: fit a model's confidence to what it gets right, and optionally move its
labels along the training prior, from evaluations it already has; write the result as a new bundle.

Two post-hoc adjustments of the logits z, both folded into the last linear layer's weights, so
the calibrated bundle is an ordinary bundle that every labelling path runs as it is:

    z' = (z + shift * log(prior)) / T

- `T`, the temperature (Guo et al. 2017), is fitted by minimising the negative log-likelihood of
  the evaluations' labels; it changes confidences (and the expected calibration error), never a label.
- `shift` moves labels along the training rows' class shares `prior` (post-hoc logit adjustment,
  Menon et al. 2021): negative values take a model trained with plain cross-entropy towards
  balanced classes; a model trained with `train.logit_adjust` tau has balanced logits already,
  and a positive shift (up to tau) gives back some of the training prior's frequent classes.
  It is chosen by the user from the table `calibrate` prints: one row per shift tried, each set's
  accuracy, macro-F1 and ECE after its own temperature fit.

The evaluations are `ray-fer evaluate` folders of this very model (metrics.json names its id):
their predictions.parquet holds each image's probabilities, and log(p) equals z up to a constant
per row, which neither adjustment sees. Images without a face stay misses; unreadable ones stay out.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ray_fer.config import UserError
from ray_fer.labels import CLASSES
from ray_fer.metrics import MISSED, classification_metrics, expected_calibration_error
from ray_fer.report import METRICS_FILE
from ray_fer.store import storage

log = logging.getLogger(__name__)

HEAD_WEIGHT, HEAD_BIAS = "classifier.1.weight", "classifier.1.bias"  # torchvision EfficientNet-B0's last Linear
DEFAULT_SHIFTS = (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)
T_RANGE = (0.05, 20.0)


@dataclass
class EvalSet:
    """One evaluation's labelled images: log-probabilities of the found ones, and the misses."""

    name: str  # the data folder's name
    data: str
    log_probs: np.ndarray  # (n, classes) float64, images that got a label
    y: np.ndarray  # (n,) int64 true class of those
    missed: np.ndarray  # (m,) int64 true class of images without a face


def load_eval_set(uri: str, model_id: str) -> EvalSet:
    """The labelled rows of the `ray-fer evaluate` folder `uri`, which must be of model `model_id`."""
    import pyarrow.parquet as pq

    from ray_fer.label.evaluate import PREDICTIONS_FILE, _largest_faces

    metrics_uri = storage.join(uri, METRICS_FILE)
    if not storage.exists(metrics_uri):
        raise UserError(f"{uri!r} holds no {METRICS_FILE}; pass folders that `ray-fer evaluate` wrote")
    metrics = json.loads(storage.read_bytes(metrics_uri))
    evaluated = metrics.get("model", {}).get("id")
    if evaluated != model_id:
        raise UserError(f"{uri!r} evaluates model {evaluated}, not {model_id}: evaluate this model on that data "
                        "first (ray-fer evaluate --model ... --data ...), then calibrate from that folder")
    if metrics.get("tta", "none") != "none":
        raise UserError(f"{uri!r} was evaluated with --tta {metrics['tta']}; calibrate from evaluations without "
                        "test-time augmentation, as labelling runs by default")
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(uri, PREDICTIONS_FILE))))
    if "box_w" in table.column_names:
        table = _largest_faces(table)
    table = table.filter(table["error"].is_null())
    truth = np.asarray(table["true_label"].to_pylist(), dtype=np.int64)
    has_label = np.asarray(table["label"].is_valid())
    probs = np.stack([table[f"prob_{c}"].to_numpy(zero_copy_only=False)[has_label] for c in CLASSES], axis=1)
    log_probs = np.log(np.clip(probs.astype(np.float64), 1e-12, None))
    data = str(metrics.get("data", uri))
    return EvalSet(name=storage.basename(data.rstrip("/")) or data, data=data, log_probs=log_probs,
                   y=truth[has_label], missed=truth[~has_label])


def adjust(log_probs: np.ndarray, log_prior: np.ndarray, shift: float, temperature: float) -> np.ndarray:
    """log-softmax of (z + shift * log_prior) / T, with z given up to a per-row constant."""
    z = (log_probs + shift * log_prior) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(log_probs: np.ndarray, y: np.ndarray) -> float:
    return float(-log_probs[np.arange(len(y)), y].mean())


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The T in T_RANGE minimising the NLL of softmax(z / T): golden-section search on log T
    (the NLL is convex in 1/T, so unimodal in log T)."""
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2

    def f(log_t: float) -> float:
        return nll(adjust(z, np.zeros(z.shape[1]), 0.0, math.exp(log_t)), y)

    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    return math.exp((lo + hi) / 2)


def set_metrics(s: EvalSet, log_probs: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class recall and ECE of one set's adjusted predictions (misses included)."""
    pred = log_probs.argmax(axis=1)
    y_true = np.concatenate([s.y, s.missed])
    y_pred = np.concatenate([pred, np.full(len(s.missed), MISSED)])
    m = classification_metrics(y_true.tolist(), y_pred.tolist())
    conf = np.exp(log_probs.max(axis=1))
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "recall": {c: v["recall"] for c, v in m["per_class"].items()},
            "ece": expected_calibration_error(conf.tolist(), (pred == s.y).tolist()),
            "nll": nll(log_probs, s.y)}


def sweep(sets: Sequence[EvalSet], log_prior: np.ndarray, shifts: Sequence[float]) -> list[dict[str, Any]]:
    """For each shift: one temperature fitted over all sets' labelled images pooled, and each set's
    figures with it."""
    rows = []
    z_all = np.concatenate([s.log_probs for s in sets])
    y_all = np.concatenate([s.y for s in sets])
    for shift in shifts:
        t = fit_temperature(z_all + shift * log_prior, y_all)
        rows.append({"shift": float(shift), "temperature": t,
                     "sets": {s.name: set_metrics(s, adjust(s.log_probs, log_prior, shift, t)) for s in sets}})
    return rows


def format_sweep(rows: list[dict[str, Any]], chosen: float) -> str:
    names = list(rows[0]["sets"])
    head = "| shift | T | " + " | ".join(f"{n}: acc / macro-F1 / ECE" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for r in rows:
        mark = " <-" if math.isclose(r["shift"], chosen) else ""
        cells = [f"{100 * m['accuracy']:.1f}% / {m['macro_f1']:.3f} / {m['ece']:.3f}" for m in r["sets"].values()]
        lines.append(f"| {r['shift']:+.2f}{mark} | {r['temperature']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_prior(bundle) -> np.ndarray:
    """log of the training rows' class shares: the bundle's own counts, else a listing of the
    folders its config names (extra folders counted data.extra_repeat times)."""
    counts = bundle.class_counts
    if counts is None:
        from ray_fer.label.datasets import DataError, list_image_folder

        data = bundle.config.get("data", {})
        try:
            total = np.zeros(len(CLASSES), dtype=np.int64)
            folders = [(data["train"], 1)] + [(f, int(data.get("extra_repeat", 1))) for f in data.get("extra_train") or []]
            for folder, repeat in folders:
                total += repeat * np.bincount(list_image_folder(folder)["label"].to_numpy(), minlength=len(CLASSES))
        except (KeyError, TypeError, DataError, OSError) as e:
            raise UserError(f"the model carries no training class counts and its training data could not be "
                            f"listed ({e}); calibrate where its data.train folders are readable") from None
        counts = total.tolist()
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return np.log(counts / counts.sum())


def calibrate_model(model: str, evaluations: Sequence[str], output: str, *, shift: float = 0.0,
                    shifts: Sequence[float] = DEFAULT_SHIFTS) -> dict[str, Any]:
    """Fit the temperature (and apply `shift`) from `evaluations` of `model`; write the bundle to `output`."""
    import dataclasses

    import torch

    from ray_fer.model import load_bundle, save_bundle
    from ray_fer.model_ref import resolve_model

    if not evaluations:
        raise UserError("pass at least one folder that `ray-fer evaluate` wrote for this model")
    if not -5 <= shift <= 5:
        raise UserError(f"--shift must be in [-5, 5], got {shift}")
    source = resolve_model(model)
    bundle, source_id = load_bundle(source)
    if bundle.calibration:
        c = bundle.calibration
        raise UserError(f"{source!r} is calibrated already (T {c.get('temperature')}, shift {c.get('shift')}); "
                        f"calibrate the model it was made from ({c.get('source_model_id')})")
    sets = [load_eval_set(e, source_id) for e in evaluations]
    if len({s.name for s in sets}) < len(sets):
        for i, s in enumerate(sets):
            s.name = f"{i + 1}:{s.name}"
    if sum(len(s.y) for s in sets) < 50:
        raise UserError(f"{sum(len(s.y) for s in sets)} labelled images are too few to fit a temperature (50 or more)")
    log_prior = training_prior(bundle)
    shifts = sorted(set(float(x) for x in shifts) | {float(shift)})
    before = {s.name: set_metrics(s, adjust(s.log_probs, log_prior, 0.0, 1.0)) for s in sets}
    rows = sweep(sets, log_prior, shifts)
    print(format_sweep(rows, shift), flush=True)
    row = next(r for r in rows if math.isclose(r["shift"], shift))
    t = row["temperature"]

    state = dict(bundle.state_dict)
    if HEAD_WEIGHT not in state or HEAD_BIAS not in state:
        raise UserError(f"{source!r} has no {HEAD_WEIGHT} / {HEAD_BIAS}: not an EfficientNet-B0 bundle")
    w, b = state[HEAD_WEIGHT], state[HEAD_BIAS]
    state[HEAD_WEIGHT] = (w.float() / t).to(w.dtype)
    state[HEAD_BIAS] = ((b.float() + shift * torch.from_numpy(log_prior).float()) / t).to(b.dtype)
    calibration = {"temperature": round(t, 6), "shift": shift,
                   "prior": [round(float(p), 6) for p in np.exp(log_prior)],
                   "fitted_on": [s.data for s in sets], "source_model_id": source_id,
                   "before": _brief(before), "after": _brief(row["sets"])}
    out = dataclasses.replace(bundle, state_dict=state, calibration=calibration)
    out_id = save_bundle(out, output)
    log.info("calibrated %s (T %.3f, shift %+.2f) -> %s", source, t, shift, output)
    return {"model": source, "model_id": source_id, "output": output, "output_model_id": out_id,
            "temperature": round(t, 6), "shift": shift, "before": _brief(before), "after": _brief(row["sets"])}


def _brief(per_set: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {n: {k: round(m[k], 4) for k in ("accuracy", "macro_f1", "ece")} for n, m in per_set.items()}
