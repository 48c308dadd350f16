"""Every use of Ray's non-public names, in one place: where a public API does the job it is used
instead; what remains is here, each with what it is for, and `check()` names what a Ray upgrade
moved (tests/test_ray_internals.py runs it, so an upgrade that breaks one fails there, with its
name, instead of silently changing behaviour).

- Ray Data's run-ahead of a streaming task (`DataContext._max_num_blocks_in_streaming_gen_buffer`,
  default 2): labelling lets decode tasks yield 32 small blocks before the driver takes them
  (label/inputs.py: one actor stood mostly idle with 2).
- Ray Train V2 logs "Reporting training result N" at INFO on a logger of an internal module,
  named by that module's file path: the quiet console sets that logger to WARNING.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Iterator

STREAMING_RUN_AHEAD = "_max_num_blocks_in_streaming_gen_buffer"  # a DataContext attribute
TRAIN_REPORT_MODULE = "ray.train.v2._internal.execution.context"  # its `logger` says the per-report line


@contextlib.contextmanager
def streaming_run_ahead(blocks: int) -> Iterator[None]:
    """Within the block, Ray Datasets created let each streaming task yield up to `blocks` blocks
    before the driver takes them (a dataset copies the DataContext when it is created)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = getattr(context, STREAMING_RUN_AHEAD)
    setattr(context, STREAMING_RUN_AHEAD, blocks)
    try:
        yield
    finally:
        setattr(context, STREAMING_RUN_AHEAD, saved)


def quiet_train_reporting() -> None:
    """Ray Train V2's per-report INFO line off the console (nothing, where this Ray lacks it:
    `check()` says so in the tests)."""
    logger = getattr(_train_report_module(), "logger", None)
    if isinstance(logger, logging.Logger):
        logger.setLevel(logging.WARNING)


def _train_report_module():
    try:
        return importlib.import_module(TRAIN_REPORT_MODULE)
    except ImportError:
        return None


def check() -> list[str]:
    """What this Ray lacks of the names above, one line each naming it and its use; [] when all
    are where this module expects them."""
    import ray.data

    problems = []
    if not hasattr(ray.data.DataContext.get_current(), STREAMING_RUN_AHEAD):
        problems.append(f"ray.data.DataContext has no {STREAMING_RUN_AHEAD} (Ray {ray.__version__}): labelling's "
                        "decode tasks can no longer run ahead of the driver; find its new name or a public setting")
    if not isinstance(getattr(_train_report_module(), "logger", None), logging.Logger):
        problems.append(f"{TRAIN_REPORT_MODULE} or its `logger` is gone (Ray {ray.__version__}): 'Reporting "
                        "training result' lines will reach the quiet console; find where Ray Train logs them now")
    return problems
