"""The console: what a command prints, on the driver and forwarded from Ray's workers.

By default a command prints ray-fer's own INFO lines (from the driver, and from Ray's workers,
which Ray forwards), WARNING and above from every library, one progress display, and the JSON
summary last. Ray's own chatter -- Ray Data's execution plans and progress bars, Ray Train's
"Checkpoint successfully created" and per-report lines, deprecation notes, "Started a local Ray
instance" -- stays in Ray's session logs (/tmp/ray/session_latest/logs). With `verbose` (`ray-fer
-v ...`) Ray's console output is back and ray-fer logs at DEBUG.

`setup()` runs first, before anything imports Ray: some of Ray's settings are environment
variables read once at `import ray`. Workers get the same settings through `ray_init_kwargs()`
(environment variables plus `setup_worker`, Ray's worker_process_setup_hook), so this works for a
local instance and for a Ray job on a cluster alike.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from typing import Any, TextIO

from ray_fer import ray_internals

PACKAGE = "ray_fer"
VERBOSE_ENV = "RAY_FER_VERBOSE"
# The driver's copy of this C++ line is printed by Ray's core worker straight to stderr, out of
# reach; the copy Ray Train's controller relays is dropped here. Ray Data's and Train's own actors
# are restartable and their arguments live as long as the job: nothing for a user to do.
_NOT_ACTIONABLE = r"has constructor arguments in the object store"
_QUIET_ENV = {
    "RAY_DISABLE_WORKER_LOG_PREFIX": "1",  # "(MapWorker(MapBatches(PredictorActor)) pid=123)" before every line
    "RAY_DEDUP_LOGS_SKIP_REGEX": _NOT_ACTIONABLE,
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # MLflow's own INFO lines ("Creating initial MLflow database tables...")
}


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet() -> bool:
    """True where a ray-fer entry point asked for the quiet console (library callers keep Ray's)."""
    return os.environ.get(VERBOSE_ENV) == "0"


def setup(verbose: bool = False) -> None:
    """Configure this process's logging and Ray's console settings; call before importing Ray."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    for key, value in _QUIET_ENV.items():
        if verbose:
            os.environ.pop(key, None)
        else:
            os.environ.setdefault(key, value)
    root = logging.getLogger()
    if verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    elif not root.handlers:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    _log_package(verbose)
    if "ray" in sys.modules:  # a caller that imported Ray first (a test, a notebook) still gets the rest
        quiet_ray_in_process()


class _Formatter(logging.Formatter):
    """INFO lines are the message itself; warnings and errors say so and where from."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname}: {message} [{record.name}]"
        return message


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (a test's capture, a redirect),
    not to the stream that was current when the handler was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass


def _log_package(verbose: bool) -> None:
    """ray-fer's loggers print to stderr at INFO (DEBUG when verbose), with a compact format."""
    log = logging.getLogger(PACKAGE)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:  # the root handler's format, with times and logger names
        log.propagate = True
        for h in [h for h in log.handlers if getattr(h, "_ray_fer", False)]:
            log.removeHandler(h)
        return
    if not any(getattr(h, "_ray_fer", False) for h in log.handlers):
        handler = _StderrHandler()
        handler._ray_fer = True  # type: ignore[attr-defined]
        handler.setFormatter(_Formatter("%(message)s"))
        log.addHandler(handler)
    log.propagate = False  # Ray Train workers put a console handler on the root logger too


class _DropReportedErrors(logging.Filter):
    """Ray Data's console copies of an error that ray-fer reports itself as one line
    (`storage.stop_on_read_errors`): "An exception was raised from a task of operator ...",
    "Exception occurred in Ray Data or Ray Core internal code" and their tracebacks (a generator
    UDF's errors reach Ray Data unwrapped, so it treats them as its own). Its log file keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ray_fer.store.storage import reported_in_task

        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or reported_in_task(exc) is None


class _DropMemoryAdvice(logging.Filter):
    """Ray Data's high-memory issue detector's console advice ("Operator 'MapBatches(decode_photos)'
    uses 645.4MiB of memory per worker ... consider setting `memory=...`", a dozen lines each,
    every 30 s): ray-fer sizes its stages itself (label/plan.py), so a user can act on none of it.
    The other detectors (a task hanging, a shuffle's aggregators unhealthy) still print. Its log
    file keeps them all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "issue_detect" not in record.name:
            return True
        text = " ".join(record.getMessage().split())  # the advice is wrapped over lines
        return "of memory per worker" not in text


def quiet_ray_in_process() -> None:
    """Ray's console chatter off in this process (driver or worker); its log files keep it all."""
    if not quiet():
        return
    import ray.data
    from ray.util.annotations import RayDeprecationWarning
    from ray.util.debug import log_once

    warnings.filterwarnings("ignore", category=RayDeprecationWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # "Progress bars disabled. To enable...": we did that
    for handler in logging.getLogger("ray.data").handlers:  # the console one; ray-data.log keeps DEBUG
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)
            for kind in (_DropReportedErrors, _DropMemoryAdvice):
                if not any(isinstance(f, kind) for f in handler.filters):
                    handler.addFilter(kind())
    ray_internals.quiet_train_reporting()  # "Reporting training result N"


def setup_worker() -> None:
    """Ray's worker_process_setup_hook: the driver's console settings in every worker process.

    Also names the worker's own cluster in RAY_ADDRESS: Ray looks its address up again in places
    (Ray Train's placement-group cleaner, a detached actor, calls the state API with "auto"), which
    fails with a traceback ("Found multiple active Ray instances") where another Ray instance runs
    on the machine, e.g. a second ray-fer command.

    It must never raise: a worker whose hook fails dies, and Ray retries its task for ever."""
    try:
        _log_package(verbose())
        quiet_ray_in_process()
        import ray

        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - see above
        pass


def ray_init_kwargs() -> dict[str, Any]:
    """What `ray.init` needs so that workers print as the driver does (see `cluster.connect`)."""
    env = {VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "")}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env,
                                              "worker_process_setup_hook": f"{__name__}.setup_worker"}}
    if quiet():
        kwargs["logging_level"] = logging.WARNING  # "Started a local Ray instance", "Connected to..."
    return kwargs


def train_logging_config():
    """Ray Train's own loggers: WARNING on the quiet console ("Checkpoint successfully created"
    is INFO); Ray's default elsewhere."""
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING") if quiet() else None


# --------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One progress display: "1,234/28,709 images (4%), 650/s, 39 s left".

    On a terminal one line is redrawn in place (at most every `interval` s); elsewhere (a job
    log, a pipe) a line is printed every `log_every` s, so logs stay short. `close()` prints the
    final line. Counts are clamped to the total: a retried task may report its rows twice. The
    total may grow (`update(done, total)`): a streamed listing finds its files as the job runs.
    """

    def __init__(self, total: int, *, what: str = "images", stream: TextIO | None = None,
                 interval: float = 0.5, log_every: float = 30.0) -> None:
        self.total, self.what = total, what
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if self.tty else log_every
        self.done = 0
        self.started = self.shown = time.monotonic()

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = max(total, self.total)
        self.done = min(max(done, self.done), self.total)
        now = time.monotonic()
        if now - self.shown >= self.interval:
            self.shown = now
            self._show()

    def close(self) -> None:
        self._show(final=True)

    def text(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        line = f"{self.done:,}/{self.total:,} {self.what} ({self.done / max(self.total, 1):.0%}), {rate:,.0f}/s"
        if 0 < self.done < self.total:
            line += f", {_duration((self.total - self.done) / rate)} left"
        elif self.done >= self.total:
            line += f", {_duration(elapsed)}"
        return line

    def _show(self, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.text() + ("\n" if final else ""))
        else:
            self.stream.write(self.text() + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class RayCounter:
    """A count that Ray tasks add to and the driver reads: the rows a pipeline has finished.

    A zero-CPU actor, so it fits on any cluster; tasks call `add.remote(n)` without waiting.
    `actor` reuses an actor that has `add(n)` and `get()` (one process fewer to start).
    """

    def __init__(self, actor: Any = None) -> None:
        import ray

        if actor is not None:
            self.actor = actor
            return

        @ray.remote(num_cpus=0)
        class _Count:
            def __init__(self) -> None:
                self.n = 0

            def add(self, n: int) -> None:
                self.n += n

            def get(self) -> int:
                return self.n

        self.actor = _Count.remote()

    def watch(self, progress: Progress, every: float = 0.5, total: Any = None) -> "_Watcher":
        """A context manager that feeds `progress` from this count while its block runs;
        `total`, a function, gives the total as it grows."""
        return _Watcher(self.actor, progress, every, total)


class _Watcher:
    def __init__(self, actor: Any, progress: Progress, every: float, total: Any = None) -> None:
        self.actor, self.progress, self.every, self.total = actor, progress, every, total
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ray-fer-progress", daemon=True)

    def _read(self) -> None:
        import ray

        total = self.total() if self.total is not None else None
        self.progress.update(ray.get(self.actor.get.remote(), timeout=30), total)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self._read()
            except Exception:  # noqa: BLE001 - a display must never fail the job
                pass

    def __enter__(self) -> Progress:
        self.thread.start()
        return self.progress

    def __exit__(self, exc_type, *_: Any) -> None:
        self.stop.set()
        self.thread.join()
        if exc_type is None:
            try:
                self._read()
            except Exception:  # noqa: BLE001
                pass
            self.progress.close()
        elif self.progress.tty:
            self.progress.stream.write("\n")
