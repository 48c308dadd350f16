"""The --faces choices and the face detector's installation check, without torch: the driver of a
labelling job checks them before any cluster work, and imports no torch (model_ref.py says why).
The detector itself is faces/detector.py."""

from __future__ import annotations

import importlib.util
import os

from ray_fer.config import UserError

FACE_MODES = ("auto", "detect", "whole")
DETECT_SIZE = 640  # long side of the detection copy: 2x faster than 1024 at the same recall (docs/labelling.md)
INSTALL = "install it with pip install facenet-pytorch==2.5.3, or label face crops with --faces whole"


class DetectorError(UserError):
    """The face detector cannot be loaded; the message says how to install it."""


def check_faces(mode: str) -> None:
    """Refuse an unknown --faces value where the user gave it, naming the choices."""
    if mode not in FACE_MODES:
        raise UserError(f"unknown --faces {mode!r}; choose one of: {', '.join(FACE_MODES)}")


def check_detector() -> None:
    """Fail fast, before any cluster work, where facenet-pytorch or its packaged weights are
    missing (found without importing the package, which imports torch)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or spec.origin is None:
        raise DetectorError(f"face detection needs facenet-pytorch, which is not installed; {INSTALL}")
    weights_folder(spec.origin)


def weights_folder(package_file: str) -> str:
    """The folder of MTCNN's weights beside facenet-pytorch's `package_file` (its __init__.py);
    DetectorError naming the fix where any of the three is missing."""
    data = os.path.join(os.path.dirname(package_file), "data")
    missing = [f for f in ("pnet.pt", "rnet.pt", "onet.pt") if not os.path.isfile(os.path.join(data, f))]
    if missing:
        raise DetectorError(f"the MTCNN weights {', '.join(missing)} are missing from {data}, which the "
                            "facenet-pytorch wheel ships; reinstall it: pip install --force-reinstall "
                            "--no-deps facenet-pytorch==2.5.3")
    return data
