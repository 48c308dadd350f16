"""What a person reads about a labelled video: per track, the share of each emotion and the
dominant one (a table; the timeline picture is report.plot_timeline).

Input: the rows `ray-fer infer` wrote for videos (schema.py: `track` set), as a pyarrow Table.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_fer.labels import CLASSES

TRACK_COLUMNS = ("path", "track", "faces", "first_s", "last_s", "dominant",
                 *(f"share_{c}" for c in CLASSES), *(f"mean_prob_{c}" for c in CLASSES))


def track_summary(rows: pa.Table, classes: Sequence[str] = CLASSES) -> pa.Table:
    """One row per (video, track): how many sampled faces, when it was first and last seen, the
    share of its faces labelled each emotion, its mean probability of each, and the dominant
    emotion (the largest share; ties go to the larger mean probability). Sorted by path, track."""
    rows = rows.filter(pc.and_(pc.is_valid(rows["track"]), pc.is_valid(rows["label"])))
    out: dict[str, list[Any]] = {name: [] for name in TRACK_COLUMNS}
    if rows.num_rows == 0:
        return pa.table(out, schema=_schema(classes))
    rows = rows.sort_by([("path", "ascending"), ("track", "ascending"), ("time_s", "ascending")])
    paths = rows["path"].to_numpy(zero_copy_only=False)
    tracks = rows["track"].to_numpy(zero_copy_only=False)
    labels = rows["label"].to_numpy(zero_copy_only=False)
    times = rows["time_s"].to_numpy(zero_copy_only=False)
    probs = np.stack([rows[f"prob_{c}"].to_numpy(zero_copy_only=False) for c in classes], axis=1)
    key_change = np.flatnonzero((paths[1:] != paths[:-1]) | (tracks[1:] != tracks[:-1])) + 1
    for lo, hi in zip(np.r_[0, key_change], np.r_[key_change, len(paths)]):
        counts = np.array([(labels[lo:hi] == c).sum() for c in classes], dtype=np.float64)
        share = counts / (hi - lo)
        mean = probs[lo:hi].mean(axis=0)
        dominant = classes[int(np.lexsort((mean, share))[-1])]
        out["path"].append(paths[lo])
        out["track"].append(int(tracks[lo]))
        out["faces"].append(int(hi - lo))
        out["first_s"].append(float(times[lo]))
        out["last_s"].append(float(times[hi - 1]))
        out["dominant"].append(dominant)
        for j, c in enumerate(classes):
            out[f"share_{c}"].append(float(share[j]))
            out[f"mean_prob_{c}"].append(float(mean[j]))
    return pa.table(out, schema=_schema(classes))


def _schema(classes: Sequence[str]) -> pa.Schema:
    return pa.schema([("path", pa.string()), ("track", pa.int32()), ("faces", pa.int32()), ("first_s", pa.float64()),
                      ("last_s", pa.float64()), ("dominant", pa.string())]
                     + [(f"share_{c}", pa.float64()) for c in classes]
                     + [(f"mean_prob_{c}", pa.float64()) for c in classes])


def format_tracks(summary: Sequence[dict[str, Any]], classes: Sequence[str] = CLASSES, top: int = 3) -> str:
    """A line per track (rows of `track_summary`):
    '<video> track 0: 12 faces, 0.0-5.5 s, mostly happy (happy 67%, neutral 25%, ...)'."""
    lines = []
    for r in summary:
        shares = sorted(((r[f"share_{c}"], c) for c in classes), reverse=True)[:top]
        mix = ", ".join(f"{c} {s:.0%}" for s, c in shares if s > 0)
        lines.append(f"{r['path']} track {r['track']}: {r['faces']} faces, {r['first_s']:.1f}-{r['last_s']:.1f} s, "
                     f"mostly {r['dominant']} ({mix})")
    return "\n".join(lines)


def to_csv(table: pa.Table) -> bytes:
    import pyarrow.csv as pacsv

    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    return buf.getvalue()
