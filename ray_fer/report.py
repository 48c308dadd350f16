"""Pictures and reports: the confusion matrix, training curves, metrics.csv, report.md and the
plain-text tables the CLI prints. Numbers come from `metrics`; files go through `storage`
(local folder or s3:// prefix). matplotlib draws on its Agg canvas, one per figure: no pyplot, no
display, no global backend switch.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

from ray_fer.store import storage
from ray_fer.config import UserError
from ray_fer.labels import CLASSES
from ray_fer.metrics import as_float, best_epoch_of, clean_history, top_confusions

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion_matrix.png"
REPORT_FILE = "report.md"
CURVES_FILE = "curves.png"
HISTORY_CSV = "metrics.csv"


# --------------------------------------------------------------------------------------------
# Pictures


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
    # raw_val_*: the trained weights' own val metrics where val_* are a weight average's (train.ema_decay)
    panels = (("loss", ("train_loss", "val_loss", "raw_val_loss")), ("accuracy", ("train_acc", "val_acc", "raw_val_acc")))
    for ax, (what, keys) in zip(axes, panels):
        values_seen: list[float] = []
        for key, colour in zip(keys, ("tab:blue", "tab:orange", "tab:green")):
            ys = [as_float(r.get(key)) for r in rows]
            if all(math.isnan(y) for y in ys):
                continue
            values_seen += [y for y in ys if not math.isnan(y)]
            ax.plot(epochs, ys, marker="o", markersize=3.5, color=colour, label=key.replace("_", " "))
            if best_epoch is not None and best_epoch in epochs and not key.startswith("raw_"):
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



# --------------------------------------------------------------------------------------------
# Training runs: curves.png and metrics.csv from the per-epoch history


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



# --------------------------------------------------------------------------------------------
# Evaluations: metrics.json, confusion_matrix.png, report.md; comparisons


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
    if "num_no_face" in metrics:
        lines.append(f"- faces ({metrics.get('faces', '?')}): found in {metrics['num_images'] - metrics['num_no_face']:,}"
                     f" images, not found in {metrics['num_no_face']:,} (each a miss for its class)")
    ece = f", expected calibration error {_fmt(metrics['ece'])}" if metrics.get("ece") is not None else ""
    lines += [
        f"- test-time augmentation: {metrics.get('tta', 'none')}",
        f"- **accuracy {_fmt(metrics['accuracy'], percent=True)}**, **macro-F1 {_fmt(metrics['macro_f1'])}**, "
        f"balanced accuracy (mean recall) {_fmt(metrics['macro_recall'], percent=True)}{ece}",
        "",
        "| class | precision | recall | F1 | support | predicted | no face |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in metrics["classes"]:
        m = metrics["per_class"][name]
        lines.append(f"| {name} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} "
                     f"| {m['support']:,} | {m['predicted']:,} | {m.get('missed', 0):,} |")
    lines.append(f"| **macro average** | {_fmt(metrics['macro_precision'])} | {_fmt(metrics['macro_recall'])} "
                 f"| {_fmt(metrics['macro_f1'])} | {metrics['num_images']:,} | | {metrics.get('num_missed', 0):,} |")
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



def load_evaluations(uri: str) -> list[dict[str, Any]]:
    """The evaluations at `uri`: one metrics.json (or a folder holding one), or a folder whose
    sub-folders hold them, as `evaluate` collects a model's evaluations in <model folder>/eval/."""
    if not storage.is_dir(uri) or storage.exists(storage.join(uri, METRICS_FILE)):
        return [load_metrics(uri)]
    found = [storage.join(child, METRICS_FILE) for child, is_dir in storage.list_dir(uri) if is_dir]
    found = sorted(f for f in found if storage.exists(f))
    if not found:
        raise UserError(f"{uri!r} holds no metrics.json, nor sub-folders with one; pass what `ray-fer evaluate` "
                        "wrote (its output folder, or the eval/ folder beside a model)")
    return [load_metrics(f) for f in found]


def _setting(m: dict[str, Any]) -> tuple[str, str, str]:
    """What makes two evaluations comparable: the data, the test-time augmentation, the face stage."""
    return (str(m.get("data")), str(m.get("tta", "none")), str(m.get("faces", "whole")))


def pair_evaluations(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The evaluations of A and B on the same data with the same settings, in A's order."""
    by_setting = {_setting(m): m for m in b}
    return [(m, by_setting[_setting(m)]) for m in a if _setting(m) in by_setting]


def format_set_comparison(pairs: list[tuple[dict[str, Any], dict[str, Any]]], names: tuple[str, str]) -> str:
    """A Markdown table of two models on several data sets: accuracy, macro-F1, expected
    calibration error and images without a face, A and B side by side, one row per set."""
    def d(x: float | None, y: float | None) -> str:
        return "–" if x is None or y is None else f"{y - x:+.3f}"

    def ids(i: int) -> str:
        return ", ".join(sorted({p[i].get("model", {}).get("id", "?") for p in pairs}))

    lines = [f"A: {names[0]} ({ids(0)})", f"B: {names[1]} ({ids(1)})", "",
             "| data | TTA | faces | images | acc A | acc B | Δ acc | macro-F1 A | macro-F1 B | Δ macro-F1 "
             "| ECE A | ECE B | no face A | no face B |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a, b in pairs:
        data, tta, faces = _setting(a)
        lines.append(
            f"| {storage.basename(data.rstrip('/'))} | {tta} | {faces} | {a['num_images']:,} "
            f"| {_fmt(a['accuracy'])} | {_fmt(b['accuracy'])} | {d(a['accuracy'], b['accuracy'])} "
            f"| {_fmt(a['macro_f1'])} | {_fmt(b['macro_f1'])} | {d(a['macro_f1'], b['macro_f1'])} "
            f"| {_fmt(a.get('ece'))} | {_fmt(b.get('ece'))} | {a.get('num_no_face', '–')} | {b.get('num_no_face', '–')} |")
    return "\n".join(lines)


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
# Annotated photos (ray-fer predict --annotate)

# One colour per class (CLASSES order), readable on photos; red for "no face" captions.
LABEL_COLOURS = ((220, 40, 40), (120, 160, 40), (150, 60, 200), (250, 200, 0), (160, 160, 160), (40, 110, 230),
                 (255, 120, 0))


def plot_timeline(rows: pa.Table, *, title: str = "", classes: Sequence[str] = CLASSES) -> bytes:
    """PNG: the timeline of one video's rows (`ray-fer report` on a labelled output): one band per
    track, each emotion's probability over the track's sampled frames."""
    import pyarrow.compute as pc

    rows = rows.filter(pc.and_(pc.is_valid(rows["track"]), pc.is_valid(rows["label"])))
    tracks = sorted(set(rows["track"].to_pylist())) or [None]
    fig = _new_figure((10, 1.6 + 1.5 * len(tracks)), 100)
    axes = fig.subplots(len(tracks), 1, sharex=True, squeeze=False)[:, 0]
    colours = [tuple(v / 255 for v in LABEL_COLOURS[i % len(LABEL_COLOURS)]) for i in range(len(classes))]
    for ax, track in zip(axes, tracks):
        if track is None:
            ax.text(0.5, 0.5, "no face found", ha="center", va="center", transform=ax.transAxes)
            continue
        t = rows.filter(pc.equal(rows["track"], track)).sort_by("time_s")
        times = t["time_s"].to_numpy(zero_copy_only=False)
        for j, c in enumerate(classes):
            ax.plot(times, t[f"prob_{c}"].to_numpy(zero_copy_only=False), color=colours[j], lw=1.5,
                    marker="." if len(times) < 40 else None, label=c)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"track {track}")
        ax.grid(alpha=0.3)
    axes[0].legend(ncol=len(classes), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.02), frameon=False)
    axes[-1].set_xlabel("time (s)")
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def annotate_photo(image, faces: Sequence[dict[str, Any]], empty_caption: str = "no face found"):
    """`image` (PIL, upright) with each face's box and "<index> <label> <confidence>" drawn on a
    copy; `faces` are predict rows with `box` (x, y, w, h) and `label`. A photo without a face
    gets `empty_caption`; one labelled whole (no box), its label."""
    from PIL import ImageDraw, ImageFont

    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    side = min(out.size)
    font = ImageFont.load_default(size=max(12, round(side / 30)))
    line = max(2, round(side / 250))
    boxed = [f for f in faces if f.get("box") is not None and f.get("label") is not None]
    for f in boxed:
        x, y, w, h = f["box"]
        colour = LABEL_COLOURS[CLASSES.index(f["label"]) % len(LABEL_COLOURS)] if f["label"] in CLASSES else (0, 200, 0)
        draw.rectangle((x, y, x + w, y + h), outline=colour, width=line)
        text = f"{f.get('face', 0)} {f['label']} {f.get('confidence', 0):.0%}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        ty = y - (bottom - top) - 2 * line if y - (bottom - top) - 2 * line >= 0 else y + h + line
        draw.rectangle((x, ty, x + right - left + 2 * line, ty + bottom - top + 2 * line), fill=colour)
        draw.text((x + line - left, ty + line - top), text, fill=(0, 0, 0), font=font)
    if not boxed:  # --faces whole labels the image itself; else no face was found
        whole = [f for f in faces if f.get("label") is not None]
        caption = f"{whole[0]['label']} {whole[0].get('confidence', 0):.0%}" if whole else empty_caption
        if caption:
            draw.text((line * 3, line * 3), caption, fill=(220, 40, 40), font=font)
    return out


def unique_name(path: str, ext: str, taken: set[str], default: str = "file") -> str:
    """<stem of path>.<ext>, or <stem>-2.<ext>, -3 ... where `taken` holds it already; added to `taken`."""
    stem = storage.basename(path).rsplit(".", 1)[0] or default
    name, k = f"{stem}.{ext}", 1
    while name in taken:
        k += 1
        name = f"{stem}-{k}.{ext}"
    taken.add(name)
    return name


def write_annotated(folder: str, rows: Sequence[dict[str, Any]]) -> list[str]:
    """Write each readable file of `rows` (predict rows, several per file with faces) with its
    faces drawn (annotate_photo) into `folder` as <name>.jpg (<name>-2.jpg ... where names
    repeat); returns the written paths. Files with an error are skipped."""
    from PIL import Image, ImageOps

    from ray_fer.label.decode import FORMATS

    by_path: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    written: list[str] = []
    names: set[str] = set()
    for path, faces in by_path.items():
        if any("error" in f for f in faces):
            continue
        with Image.open(io.BytesIO(storage.read_bytes(path)), formats=FORMATS) as im:
            picture = annotate_photo(ImageOps.exif_transpose(im), faces)
        name = unique_name(path, "jpg", names, default="image")
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=90)
        uri = storage.join(folder, name)
        storage.write_bytes(uri, buf.getvalue())
        written.append(uri)
    return written
