"""Where a machine's CPU time goes while a job runs, per process kind (Linux /proc).

`ProcSampler` samples every process's user and system CPU seconds and minor page faults (memory
touched for the first time) every `interval` seconds inside a `with` block, and `table()` sums
them per kind: Ray names its workers after what they run ("ray::MapWorker(MapBatches(
FacePredictorActor))", "ray::MapBatches(decode_photos)", ...; a worker counts under the last task
it was seen running, "ray::IDLE" only if it was never seen busy), and Ray's own daemons (raylet,
gcs_server, the dashboard agents) are named by their command. A process that ends between two
samples loses what it used after the last one, so keep `interval` short against task lengths.

    python bench/procstat.py -- ray-fer infer --input clip.mp4 --output out/
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict

TICK = os.sysconf("SC_CLK_TCK")
PAGE_FAULT_KINDS = ("minflt",)


def _kind(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    cmd = argv[0].decode(errors="replace") if argv and argv[0] else ""
    if cmd.startswith("ray::"):
        name = cmd.split(" ")[0]
        return re.sub(r"\(\)$", "", name) if name != "ray::IDLE" else "ray::IDLE (worker between tasks)"
    joined = b" ".join(argv).decode(errors="replace")
    for daemon in ("raylet", "gcs_server", "dashboard_agent", "runtime_env/agent", "log_monitor", "monitor.py",
                   "dashboard.py", "plasma"):
        if daemon in joined:
            return f"ray {daemon.split('/')[0].replace('.py', '')}"
    base = os.path.basename(cmd)
    if base.startswith("python"):
        script = next((a.decode(errors="replace") for a in argv[1:] if not a.startswith(b"-")), "")
        return f"python {os.path.basename(script)}".strip()
    return base or None


def _stat(pid: int) -> tuple[float, float, int] | None:
    """(user s, system s, minor faults) of one process, children not included."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) / TICK, int(fields[12]) / TICK, int(fields[7])


class ProcSampler:
    """Per-process CPU seconds and minor page faults, sampled in a thread inside a `with` block."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.first: dict[int, tuple[float, float, int]] = {}
        self.last: dict[int, tuple[float, float, int]] = {}
        self.kinds: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.seconds = 0.0

    def __enter__(self) -> "ProcSampler":
        self._sample(initial=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = time.perf_counter() - self._t0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self, initial: bool = False) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            stat = _stat(pid)
            if stat is None:
                continue
            kind = _kind(pid)  # a Ray worker's title changes with the task it runs: the latest task counts
            if kind and not (kind.startswith("ray::IDLE") and pid in self.kinds):
                self.kinds[pid] = kind
            if pid not in self.first:
                self.first[pid] = stat if initial else (0.0, 0.0, 0)
            self.last[pid] = stat

    def totals(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = defaultdict(lambda: {"user_s": 0.0, "sys_s": 0.0, "minflt": 0.0, "procs": 0})
        for pid, last in self.last.items():
            first = self.first[pid]
            user, system, faults = (last[0] - first[0], last[1] - first[1], last[2] - first[2])
            if user + system < 0.01 and faults == 0:
                continue
            row = out[self.kinds.get(pid, "?")]
            row["user_s"] += user
            row["sys_s"] += system
            row["minflt"] += faults
            row["procs"] += 1
        return dict(out)

    def table(self) -> str:
        rows = sorted(self.totals().items(), key=lambda kv: -(kv[1]["user_s"] + kv[1]["sys_s"]))
        cpu = sum(r["user_s"] + r["sys_s"] for _, r in rows)
        lines = [f"{self.seconds:.1f} s wall, {cpu:.1f} CPU-s ({cpu / max(self.seconds, 1e-9):.2f} cores busy)",
                 f"{'process kind':58} {'procs':>5} {'user s':>8} {'sys s':>7} {'minor faults':>13} {'MB touched':>10}"]
        for kind, r in rows:
            lines.append(f"{kind[:58]:58} {r['procs']:5d} {r['user_s']:8.1f} {r['sys_s']:7.1f} {int(r['minflt']):13,d} "
                         f"{r['minflt'] * 4096 / 1e6:10,.0f}")
        return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit(__doc__)
    with ProcSampler() as sampler:
        rc = subprocess.call(argv)
    print(sampler.table())
    sys.exit(rc)


if __name__ == "__main__":
    main()
