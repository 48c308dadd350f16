"""Decoding (CPU, per file): image bytes -> a small upright grayscale uint8 array, or a photo's
two copies for face detection.

The first of the two image stages (the second, the tensor presets, is `images`): any PIL-readable
image is made EXIF-upright, grayscale, centre-cropped to a square and resized to `decode_size` (48
for FER2013, its native size) by `decode_image`; `decode_photo` decodes a photo once into a small
RGB copy that the face detector searches and a gray copy that faces are cut from. Big JPEGs are
decoded at reduced scale (draft mode); decompression bombs are refused. This module imports no
torch, so read-and-decode workers start in a fraction of a second instead of paying torch's import.
"""

from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The only decoders PIL may try, whatever a file's name or first bytes say: without this list a
# PostScript file named .jpg goes to the EPS plugin, which runs Ghostscript where it is installed.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class ImageError(ValueError):
    """A file that cannot be turned into model input; the message is a short per-file reason."""


def decode_image(data: bytes, size: int) -> tuple[np.ndarray, int, int]:
    """Decode image bytes to a (size, size) uint8 grayscale array.

    Returns (pixels, width, height) where width and height are the source image's, after EXIF
    rotation. Raises ImageError with a short reason for empty, corrupt, truncated, unsupported or
    oversized (decompression-bomb) files.
    """
    with _reasons():
        im, width, height, orientation = _open(data)
        return _whole(im, orientation, size), width, height


@dataclass
class Photo:
    """A photo decoded once for face detection (`faces/detector.py`), or a face crop (`face` set)."""

    width: int  # the source image's size, upright (after EXIF rotation)
    height: int
    detect: np.ndarray | None = None  # (h, w, 3) uint8 RGB, long side <= detect_size: what is searched
    gray: np.ndarray | None = None  # (H, W) uint8, long side <= SOURCE_FACTOR * detect_size: what is cropped
    face: np.ndarray | None = None  # (size, size) uint8: the whole image as decode_image gives it


# Faces are cut from a gray copy of at most this many times the detection size (1,920 px at 640):
# full resolution for photos up to about 2.7 MP. The smallest face found (MIN_FACE, 20 px of the
# detection copy) still spans 60 px there, more than the ~40 px its 48 px crop needs, so a bigger
# copy would not change a crop; a 24-MP photo then holds 2.5 MB instead of 24 MB per photo.
SOURCE_FACTOR = 3


def decode_photo(data: bytes, *, detect_size: int, size: int, whole_max_side: int = 0) -> Photo:
    """Decode image bytes once for face detection: a small RGB copy to search and a gray copy to
    crop from, both upright. Big JPEGs are decoded at reduced scale (draft mode) when that still
    leaves the gray copy its full size. An image whose long side is at most `whole_max_side` is a
    face crop (`--faces auto`): `face` holds it as `decode_image(data, size)` does.

    Raises ImageError as decode_image does.
    """
    with _reasons():
        im, width, height, orientation = _open(data)
        if max(width, height) <= whole_max_side:
            return Photo(width, height, face=_whole(im, orientation, size))
        source = min(1.0, SOURCE_FACTOR * detect_size / max(width, height))
        if im.format == "JPEG" and source < 1.0:  # decode at 1/2..1/8 scale, never below the gray copy's size
            w, h = im.size  # as stored: before the EXIF rotation
            im.draft(None, (math.ceil(w * source), math.ceil(h * source)))
        if orientation in range(2, 9):
            im = ImageOps.exif_transpose(im)
        rgb = _to_rgb(im)
        gray_size = (max(1, round(width * source)), max(1, round(height * source)))
        if rgb.size != gray_size:
            rgb = rgb.resize(gray_size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        scale = min(1.0, detect_size / max(width, height))  # never enlarged: that finds no more faces
        detect_size_ = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = rgb if rgb.size == detect_size_ else rgb.resize(detect_size_, Image.Resampling.BILINEAR,
                                                                 reducing_gap=2.0)
        return Photo(width, height, detect=np.asarray(small, dtype=np.uint8),
                     gray=np.asarray(rgb.convert("L"), dtype=np.uint8))


def _open(data: bytes) -> tuple[Image.Image, int, int, int]:
    """The opened (not yet decoded) image, its upright width and height, and its EXIF orientation."""
    if not data:
        raise ImageError("empty file")
    im = Image.open(io.BytesIO(data), formats=FORMATS)
    width, height = im.size
    orientation = im.getexif().get(0x0112, 1)
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    return im, width, height, orientation


def _whole(im: Image.Image, orientation: int, size: int) -> np.ndarray:
    """The whole image, upright, gray, centre-cropped to a square and resized to (size, size)."""
    if im.format == "JPEG":
        im.draft("L", (size, size))  # decode at 1/2..1/8 scale when the image is big enough
    if orientation in range(2, 9):  # only then: exif_transpose copies even an upright image
        im = ImageOps.exif_transpose(im)
    gray = _to_gray(im)
    if gray.size != (size, size):  # FER2013's own 48x48 faces need no crop or resize
        gray = ImageOps.fit(gray, (size, size), method=Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8)


@contextmanager
def _reasons() -> Iterator[None]:
    """Turn whatever PIL raises for a bad file into an ImageError with a short reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large (decompression bomb guard): {e}") from None
    except ImageError:
        raise
    except UnidentifiedImageError:  # its message holds a memory address: say it plainly
        raise ImageError(f"not an image, or not one of the formats read: {', '.join(FORMATS)}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        reason = str(e) or type(e).__name__
        raise ImageError(f"cannot decode image: {reason}"[:200]) from None


def _to_gray(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        arr = (arr - lo) / (hi - lo or 1.0)
        return Image.fromarray((arr * 255 + 0.5).astype(np.uint8), "L")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("L")
    return im.convert("L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _to_gray(im).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")
