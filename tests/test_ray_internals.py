"""Ray's non-public names that ray-fer uses are all in ray_fer/ray_internals.py: they are where
it expects them in this Ray, and nothing else in the package reaches into Ray's internals."""

from __future__ import annotations

import re
from pathlib import Path

import ray_fer
from ray_fer import ray_internals

PACKAGE = Path(ray_fer.__file__).parent
# ray._private / ray.*._internal modules, or a private attribute of a Ray object
PRIVATE = re.compile(r"\bray(\.\w+)*\._(private|internal|raylet)\b|DataContext\.\w*\._|context\._\w+")


def test_the_internal_names_are_where_this_ray_has_them():
    assert ray_internals.check() == []


def test_the_run_ahead_setting_applies_and_is_restored():
    import ray.data

    context = ray.data.DataContext.get_current()
    before = getattr(context, ray_internals.STREAMING_RUN_AHEAD)
    with ray_internals.streaming_run_ahead(before + 30):
        assert getattr(ray.data.DataContext.get_current(), ray_internals.STREAMING_RUN_AHEAD) == before + 30
    assert getattr(context, ray_internals.STREAMING_RUN_AHEAD) == before


def test_no_other_module_reaches_into_rays_internals():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "ray_internals.py" and PRIVATE.search(p.read_text())]
    assert offenders == [], f"use ray_fer/ray_internals.py for Ray's non-public names: {offenders}"
