"""Shrink a folder of wheels so that it travels to a lent GPU machine (64 MiB with the working tree).

Ray's and PyAV's wheels alone are about 79 MB as published (after `device-wheels` drops Ray's jars).
This rewrites each wheel in place: shared libraries and executables stripped of their symbol tables
(`strip --strip-unneeded`; Ray ships its raylet, GCS server and _raylet.so unstripped), Ray Serve and
Ray LLM left out (ray-fer uses neither), and every member compressed with LZMA instead of deflate.
Measured on Ray 2.60.0 and PyAV 18.1.0: 43.5 -> 27.2 MB and 35.8 -> 20.7 MB; both still import,
PyAV still encodes and decodes H.264, and Ray's binaries still start.

    ../shared/tools/device-wheels .whl facenet-pytorch==2.5.3 av==18.1.0
    python bench/pack_device_wheels.py .whl
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import zipfile
from pathlib import Path

DROP = ("ray/serve/", "ray/llm/")


def pack(wheel: Path) -> tuple[int, int]:
    """Rewrite one wheel in place; returns its (old, new) size in bytes."""
    before = wheel.stat().st_size
    packed = wheel.with_suffix(".packing")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_LZMA) as dst:
        for info in src.infolist():
            if info.filename.startswith(DROP):
                continue
            data = src.read(info)
            if data[:4] == b"\x7fELF":
                data = _stripped(data)
            dst.writestr(info, data, zipfile.ZIP_LZMA)  # the ZipInfo keeps each file's mode (executables stay so)
    packed.replace(wheel)
    return before, wheel.stat().st_size


def _stripped(data: bytes) -> bytes:
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    try:
        subprocess.run(["strip", "--strip-unneeded", f.name], check=True, capture_output=True)
        return Path(f.name).read_bytes()
    finally:
        os.unlink(f.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="the folder of wheels (e.g. .whl)")
    ap.add_argument("--min-mb", type=float, default=5.0, help="repack only wheels at least this big (MB)")
    args = ap.parse_args()
    total = 0
    for wheel in sorted(args.folder.glob("*.whl")):
        if wheel.stat().st_size >= args.min_mb * 1e6:
            before, after = pack(wheel)
            print(f"{wheel.name}: {before / 1e6:.1f} -> {after / 1e6:.1f} MB", flush=True)
        total += wheel.stat().st_size
    print(f"{args.folder}: {total / 2**20:.1f} MiB in all")


if __name__ == "__main__":
    main()
