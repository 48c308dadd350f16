"""Decoding (CPU, per file): image bytes -> a small upright grayscale uint8 array.

The first of the two image stages (the second, the tensor presets, is `images`): any PIL-readable
image is made EXIF-upright, grayscale, centre-cropped to a square and resized to `decode_size` (48
for FER2013, its native size). Big JPEGs are decoded at reduced scale (draft mode); decompression
bombs are refused. This module imports no torch, so read-and-decode workers start in a fraction
of a second instead of paying torch's import.
"""

from __future__ import annotations

import io
import warnings

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
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
            if orientation in _QUARTER_TURNS:
                width, height = height, width
            if im.format == "JPEG":
                im.draft("L", (size, size))  # decode at 1/2..1/8 scale when the image is big enough
            if orientation in range(2, 9):  # only then: exif_transpose copies even an upright image
                im = ImageOps.exif_transpose(im)
            gray = _to_gray(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large (decompression bomb guard): {e}") from None
    except ImageError:
        raise
    except UnidentifiedImageError:  # its message holds a memory address: say it plainly
        raise ImageError(f"not an image, or not one of the formats read: {', '.join(FORMATS)}") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        reason = str(e) or type(e).__name__
        raise ImageError(f"cannot decode image: {reason}"[:200]) from None
    if gray.size != (size, size):  # FER2013's own 48x48 faces need no crop or resize
        gray = ImageOps.fit(gray, (size, size), method=Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8), width, height


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
