"""Evaluation: accuracy and per-class metrics, the confusion matrix, training curves, reports.

Numbers first, pictures second: `classification_metrics` turns labels into a plain dict (the
content of metrics.json), the `plot_*` functions turn numbers into PNG bytes, and the `write_*`
functions put both into a local folder or an s3:// prefix through `storage`.

Conventions for classes that are absent (as in scikit-learn with zero_division=0 where defined):
- recall and F1 are None for a class with no samples; macro averages use only classes with samples;
- precision is 0.0 for a class that has samples but is never predicted, None when it has neither.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from typing import Any, Sequence

import numpy as np

from ray_fer import storage
from ray_fer.config import UserError
from ray_fer.images import TTA_MODES
from ray_fer.labels import CLASSES, NUM_CLASSES

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion_matrix.png"
REPORT_FILE = "report.md"
CURVES_FILE = "curves.png"
HISTORY_CSV = "metrics.csv"
PREDICTIONS_FILE = "predictions.parquet"


# --------------------------------------------------------------------------------------------
# Metrics


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


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str] = CLASSES
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and per-class metrics of integer labels."""
    return metrics_from_confusion(confusion_matrix(y_true, y_pred, len(classes)), classes)


def metrics_from_confusion(cm: np.ndarray, classes: Sequence[str] = CLASSES) -> dict[str, Any]:
    """The metrics dict of a confusion matrix (rows true, columns predicted); JSON-ready."""
    cm = np.asarray(cm, dtype=np.int64)
    assert cm.shape == (len(classes), len(classes)), cm.shape
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    n = int(cm.sum())
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
                           "support": int(support[i]), "predicted": int(predicted[i])}
    present = [per_class[c] for c in classes if per_class[c]["support"] > 0]

    def macro(key: str) -> float | None:
        return float(np.mean([m[key] for m in present])) if present else None

    return {
        "num_images": n,
        "accuracy": float(tp.sum() / n) if n else None,
        "macro_f1": macro("f1"),
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),  # = balanced accuracy
        "classes": list(classes),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


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


# --------------------------------------------------------------------------------------------
# Pictures (matplotlib's Agg canvas per figure: no pyplot, no global backend switch)


def _new_figure(figsize: tuple[float, float], dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # headless: renders to PNG without a display or pyplot's global state
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str] = CLASSES, *, title: str = "") -> bytes:
    """PNG of the confusion matrix, coloured by share of each true class, counts annotated."""
    import matplotlib
    from matplotlib.ticker import PercentFormatter

    cm = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = cm / support[:, None]  # NaN rows for classes without samples: drawn grey
    fig = _new_figure((1.05 * k + 1.9, 0.9 * k + 1.6), 150)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.9")
    im = ax.imshow(np.ma.masked_invalid(share), cmap=cmap, vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            if support[i] == 0:
                text, colour = f"{cm[i, j]}", "0.3"
            else:
                text, colour = f"{cm[i, j]}\n{share[i, j]:.0%}", ("white" if share[i, j] > 0.55 else "black")
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8.5,
                    fontweight="bold" if i == j else "normal")
    ax.set_xticks(range(k), labels=list(classes), rotation=35, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), labels=[f"{c} ({support[i]:,})" for i, c in enumerate(classes)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (images)")
    ax.tick_params(length=0)
    cbar = fig.colorbar(im, ax=ax, shrink=0.85)
    cbar.set_label("share of the true class")
    cbar.ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    if title:
        ax.set_title(title, fontsize=10)
    return _png(fig)


def plot_training_curves(history: Sequence[dict[str, Any]], best_epoch: int | None = None, *,
                         title: str = "") -> bytes:
    """PNG of train/val loss and accuracy per epoch, with the best epoch marked."""
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    rows = clean_history(history)
    epochs = [r["epoch"] for r in rows]
    fig = _new_figure((11.0, 4.3), 130)
    axes = fig.subplots(1, 2)
    panels = (("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc")))
    for ax, (what, keys) in zip(axes, panels):
        values_seen: list[float] = []
        for key, colour in zip(keys, ("tab:blue", "tab:orange")):
            ys = [_number(r.get(key)) for r in rows]
            if all(math.isnan(y) for y in ys):
                continue
            values_seen += [y for y in ys if not math.isnan(y)]
            ax.plot(epochs, ys, marker="o", markersize=3.5, color=colour, label=key.replace("_", " "))
            if best_epoch is not None and best_epoch in epochs:
                y = ys[epochs.index(best_epoch)]
                if not math.isnan(y):
                    right_half = best_epoch > (epochs[0] + epochs[-1]) / 2  # keep the label inside the axes
                    ax.annotate(f"{y:.1%}" if what == "accuracy" and y <= 1 else f"{y:.3f}", (best_epoch, y),
                                textcoords="offset points", xytext=(-6 if right_half else 6, 6),
                                ha="right" if right_half else "left", fontsize=8, color=colour)
        if best_epoch is not None:
            ax.axvline(best_epoch, linestyle="--", color="0.45", linewidth=1, label=f"best epoch ({best_epoch})")
        if what == "accuracy" and values_seen and max(values_seen) <= 1.0:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        if epochs and epochs[-1] - epochs[0] < 4:  # a short run: one tick per epoch, points off the edges
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.margins(y=0.1)  # room for the best-epoch labels
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.set_title(what, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _png(fig)


def _number(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------------------------
# Training runs: curves.png and metrics.csv from the per-epoch history


def clean_history(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-epoch rows sorted by epoch; a repeated epoch (a restart redid it) keeps its last row."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for i, row in enumerate(history):
        epoch = row.get("epoch", i)
        by_epoch[int(epoch)] = dict(row, epoch=int(epoch))
    return [by_epoch[e] for e in sorted(by_epoch)]


def best_epoch_of(history: Sequence[dict[str, Any]], key: str = "val_loss", mode: str = "min") -> int | None:
    """The epoch with the best `key` (training ranks checkpoints by the lowest val_loss)."""
    scored = [(r[key], r["epoch"]) for r in clean_history(history) if not math.isnan(_number(r.get(key)))]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored)[1]


def history_csv(history: Sequence[dict[str, Any]]) -> str:
    """The per-epoch metrics as CSV text: epoch first, then every key in order of appearance."""
    rows = clean_history(history)
    columns: list[str] = ["epoch"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_training_report(run_dir: str, history: Sequence[dict[str, Any]], best_epoch: int | None = None,
                          *, title: str = "") -> dict[str, str]:
    """Write curves.png and metrics.csv into a run folder (local or s3://); returns their URIs.

    best_epoch defaults to the epoch with the lowest val_loss. An empty history writes nothing.
    """
    if not history:
        log.warning("no per-epoch metrics to report for %s", run_dir)
        return {}
    if best_epoch is None:
        best_epoch = best_epoch_of(history)
    curves = storage.join(run_dir, CURVES_FILE)
    table = storage.join(run_dir, HISTORY_CSV)
    storage.write_bytes(curves, plot_training_curves(history, best_epoch,
                                                     title=title or f"training curves: {storage.basename(run_dir)}"))
    storage.write_bytes(table, history_csv(history).encode())
    log.info("wrote %s and %s", curves, table)
    return {"curves": curves, "metrics_csv": table}


def load_run_history(run_dir: str) -> tuple[list[dict[str, Any]], int | None, str]:
    """(history, best epoch, source) of a training run folder, local or s3://.

    Reads the exported model bundle (model.pt) when the run has finished, else the state of the
    latest Ray Train checkpoint (a run still going, or one that stopped early).
    """
    import torch

    from ray_fer.model import load_bundle
    from ray_fer.train import BUNDLE_FILE, STATE_FILE  # lazy: train imports this module for its report

    if not storage.is_dir(run_dir):
        raise UserError(f"run folder {run_dir!r} does not exist; pass <run.storage_path>/<run.name>, e.g. runs/fer")
    bundle_uri = storage.join(run_dir, BUNDLE_FILE)
    if storage.exists(bundle_uri):
        bundle, _ = load_bundle(bundle_uri)
        return bundle.history, bundle.metrics.get("epoch"), bundle_uri
    checkpoints = sorted(  # Ray names them checkpoint_<date>_<time>: name order is time order
        c for c, is_dir in storage.list_dir(run_dir) if is_dir and storage.basename(c).startswith("checkpoint_")
    )
    for ckpt in reversed(checkpoints):
        state_uri = storage.join(ckpt, STATE_FILE)
        if storage.exists(state_uri):
            state = torch.load(io.BytesIO(storage.read_bytes(state_uri)), map_location="cpu", weights_only=True)
            history = state.get("history", [])
            return history, best_epoch_of(history), state_uri
    raise UserError(f"{run_dir!r} holds neither {BUNDLE_FILE} nor a checkpoint_*/{STATE_FILE}; "
                    "is it a run folder written by `ray-fer train`?")


def report_run(run_dir: str) -> dict[str, Any]:
    """`ray-fer report RUN`: write curves.png and metrics.csv into the run folder; returns a summary."""
    history, best, source = load_run_history(run_dir)
    if not history:
        raise UserError(f"{source!r} holds no per-epoch metrics yet; wait for the first epoch to finish")
    paths = write_training_report(run_dir, history, best)
    rows = clean_history(history)
    best_row = next((r for r in rows if r["epoch"] == best), rows[-1])
    return {"run": run_dir, "epochs": len(rows), "best_epoch": best,
            "best_val_acc": best_row.get("val_acc"), "best_val_loss": best_row.get("val_loss"), **paths}


# --------------------------------------------------------------------------------------------
# Evaluation outputs: metrics.json, confusion_matrix.png, report.md


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:.2%}" if percent else f"{value:.3f}"


def render_report(metrics: dict[str, Any]) -> str:
    """report.md: the headline numbers, the per-class table and the confusion matrix picture."""
    model = metrics.get("model", {})
    lines = [f"# Evaluation of model `{model.get('id', '?')}`", ""]
    if model:
        lines.append(f"- model: `{model.get('uri', '?')}` (input {model.get('image_size', '?')} px)")
    if metrics.get("data"):
        skipped = metrics.get("num_errors", 0)
        note = f"; {skipped:,} unreadable files skipped" if skipped else ""
        lines.append(f"- data: `{metrics['data']}`: {metrics['num_images']:,} images{note}")
    lines += [
        f"- test-time augmentation: {metrics.get('tta', 'none')}",
        f"- **accuracy {_fmt(metrics['accuracy'], percent=True)}**, **macro-F1 {_fmt(metrics['macro_f1'])}**, "
        f"balanced accuracy (mean recall) {_fmt(metrics['macro_recall'], percent=True)}",
        "",
        "| class | precision | recall | F1 | support | predicted |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in metrics["classes"]:
        m = metrics["per_class"][name]
        lines.append(f"| {name} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} "
                     f"| {m['support']:,} | {m['predicted']:,} |")
    lines.append(f"| **macro average** | {_fmt(metrics['macro_precision'])} | {_fmt(metrics['macro_recall'])} "
                 f"| {_fmt(metrics['macro_f1'])} | {metrics['num_images']:,} | |")
    confusions = top_confusions(metrics)
    if confusions:
        lines += ["", "Most frequent confusions: " + "; ".join(
            f"{t} taken for {p} ({share:.0%} of {t}, {n:,} images)" for t, p, n, share in confusions) + "."]
    lines += ["", f"![Confusion matrix, rows normalised per true class]({CONFUSION_FILE})", ""]
    return "\n".join(lines)


def write_evaluation(output: str, metrics: dict[str, Any]) -> dict[str, str]:
    """Write metrics.json, confusion_matrix.png and report.md into `output`; returns their URIs."""
    paths = {name: storage.join(output, f) for name, f in
             (("metrics", METRICS_FILE), ("confusion_matrix", CONFUSION_FILE), ("report", REPORT_FILE))}
    title = (f"accuracy {_fmt(metrics['accuracy'], percent=True)}, macro-F1 {_fmt(metrics['macro_f1'])}"
             f"  (n={metrics['num_images']:,}, TTA {metrics.get('tta', 'none')})")
    storage.write_bytes(paths["metrics"], (json.dumps(metrics, indent=2) + "\n").encode())
    storage.write_bytes(paths["confusion_matrix"],
                        plot_confusion_matrix(metrics["confusion_matrix"], metrics["classes"], title=title))
    storage.write_bytes(paths["report"], render_report(metrics).encode())
    return paths


# --------------------------------------------------------------------------------------------
# Evaluate a model on a labelled folder with Ray Data


def evaluate_folder(
    model: str,
    data: str,
    *,
    output: str | None = None,
    tta: str = "none",
    precision: str = "auto",
    limit_per_class: int | None = None,
) -> dict[str, Any]:
    """Run a model bundle over a labelled image folder (local or s3://) and write the evaluation.

    Uses labelling's own chain (`infer.prediction_dataset`: the same decode, eval preset and
    predictor), so the numbers describe what `ray-fer label` produces. Writes metrics.json,
    confusion_matrix.png, report.md and predictions.parquet (one row per image, for error
    analysis) into `output` (default <model folder>/eval/<data folder>-<tta>); returns the summary.
    Unreadable images are counted in num_errors and left out of the metrics.
    """
    import time

    import pyarrow as pa

    from ray_fer.infer import prediction_dataset
    from ray_fer.model import load_bundle

    _check_tta(tta)
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"unknown precision {precision!r}; choose one of: auto, bf16, fp32")
    model_uri = resolve_model(model)
    bundle, model_id = load_bundle(model_uri)
    if tuple(bundle.classes) != CLASSES:
        raise UserError(f"model {model_uri!r} predicts {', '.join(bundle.classes)}; evaluation needs {', '.join(CLASSES)}")
    table = _list_labelled(data, limit_per_class)
    if output is None:
        output = _default_output(model_uri, data, tta)
    log.info("evaluating model %s on %d images of %s (tta %s) into %s", model_id, table.num_rows, data, tta, output)

    t0 = time.perf_counter()
    # the predictor adds its own `label` column (the prediction): the truth travels as true_label
    ds = prediction_dataset(table.rename_columns(["path", "true_label"]), bundle, model_id=model_id,
                            tta=tta, precision=precision)
    keep = ["path", "true_label", "label", "confidence", *[f"prob_{c}" for c in CLASSES], "error"]
    parts = [b.select(keep) for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    seconds = time.perf_counter() - t0
    predictions = pa.concat_tables(parts) if parts else pa.table({k: [] for k in keep})
    if predictions.num_rows != table.num_rows:  # the chain keeps one row per file; anything else is a bug
        raise RuntimeError(f"expected {table.num_rows} predictions, got {predictions.num_rows}")

    errors = predictions["error"].to_pylist()
    failed = [(p, e) for p, e in zip(predictions["path"].to_pylist(), errors) if e is not None]
    for path, err in failed[:5]:
        log.warning("could not evaluate %s: %s", path, err)
    if len(failed) > 5:
        log.warning("... and %d more unreadable files (see predictions.parquet)", len(failed) - 5)
    ok = [e is None for e in errors]
    y_true = [t for t, good in zip(predictions["true_label"].to_pylist(), ok) if good]
    y_pred = [CLASSES.index(p) for p, good in zip(predictions["label"].to_pylist(), ok) if good]
    if not y_true:
        raise UserError(f"none of the {table.num_rows} images in {data!r} could be read; "
                        f"first error: {failed[0][1]}")

    metrics = {
        "model": {"uri": model_uri, "id": model_id, "image_size": bundle.image_size,
                  "decode_size": bundle.decode_size},
        "data": data if storage.is_remote(data) else os.path.abspath(data),  # compare matches on it
        "tta": tta,
        "precision": precision,
        "num_errors": len(failed),
        **classification_metrics(y_true, y_pred),
        "seconds": round(seconds, 2),
        "images_per_s": round(table.num_rows / seconds, 1),
    }
    paths = write_evaluation(output, metrics)
    paths["predictions"] = storage.join(output, PREDICTIONS_FILE)
    _write_parquet(paths["predictions"], predictions)
    log.info("accuracy %.2f%%, macro-F1 %.3f on %d images (tta %s); report: %s",
             100 * metrics["accuracy"], metrics["macro_f1"], metrics["num_images"], tta, paths["report"])
    return {
        "accuracy": round(metrics["accuracy"], 6), "macro_f1": round(metrics["macro_f1"], 6),
        "images": metrics["num_images"], "errors": len(failed), "tta": tta, "model": model_id,
        "seconds": metrics["seconds"], "images_per_s": metrics["images_per_s"], "output": output, **paths,
    }


def _default_output(model_uri: str, data: str, tta: str) -> str:
    """<model folder>/eval/<data folder name>-<tta>: a run's evaluations collect beside its model."""
    if not storage.is_remote(model_uri):
        model_uri = os.path.abspath(model_uri)
    if not storage.is_remote(data):
        data = os.path.abspath(data)
    return storage.join(model_uri.rsplit("/", 1)[0], "eval", f"{storage.basename(data)}-{tta}")


def _list_labelled(data: str, limit_per_class: int | None):
    from ray_fer.data import DataError, find_split, list_image_folder

    if limit_per_class is not None and limit_per_class < 1:
        raise UserError(f"--limit-per-class must be >= 1, got {limit_per_class}")
    try:
        return list_image_folder(data, limit_per_class=limit_per_class)
    except DataError as e:
        try:  # a data root holding train/ and val/ rather than one split: say which folder to pass
            split = find_split(data, "val")
        except DataError:
            raise e from None
        raise DataError(f"{e}. {data!r} looks like a data root: pass one split, e.g. --data {split}") from None


def _write_parquet(uri: str, table) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


# --------------------------------------------------------------------------------------------
# Compare two evaluations


def load_metrics(uri: str) -> dict[str, Any]:
    """A metrics.json written by `evaluate`; a folder holding one is accepted too."""
    if storage.is_dir(uri):
        uri = storage.join(uri, METRICS_FILE)
    try:
        data = json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"cannot read {uri!r}: {e}; pass the metrics.json that `ray-fer evaluate` wrote") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{uri!r} is not JSON ({e}); pass the metrics.json that `ray-fer evaluate` wrote") from None
    if not isinstance(data, dict) or "per_class" not in data or "accuracy" not in data:
        raise UserError(f"{uri!r} is not a metrics.json written by `ray-fer evaluate` (no per_class/accuracy)")
    return data


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


def format_comparison(a: dict[str, Any], b: dict[str, Any], cmp: dict[str, Any],
                      names: tuple[str, str] = ("A", "B")) -> str:
    """A Markdown table of two evaluations side by side, per class, with B - A."""
    def label(m: dict[str, Any]) -> str:
        return f"{m.get('model', {}).get('id', '?')}, TTA {m.get('tta', 'none')}"

    def d(x: float | None) -> str:
        return "–" if x is None else f"{x:+.3f}"

    na, nb = names
    lines = [f"A: {na} ({label(a)})", f"B: {nb} ({label(b)})", ""]
    lines += [f"warning: {w}" for w in cmp["warnings"]]
    if cmp["warnings"]:
        lines.append("")
    lines += [
        "| class | support | recall A | recall B | Δ recall | F1 A | F1 B | Δ F1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in cmp["per_class"].items():
        sa, sb = m["support"]
        support = f"{sa:,}" if sa == sb else f"{sa:,} / {sb:,}"
        lines.append(f"| {name} | {support} | {_fmt(m['recall'][0])} | {_fmt(m['recall'][1])} | "
                     f"{d(m['recall_delta'])} | {_fmt(m['f1'][0])} | {_fmt(m['f1'][1])} | {d(m['f1_delta'])} |")
    lines.append(f"| **accuracy** | | {_fmt(a['accuracy'])} | {_fmt(b['accuracy'])} | {d(cmp['accuracy_delta'])} "
                 "| | | |")
    lines.append(f"| **macro-F1** | | | | | {_fmt(a['macro_f1'])} | {_fmt(b['macro_f1'])} "
                 f"| {d(cmp['macro_f1_delta'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Predict a few files in-process


def resolve_model(uri: str) -> str:
    """A model bundle's URI: the path itself, or <run folder>/model.pt when given a run folder."""
    from ray_fer.train import BUNDLE_FILE

    if storage.is_dir(uri):
        inner = storage.join(uri, BUNDLE_FILE)
        if not storage.exists(inner):
            raise UserError(f"{uri!r} is a folder without {BUNDLE_FILE}; pass the model.pt that `ray-fer train` "
                            "wrote (training writes it when the run finishes)")
        return inner
    if not storage.exists(uri):
        raise UserError(f"model {uri!r} does not exist; pass the model.pt that `ray-fer train` wrote "
                        "(<run.storage_path>/<run.name>/model.pt) or its run folder")
    return uri


def predict_files(model: str, images: Sequence[str], *, tta: str = "none", top: int = 3) -> dict[str, Any]:
    """Label a few image files (local or s3://) in this process; returns the model id and one row per file.

    A missing file fails before the model loads; an undecodable one gets a row with its error.
    """
    import torch

    from ray_fer.decode import ImageError, decode_image
    from ray_fer.infer import predict_probs
    from ray_fer.model import load_bundle

    _check_tta(tta)
    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    missing = [p for p in images if not storage.exists(p)]
    if missing:
        raise UserError(f"no such image file: {', '.join(missing)}")
    folders = [p for p in images if storage.is_dir(p)]
    if folders:
        raise UserError(f"{', '.join(folders)} is a folder; pass image files (for a labelled folder use "
                        "`ray-fer evaluate`, for a whole store `ray-fer label`)")
    bundle, model_id = load_bundle(resolve_model(model))
    net = bundle.build_model()
    preset = bundle.eval_preset(channels_last=False)
    rows: list[dict[str, Any]] = [{"path": p} for p in images]
    decoded: list[tuple[int, np.ndarray]] = []
    for i, path in enumerate(images):
        try:
            decoded.append((i, decode_image(storage.read_bytes(path), bundle.decode_size)[0]))
        except (ImageError, OSError) as e:
            rows[i]["error"] = str(e)
    if decoded:
        pixels = torch.from_numpy(np.stack([px for _, px in decoded]))
        probs = torch.cat([predict_probs(net, preset, chunk, tta=tta) for chunk in pixels.split(64)])
        for (i, _), p in zip(decoded, probs):
            order = torch.argsort(p, descending=True)[:top].tolist()
            rows[i].update(label=bundle.classes[order[0]], confidence=round(float(p[order[0]]), 4),
                           top=[[bundle.classes[j], round(float(p[j]), 4)] for j in order])
    return {"model": model_id, "tta": tta, "predictions": rows}


def format_predictions(result: dict[str, Any]) -> str:
    """A plain-text table of `predict_files` rows: file, label, then the top probabilities."""
    width = max([len("file")] + [len(r["path"]) for r in result["predictions"]])
    lines = [f"{'file':<{width}}  {'label':<9} top probabilities"]
    for r in result["predictions"]:
        if "error" in r:
            lines.append(f"{r['path']:<{width}}  {'-':<9} error: {r['error']}")
        else:
            tops = "  ".join(f"{name} {p:.1%}" for name, p in r["top"])
            lines.append(f"{r['path']:<{width}}  {r['label']:<9} {tops}")
    return "\n".join(lines)


def _check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise UserError(f"unknown --tta {tta!r}; choose one of: {', '.join(TTA_MODES)}")
