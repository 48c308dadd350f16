"""train.consistency_view=face: each training face as the face stage cuts it (ray_fer/faces/views.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ray_fer.faces.views import face_stage_views
from ray_fer.faces.detector import FaceDetector

from conftest import _fer_pixels


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector("cpu")


def test_views_are_the_face_stage_crops_of_the_same_faces(fer_root, detector):
    faces, _ = _fer_pixels(fer_root, "train", per_class=10)
    faces = faces.numpy()
    views, found = face_stage_views(faces, detector)
    assert views.shape == faces.shape and views.dtype == np.uint8 and found.dtype == bool
    # the detector finds about 7 in 8 FER2013 faces (measured: 86-87% of 420 and 480 train faces)
    assert 0.7 <= found.mean() <= 0.97, found.mean()
    assert np.array_equal(views[~found], faces[~found])  # not found: the face is its own view
    f, v = faces[found].astype(np.float64), views[found].astype(np.float64)
    # reframed, not copied: scale, place and the eyes' level change most pixels (measured: 48 gray
    # levels on average, from the frame's edges most) ...
    assert np.mean([np.abs(a - b).mean() for a, b in zip(f, v)]) > 10
    # ... of the same face: a view correlates with its own face, not with another's (measured: median
    # 0.61 against 0.09; its own face correlates best for 92% of views)
    own = np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(f, v)])
    other = np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(f, np.roll(v, 1, axis=0))])
    assert np.median(own) > 0.45 and np.median(other) < 0.25 and (own > other).mean() > 0.8, \
        (np.median(own), np.median(other), (own > other).mean())


def test_a_picture_without_a_face_is_its_own_view(detector):
    flat = np.full((2, 48, 48), 128, np.uint8)
    flat[1, :, 24:] = 30  # an edge, no face
    views, found = face_stage_views(flat, detector)
    assert not found.any() and np.array_equal(views, flat)
