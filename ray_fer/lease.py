"""One run at a time on an output: the `_LEASE` file, its heartbeat and its takeover.

A run creates `<output>/_LEASE` (JSON: run id, host, pid, start time, heartbeat) where there is
none, atomically (`storage.write_if_unchanged`: link() locally, `If-None-Match: *` on S3), and
reads it back. While another run's heartbeat is younger than `lease_timeout()`, a new run is
refused with one line naming that run; an older lease belongs to a dead run and is taken over
with a warning. A thread renews the heartbeat every timeout/4 (at most every 15 s), each write
conditional on the lease being unchanged, so a run whose lease was taken over finds out before
it commits. What remains possible: a store that ignores conditional writes can let two runs
that start within a fraction of a second both in; a run stalled past the timeout just before
its commit can commit beside its successor. Either leaves repeated rows, which the next
--skip-existing run drops.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from ray_fer import storage
from ray_fer.config import UserError

log = logging.getLogger(__name__)

LEASE_FILE = "_LEASE"  # JSON naming the run that holds the output
LEASE_TIMEOUT_S = 120.0  # a lease whose heartbeat is older belongs to a dead run
LEASE_TIMEOUT_ENV = "RAY_FER_LEASE_TIMEOUT_S"  # replaces LEASE_TIMEOUT_S (seconds), read at each run


class LeaseError(UserError):
    """An output another run holds, or a run that lost its hold; the message names the run."""


def lease_timeout() -> float:
    raw = os.environ.get(LEASE_TIMEOUT_ENV, "").strip()
    if not raw:
        return LEASE_TIMEOUT_S
    try:
        return float(raw)
    except ValueError:
        raise LeaseError(f"{LEASE_TIMEOUT_ENV}={raw!r} is not a number of seconds such as 120") from None


def new_run_id() -> str:
    """Sortable and unique: the UTC start time and 6 random hex digits."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _describe(owner: dict[str, Any]) -> str:
    return (f"run {owner.get('run_id')} (host {owner.get('host')}, pid {owner.get('pid')}, "
            f"started {owner.get('started')})")


def _heartbeat_age(owner: dict[str, Any]) -> float:
    return time.time() - datetime.fromisoformat(owner["heartbeat"]).timestamp()


class Lease:
    """This run's claim on an output, kept alive by a heartbeat thread until `release()`."""

    def __init__(self, dst: str, owner: dict[str, Any], token: str, timeout: float) -> None:
        self.dst = dst
        self.uri = storage.join(dst, LEASE_FILE)
        self.owner = owner
        self.timeout = timeout
        self.lost: str | None = None  # why this run no longer holds the lease
        self._token = token
        self._lock = threading.Lock()  # the heartbeat thread and renew() before the commit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ray-fer-lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, dst: str, run_id: str) -> Lease:
        """Take the output's lease; LeaseError naming the holder if a live run has it."""
        uri = storage.join(dst, LEASE_FILE)
        timeout = lease_timeout()
        owner = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        for _ in range(3):  # another run may create or take the lease between our read and write
            current = storage.read_versioned(uri)
            token = None
            if current is not None:
                holder = _parse_lease(uri, current[0])
                age = _heartbeat_age(holder)
                if age < timeout:
                    raise LeaseError(
                        f"output {dst!r} is in use by {_describe(holder)}, last heartbeat {age:.0f} s ago; "
                        f"wait for it to end or pick another --output (a run that died stops counting "
                        f"{timeout:.0f} s after its last heartbeat, see {LEASE_FILE})")
                log.warning("taking over the lease on %s from %s: its last heartbeat is %.0f s old, over the "
                            "%.0f s timeout (%s), so that run is presumed dead",
                            dst, _describe(holder), age, timeout, LEASE_TIMEOUT_ENV)
                token = current[1]
            data = json.dumps(owner | {"heartbeat": _now()}, indent=2).encode()
            new_token = storage.write_if_unchanged(uri, data, token)
            if new_token is not None and _still_ours(uri, run_id):
                return cls(dst, owner, new_token, timeout)
        raise LeaseError(f"output {dst!r}: another run keeps taking its lease ({LEASE_FILE}); "
                          "make sure only one job labels into it, then run again")

    def renew(self) -> None:
        """Write a new heartbeat if the lease is still ours; LeaseError if another run took it."""
        with self._lock:
            if self.lost is None:
                data = json.dumps(self.owner | {"heartbeat": _now()}, indent=2).encode()
                token = storage.write_if_unchanged(self.uri, data, self._token)
                if token is None:
                    current = storage.read_versioned(self.uri)
                    holder = _parse_lease(self.uri, current[0]) if current else {}
                    self.lost = f"taken over by {_describe(holder)}" if holder else "deleted"
                else:
                    self._token = token
            if self.lost is not None:
                raise LeaseError(f"run {self.owner['run_id']} lost its lease on {self.dst!r} ({self.lost}), "
                                  "so it commits nothing: make sure only one job labels into an output, then "
                                  "run again with --skip-existing")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, unless another run holds it now."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            if self.lost is not None:
                return
            try:
                current = storage.read_versioned(self.uri)
                if current is not None and current[1] == self._token:
                    storage.delete_file(self.uri)
            except Exception as e:  # noqa: BLE001 - must not hide the run's own error
                log.warning("could not delete %s (%s); it stops blocking other runs %.0f s after its last "
                            "heartbeat", self.uri, storage.short_error(e), self.timeout)

    def _beat(self) -> None:
        interval = min(15.0, self.timeout / 4)
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LeaseError as e:
                log.warning("%s", e)
                return
            except Exception as e:  # noqa: BLE001 - a network hiccup: the next beat tries again
                log.warning("could not renew the lease on %s (%s); trying again in %.0f s",
                            self.dst, storage.short_error(e), interval)


def _parse_lease(uri: str, data: bytes) -> dict[str, Any]:
    try:
        owner = json.loads(data)
        _heartbeat_age(owner)
        return owner
    except (ValueError, KeyError, TypeError):
        raise LeaseError(f"{uri!r} is not a ray-fer lease; delete it if no job is labelling into this output, "
                          "then run again") from None


def _still_ours(uri: str, run_id: str) -> bool:
    # read back what the store holds: catches a race on stores that ignore conditional writes
    current = storage.read_versioned(uri)
    return current is not None and _parse_lease(uri, current[0]).get("run_id") == run_id
