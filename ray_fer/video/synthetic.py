"""Videos with a known truth, for tests and benchmarks: FER2013 faces pasted at known, moving
positions, their expressions changing at known times, people entering and leaving, encoded with
PyAV (H.264, HEVC, VP9). `make_video` returns, for every frame, where each face is and which
FER2013 face (and so which label) it shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Person:
    """One face on screen from `start_s` to `end_s`, moving linearly from `xy0` to `xy1` (its box's
    top-left corner), `side` pixels tall; it shows `faces[i]` (a path of a FER2013 image) from
    `changes[i]` seconds on (`changes[0]` == start_s)."""

    faces: list[str]
    changes: list[float]
    start_s: float
    end_s: float
    xy0: tuple[float, float]
    xy1: tuple[float, float]
    side: int = 120

    def at(self, t: float) -> tuple[tuple[int, int, int, int], str] | None:
        """(x, y, w, h) and the FER2013 image shown at time t, or None when off screen."""
        if not self.start_s <= t < self.end_s:
            return None
        a = (t - self.start_s) / max(self.end_s - self.start_s, 1e-9)
        x = self.xy0[0] + a * (self.xy1[0] - self.xy0[0])
        y = self.xy0[1] + a * (self.xy1[1] - self.xy0[1])
        shown = self.faces[max(i for i, c in enumerate(self.changes) if c <= t)]
        return (round(x), round(y), self.side, self.side), shown


@dataclass
class Truth:
    """One face in one frame."""

    frame: int
    time_s: float
    person: int
    box: tuple[int, int, int, int]
    face: str  # the FER2013 image shown


CODECS = {"h264": ("libx264", {"crf": "20", "preset": "veryfast"}),
          "hevc": ("libx265", {"crf": "22", "preset": "veryfast", "x265-params": "log-level=error"}),
          "vp9": ("libvpx-vp9", {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"})}


def background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured (h, w, 3) uint8 backdrop: gradients and soft blobs, no faces."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        img[..., c] = 70 + 60 * (xx / width) * rng.uniform(0.5, 1) + 40 * (yy / height) * rng.uniform(0.5, 1)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        img += (np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-40, 40, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_video(path: str | Path, people: list[Person], *, duration_s: float, fps: int = 10,
               size: tuple[int, int] = (640, 360), codec: str = "h264", gop: int = 25, seed: int = 0,
               faststart: bool = False) -> list[Truth]:
    """Write the video; returns the truth of every face in every frame."""
    import av

    width, height = size
    backdrop = background(width, height, seed)
    cache: dict[tuple[str, int], np.ndarray] = {}
    truth: list[Truth] = []
    name, options = CODECS[codec]
    container_options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=container_options) as out:
        stream = out.add_stream(name, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {**options, "g": str(gop)}
        for index in range(round(duration_s * fps)):
            t = index / fps
            frame = backdrop.copy()
            for p, person in enumerate(people):
                seen = person.at(t)
                if seen is None:
                    continue
                (x, y, w, h), face = seen
                key = (face, w)
                if key not in cache:
                    gray = Image.open(face).convert("L").resize((w, h), Image.Resampling.BICUBIC)
                    cache[key] = np.asarray(gray)[..., None].repeat(3, axis=2)
                x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
                if x1 <= x0 or y1 <= y0:
                    continue
                frame[y0:y1, x0:x1] = cache[key][y0 - y:y1 - y, x0 - x:x1 - x]
                truth.append(Truth(index, t, p, (x, y, w, h), face))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return truth
