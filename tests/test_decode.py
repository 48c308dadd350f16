"""label/decode.py: odd files each become pixels or a short ImageError; the module imports no torch."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from ray_fer.label.decode import ImageError, decode_image


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few bytes: what a decompression bomb looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def halves(size: tuple[int, int], left: int, right: int, mode: str = "L") -> Image.Image:
    """An image whose left half has value `left` and right half `right`."""
    arr = np.full((size[1], size[0]), right, dtype=np.uint8)
    arr[:, : size[0] // 2] = left
    return Image.fromarray(arr, "L").convert(mode)


# --------------------------------------------------------------------------------------------
# decode_image: files that decode


def test_fer_jpeg_decodes_to_its_native_size(fer_root):
    path = next((fer_root / "val" / "happy").glob("*.jpg"))
    pixels, width, height = decode_image(path.read_bytes(), 48)
    assert pixels.shape == (48, 48) and pixels.dtype == np.uint8
    assert (width, height) == (48, 48)
    assert np.array_equal(pixels, np.asarray(Image.open(path).convert("L")))  # no resampling at native size


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_listed_format_decodes(fmt):
    pixels, width, height = decode_image(encode(halves((80, 60), 0, 255, "RGB"), fmt), 32)
    assert pixels.shape == (32, 32) and (width, height) == (80, 60)
    assert pixels[:, :8].mean() < 40 and pixels[:, -8:].mean() > 215


def test_rgba_png_is_composited_on_white():
    im = Image.new("RGBA", (40, 40), (0, 0, 0, 255))
    im.paste((0, 0, 0, 0), (20, 0, 40, 40))  # right half fully transparent
    pixels, _, _ = decode_image(encode(im, "PNG"), 40)
    assert pixels[:, :18].max() == 0
    assert pixels[:, 22:].min() == 255


def test_palette_image_with_and_without_transparency():
    pal = halves((40, 40), 10, 200, "RGB").convert("P")
    assert pal.mode == "P"
    pixels, _, _ = decode_image(encode(pal, "PNG"), 40)
    assert abs(int(pixels[:, :18].mean()) - 10) <= 2 and abs(int(pixels[:, 22:].mean()) - 200) <= 2
    gif = Image.new("P", (40, 40), 1)
    gif.putpalette([0, 0, 0, 50, 50, 50] + [0] * 762)
    gif.paste(0, (0, 0, 20, 40))
    pixels, _, _ = decode_image(encode(gif, "GIF", transparency=0), 40)
    assert pixels[:, :18].min() == 255  # transparent index -> white
    assert abs(int(pixels[:, 22:].mean()) - 50) <= 2


def test_cmyk_jpeg():
    im = halves((64, 64), 0, 255, "RGB").convert("CMYK")
    assert im.mode == "CMYK"
    pixels, width, height = decode_image(encode(im, "JPEG", quality=95), 32)
    assert (width, height) == (64, 64)
    assert pixels[:, :12].mean() < 30 and pixels[:, -12:].mean() > 225


def test_16_bit_png_is_scaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels, _, _ = decode_image(data, 64)
    assert pixels[:, 0].max() <= 2 and pixels[:, -1].min() >= 253
    assert 100 < pixels[:, 32].mean() < 160  # the middle of the ramp stays in the middle


def test_grayscale_with_alpha_and_float_modes():
    la = Image.new("LA", (20, 20), (0, 0))  # transparent black -> white
    assert decode_image(encode(la, "PNG"), 20)[0].min() == 255
    f = Image.fromarray(np.linspace(-1, 1, 400, dtype=np.float32).reshape(20, 20), "F")
    pixels, _, _ = decode_image(encode(f, "TIFF"), 20)
    assert pixels.min() == 0 and pixels.max() == 255


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_applied(orientation):
    # stored 80 wide x 40 high: left half black, right half white
    im = halves((80, 40), 0, 255, "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    pixels, width, height = decode_image(encode(im, "JPEG", exif=exif, quality=95), 40)
    if orientation == 3:  # 180 degrees: white on the left now
        assert (width, height) == (80, 40)
        assert pixels[:, :15].mean() > 225 and pixels[:, -15:].mean() < 30
        return
    assert (width, height) == (40, 80)  # upright it is portrait
    top, bottom = pixels[:15].mean(), pixels[-15:].mean()
    if orientation == 6:  # displayed rotated 90 degrees clockwise: the left half goes to the top
        assert top < 30 and bottom > 225
    else:  # 8: counter-clockwise, the left half goes to the bottom
        assert top > 225 and bottom < 30


def test_non_square_image_is_centre_cropped():
    arr = np.zeros((40, 120), dtype=np.uint8)
    arr[:, 40:80] = 255  # the middle third
    pixels, width, height = decode_image(encode(Image.fromarray(arr), "PNG"), 40)
    assert (width, height) == (120, 40)
    assert pixels[:, 2:-2].min() > 200  # the centre square is all white


def test_big_photo_decodes_fast_at_reduced_scale():
    big = Image.radial_gradient("L").resize((6000, 4000)).convert("RGB")
    data = encode(big, "JPEG", quality=80)
    start = time.perf_counter()
    pixels, width, height = decode_image(data, 48)
    draft = time.perf_counter() - start
    start = time.perf_counter()
    Image.open(io.BytesIO(data)).convert("L")
    full = time.perf_counter() - start
    assert pixels.shape == (48, 48) and (width, height) == (6000, 4000)
    # draft mode decodes at 1/8 scale: a fraction of the work of a full 24-Mpx decode
    assert draft < full / 3, f"decode_image took {draft:.2f} s, a full decode {full:.2f} s: no draft mode?"


# --------------------------------------------------------------------------------------------
# decode_image: files that do not decode, each with a short reason


def test_zero_byte_file():
    with pytest.raises(ImageError, match="empty file"):
        decode_image(b"", 48)


def test_text_renamed_to_jpg():
    with pytest.raises(ImageError, match="not an image") as info:
        decode_image(b"name,label\nface.jpg,happy\n", 48)
    assert "0x" not in str(info.value)  # no memory address in a reason that lands in the output


def corrupt_jpeg() -> bytes:
    """A JPEG with intact headers and random bytes for its scan data."""
    data = encode(Image.effect_noise((64, 64), 64), "JPEG")
    start = data.index(b"\xff\xda") + 14  # past the start-of-scan header
    noise = np.random.default_rng(0).integers(0, 256, len(data) - start - 2, dtype=np.uint8).tobytes()
    return data[:start] + noise + data[-2:]


def test_corrupt_jpeg():
    with pytest.raises(ImageError, match="cannot decode image"):
        decode_image(corrupt_jpeg(), 48)


def test_garbled_header():
    data = encode(halves((64, 64), 0, 255), "JPEG")
    with pytest.raises(ImageError, match="not an image"):
        decode_image(data[:20] + bytes(range(256)) * 4, 48)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(fmt):
    data = encode(Image.effect_noise((64, 64), 64), fmt)
    with pytest.raises(ImageError, match="(?i)truncated"):
        decode_image(data[: len(data) // 2], 48)


def test_decompression_bomb_is_refused_before_decoding():
    data = png_header_only(20_000, 20_000)  # 400 Mpx claimed in a ~100-byte file
    start = time.perf_counter()
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(data, 48)
    assert time.perf_counter() - start < 0.5


def test_bomb_just_over_the_warning_limit_is_refused_too():
    side = int((Image.MAX_IMAGE_PIXELS + 1) ** 0.5) + 1  # past PIL's warning, below its hard error
    assert side * side < 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(png_header_only(side, side), 48)


def test_fer_jpeg_fast_path_matches_the_general_path(fer_root):
    """FER2013's own 48x48 gray JPEGs skip the crop-and-resize; the pixels are PIL's own decode."""
    for path in list((fer_root / "val" / "sad").glob("*.jpg"))[:20]:
        pixels, _, _ = decode_image(path.read_bytes(), 48)
        with Image.open(path) as im:
            assert np.array_equal(pixels, np.asarray(im.convert("L")))


def test_decode_stage_imports_no_torch():
    """Read-and-decode workers import ray_fer.label.datasets; without torch they start in a fraction of a second."""
    code = "import sys, ray_fer.label.datasets, ray_fer.label.decode; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_postscript_named_jpg_never_reaches_the_eps_decoder():
    """Untrusted stores: PIL would hand this file to its EPS plugin, which runs Ghostscript."""
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
           b"newpath 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n")
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # what an unrestricted open() would do
    with pytest.raises(ImageError, match="not an image, or not one of the formats read: JPEG, PNG"):
        decode_image(eps, 48)


def test_every_listed_extension_has_its_decoder():
    from ray_fer.label.decode import FORMATS, IMAGE_EXTENSIONS

    registered = Image.registered_extensions()
    assert {registered[ext] for ext in IMAGE_EXTENSIONS} == set(FORMATS)
