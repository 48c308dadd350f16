"""Tracks: the same person across the sampled frames of one video.

Faces of consecutive sampled frames are matched by the Hungarian method
(`scipy.optimize.linear_sum_assignment`) on a cost that mixes how much the boxes overlap with how
far the five landmarks moved, each track's box first moved on by its last velocity (people walk
across a frame in the 0.5 s between two samples at 2 fps). A pair is allowed only where the boxes
overlap or the landmarks stayed within a box's size of each other; a face no track takes starts a
new one; a track not seen for `max_gap_s` ends (a person who leaves and comes back is a new track).

`assign_tracks` runs over a whole video's face rows in time order, so segments decoded by
different tasks are stitched by the same rule as any two frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_GAP_S = 1.6  # a track may miss this long (3 samples at 2 fps) and still be continued
MAX_COST = 0.9  # pairs costing more are not matched
LANDMARK_WEIGHT = 0.5  # share of the cost that is landmark distance (the rest: 1 - IoU)


@dataclass
class _Track:
    id: int
    box: np.ndarray  # x, y, w, h at `time`
    points: np.ndarray  # (5, 2)
    time: float
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(2))  # px/s of the box's centre


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (n, 4) and (m, 4) x, y, w, h boxes: (n, m)."""
    ax0, ay0, ax1, ay1 = a[:, 0:1], a[:, 1:2], a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4]
    bx0, by0, bx1, by1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    inter = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None) * \
        np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    union = a[:, 2:3] * a[:, 3:4] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def _cost(tracks: list[_Track], boxes: np.ndarray, points: np.ndarray, time: float) -> np.ndarray:
    """(tracks, faces) matching cost; np.inf where a pair is not allowed."""
    pred = np.stack([t.box for t in tracks]).astype(np.float64)
    shift = np.stack([t.velocity * (time - t.time) for t in tracks])
    pred[:, :2] += shift
    overlap = iou(pred, boxes)
    size = np.sqrt(pred[:, 2:3] * pred[:, 3:4]) + 1e-9  # (n, 1)
    moved = np.stack([t.points for t in tracks])[:, None] + shift[:, None, None, :]  # (n, 1, 5, 2)
    dist = np.linalg.norm(moved - points[None], axis=-1)  # (n, m, 5): NaN where landmarks are missing
    have = np.isfinite(dist).all(axis=-1)
    spread = np.where(have, np.nan_to_num(dist).mean(axis=-1) / size, 1.0)
    cost = (1 - LANDMARK_WEIGHT) * (1 - overlap) + LANDMARK_WEIGHT * np.minimum(spread, 1.0)
    allowed = (overlap > 0) | (have & (spread < 1.0))
    return np.where(allowed & (cost <= MAX_COST), cost, np.inf)


def assign_tracks(times: np.ndarray, boxes: np.ndarray, points: np.ndarray,
                  max_gap_s: float = MAX_GAP_S) -> np.ndarray:
    """Track ids (0, 1, ... in order of appearance) of one video's faces.

    `times` (n,) the faces' frame times, `boxes` (n, 4) x, y, w, h and `points` (n, 10) the five
    landmarks (x, y pairs; NaN where unknown), in any order; faces of the same frame share a time.
    """
    from scipy.optimize import linear_sum_assignment

    times = np.asarray(times, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 5, 2)
    ids = np.full(len(times), -1, dtype=np.int64)
    active: list[_Track] = []
    next_id = 0
    for time in np.unique(times):
        here = np.flatnonzero(times == time)
        active = [t for t in active if time - t.time <= max_gap_s]
        taken: dict[int, _Track] = {}
        if active:
            cost = _cost(active, boxes[here], points[here], time)
            finite = np.where(np.isfinite(cost), cost, 1e6)
            for r, c in zip(*linear_sum_assignment(finite)):
                if np.isfinite(cost[r, c]):
                    taken[int(c)] = active[r]
        for j, i in enumerate(here):
            track = taken.get(j)
            if track is None:
                track = _Track(id=next_id, box=boxes[i], points=points[i], time=time)
                next_id += 1
                active.append(track)
            else:
                dt = time - track.time
                centre = lambda b: b[:2] + b[2:] / 2  # noqa: E731
                if dt > 0:
                    v = (centre(boxes[i]) - centre(track.box)) / dt
                    track.velocity = v if not track.velocity.any() else 0.5 * (track.velocity + v)
                track.box, track.points, track.time = boxes[i], points[i], time
            ids[i] = track.id
    return ids


def identity_switches(truth: np.ndarray, tracks: np.ndarray, times: np.ndarray) -> int:
    """How often a true identity's track id changes from one of its frames to its next: the
    identity switches of `tracks` against ground-truth ids `truth` (faces matched to truth first)."""
    switches = 0
    order = np.argsort(times, kind="stable")
    last: dict[int, int] = {}
    for i in order:
        who, got = int(truth[i]), int(tracks[i])
        if who in last and last[who] != got:
            switches += 1
        last[who] = got
    return switches
