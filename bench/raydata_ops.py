"""Where a Ray Data job's time went, per operator, read from the metrics Ray Data logs.

When an operator completes, Ray Data writes its metrics (DEBUG) to the session's
`logs/ray-data/ray-data-<dataset>.log`: tasks, rows, and the seconds its tasks spent in the map
function (`function_body_time_s`), preparing batches (`input_prep_time_s`), building and
serialising output blocks, and waiting to be scheduled. `tables_since(t)` prints them, one line
per operator, for each dataset that ran since `t` in this process's Ray session.
"""

from __future__ import annotations

import re
from pathlib import Path

KEYS = ("num_tasks_finished", "rows_outputs_of_finished_tasks", "function_body_time_s", "input_prep_time_s",
        "output_build_time_s", "block_serialization_time_s", "task_scheduling_time_s", "num_alive_actors")
_DONE = re.compile(r"Operator (\S+?)\[(.*?)\] completed\. Operator Metrics:\s*\n?(\{.*)")


def _logs_dir() -> Path:
    import ray

    node = ray._private.worker.global_worker.node  # noqa: SLF001 - the running session's folder
    return Path(node.get_logs_dir_path()) / "ray-data"


def tables_since(started: float) -> str:
    """The table of every dataset whose log was written since `started` (time.time()), oldest first."""
    logs = sorted((p for p in _logs_dir().glob("ray-data-dataset_*.log") if p.stat().st_mtime >= started),
                  key=lambda p: p.stat().st_mtime)
    return "\n".join(f"{p.stem.removeprefix('ray-data-')}:\n{table(dataset_ops(p))}" for p in logs)


def dataset_ops(log: Path) -> list[dict]:
    """Per operator of the dataset of one log file: its name and the KEYS that it logged."""
    text = log.read_text(errors="replace")
    ops = []
    for kind, name, metrics in _DONE.findall(text):
        row: dict = {"operator": name, "kind": kind.replace("MapOperator", "")}
        for key in KEYS:
            m = re.search(rf"'{key}': ([0-9.e+-]+)", metrics)
            row[key] = float(m.group(1)) if m else None
        ops.append(row)
    return ops


def table(ops: list[dict]) -> str:
    """The operators as aligned lines: tasks, rows, and seconds summed over their tasks."""
    lines = [f"{'operator':44} {'tasks':>6} {'rows':>9} {'udf s':>8} {'prep s':>7} {'out s':>6} {'ser s':>6} "
             f"{'sched s':>8}"]
    for op in ops:
        def f(key: str, width: int, digits: int = 1) -> str:
            v = op.get(key)
            return f"{v:{width}.{digits}f}" if v is not None else " " * (width - 1) + "-"

        lines.append(f"{op['operator'][:44]:44} {f('num_tasks_finished', 6, 0)} {f('rows_outputs_of_finished_tasks', 9, 0)} "
                     f"{f('function_body_time_s', 8)} {f('input_prep_time_s', 7)} {f('output_build_time_s', 6)} "
                     f"{f('block_serialization_time_s', 6)} {f('task_scheduling_time_s', 8)}")
    return "\n".join(lines)
