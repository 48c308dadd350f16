"""Synthetic photos with known faces: FER2013 crops pasted at known boxes on varied backgrounds.

Ground truth for face detection and alignment, shared by tests/test_faces.py and the face
benchmarks (bench/bench_faces.py, bench/gpu.py). A pasted face is a FER2013 48x48 crop scaled to
`side` pixels and rotated by `angle` degrees about its centre; its box is the square it was
pasted into (before rotation), in pixels of the photo. Nothing here imports ray_fer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BACKGROUNDS = ("noise", "gradient", "shapes", "blur")


@dataclass(frozen=True)
class PastedFace:
    box: tuple[int, int, int, int]  # x, y, w, h of the pasted square, before rotation
    angle: float  # degrees, counter-clockwise
    source: int  # index of the FER crop in the list given to `make_photo`

    def face_box(self, in_crop: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """The box (x, y, w, h) in the photo of a face whose box in its 48x48 crop is `in_crop`:
        scaled with the paste, its centre turned with the rotation, its size kept."""
        x, y, side, _ = self.box
        k = side / 48
        cx, cy = x + side / 2, y + side / 2
        fx, fy = x + (in_crop[0] + in_crop[2] / 2) * k - cx, y + (in_crop[1] + in_crop[3] / 2) * k - cy
        a = math.radians(self.angle)  # PIL rotates counter-clockwise as seen: y points down
        rx, ry = fx * math.cos(a) + fy * math.sin(a), -fx * math.sin(a) + fy * math.cos(a)
        w, h = in_crop[2] * k, in_crop[3] * k
        return (cx + rx - w / 2, cy + ry - h / 2, w, h)


def background(rng: np.random.Generator, width: int, height: int, kind: str) -> Image.Image:
    """An RGB background without faces: noise, a colour gradient, random shapes, or blurred noise."""
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if kind == "gradient":
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = ((xs / width) * rng.uniform(0.2, 1) + (ys / height) * rng.uniform(0.2, 1))[..., None] / 2
        img = c0 * (1 - t) + c1 * t + rng.normal(0, 8, (height, width, 3))
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if kind == "shapes":
        img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(40):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x1, y1 = x0 + int(rng.integers(20, width // 3)), y0 + int(rng.integers(20, height // 3))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        return img
    if kind == "blur":  # a soft "landscape": blurred coloured noise
        small = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC)
        return img.filter(ImageFilter.GaussianBlur(4))
    raise ValueError(f"unknown background {kind!r}; choose one of: {', '.join(BACKGROUNDS)}")


def make_photo(
    rng: np.random.Generator, crops: list[np.ndarray], *, width: int = 1280, height: int = 960, faces: int = 3,
    sides: tuple[int, int] = (80, 300), max_angle: float = 0.0, kind: str | None = None,
) -> tuple[Image.Image, list[PastedFace]]:
    """An RGB photo holding `faces` of the 48x48 uint8 `crops` (chosen at random), scaled to
    `sides` pixels, rotated by up to `max_angle` degrees, apart from each other; and their boxes.

    Fewer faces are pasted when no free place is found (tries 200 places per face)."""
    img = background(rng, width, height, kind or BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    placed: list[PastedFace] = []
    for _ in range(faces):
        for _ in range(200):
            side = int(rng.integers(sides[0], sides[1] + 1))
            reach = int(side * 0.21) + 2  # a rotated square's corners reach this far beyond it
            if width - side - 2 * reach <= 0 or height - side - 2 * reach <= 0:
                break
            x = int(rng.integers(reach, width - side - reach))
            y = int(rng.integers(reach, height - side - reach))
            if all(_apart((x, y, side, side), f.box, reach) for f in placed):
                break
        else:
            continue
        if width - side - 2 * reach <= 0 or height - side - 2 * reach <= 0:
            break
        source = int(rng.integers(len(crops)))
        angle = float(rng.uniform(-max_angle, max_angle)) if max_angle else 0.0
        face = Image.fromarray(crops[source], "L").resize((side, side), Image.Resampling.BICUBIC)
        mask = Image.new("L", (side, side), 255)
        if angle:
            face = face.rotate(angle, Image.Resampling.BICUBIC, expand=True)
            mask = mask.rotate(angle, Image.Resampling.BILINEAR, expand=True)
        cx, cy = x + side / 2, y + side / 2
        img.paste(face.convert("RGB"), (round(cx - face.width / 2), round(cy - face.height / 2)), mask)
        placed.append(PastedFace((x, y, side, side), angle, source))
    return img, placed


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return (a[0] + a[2] + gap <= b[0] or b[0] + b[2] + gap <= a[0]
            or a[1] + a[3] + gap <= b[1] or b[1] + b[3] + gap <= a[1])


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def match(truth: list[tuple], found: list[tuple], threshold: float = 0.5) -> tuple[list[int | None], int]:
    """Greedy one-to-one matching by IoU: for each true box the index of its found box (or None),
    and the number of found boxes that match no true box (false boxes)."""
    pairs = sorted(((iou(t, f), i, j) for i, t in enumerate(truth) for j, f in enumerate(found)), reverse=True)
    of_truth: list[int | None] = [None] * len(truth)
    used: set[int] = set()
    for score, i, j in pairs:
        if score < threshold:
            break
        if of_truth[i] is None and j not in used:
            of_truth[i] = j
            used.add(j)
    return of_truth, len(found) - len(used)
