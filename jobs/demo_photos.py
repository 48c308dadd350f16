"""Photos for `make demo` that need no download: the portrait of Grace Hopper that matplotlib
ships (a US Navy photograph, public domain), as it is, mirrored, two copies side by side (two
faces in one photo), small (a face of ~60 px) and a picture without a face (matplotlib's logo).

    python jobs/demo_photos.py OUT_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

from matplotlib import cbook
from PIL import Image, ImageOps


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        portrait = im.convert("RGB")
    portrait.save(out / "portrait.jpg", quality=92)
    ImageOps.mirror(portrait).save(out / "mirrored.jpg", quality=92)
    pair = Image.new("RGB", (portrait.width * 2 + 40, portrait.height), "white")
    pair.paste(portrait, (0, 0))
    pair.paste(ImageOps.mirror(portrait), (portrait.width + 40, 0))
    pair.save(out / "two-faces.jpg", quality=92)
    portrait.resize((portrait.width // 4, portrait.height // 4), Image.Resampling.LANCZOS).save(out / "small.jpg")
    with Image.open(cbook.get_sample_data("logo2.png")) as logo:
        logo.convert("RGB").save(out / "no-face.jpg", quality=92)
    print(f"wrote 5 photos to {out}")


if __name__ == "__main__":
    main()
