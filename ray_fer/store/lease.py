"""One run at a time in a folder (a labelled output, a training run): the `_LEASE` file, its
heartbeat, its takeover, and the fence that every commit step passes.

`_LEASE` is JSON: the run that holds the folder (run id, host, pid, start time), a generation
that grows by one at every takeover, the holder's last heartbeat (for people: ages are not
computed from it), and while a commit is being applied, its journal (`commit`, store/journal.py).

- **Taking it.** A run creates `_LEASE` where there is none (S3: `If-None-Match: *`; locally
  under the folder's flock). Where one exists, its age is measured on the store's clock (S3: the
  answer's `Date` less the object's `LastModified`; locally: the mtime of a file created now less
  the lease's mtime), so hosts whose clocks disagree agree on it. Younger than `lease_timeout()`:
  the run is refused with one line naming the holder. Older: the holder is presumed dead and the
  lease is taken over (a conditional write on the version read), keeping any commit it had begun,
  which the new holder finishes before anything else.
- **Keeping it.** A thread renews the lease every timeout/4 (at most every 15 s), each write
  conditional on the version this run wrote last: a run whose lease was taken over finds out at
  its next write.
- **The fence.** Each step that changes the folder (the commit point, every delete and move of
  the commit, `_SUCCESS`) runs inside `fence()`. Locally the step runs under the folder's flock
  after checking that the lease is still this run's version: no other process can take the
  lease over in between, so a run that lost its lease changes nothing. On S3 the fence renews
  the lease conditionally just before the step; a run that stalls between that renewal and the
  step for longer than the timeout can still make that one step, after its successor has
  finished the commit it had begun. The steps are chosen so that such a late step changes
  nothing a successor wrote: `_SUCCESS` is deleted only if it is still the one the commit
  replaces (`DELETE If-Match`) and created only where there is none (`If-None-Match`), a move
  needs its source (gone after the successor's roll-forward), and the files a commit deletes
  were all replaced before the successor started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from ray_fer.store import storage
from ray_fer.config import UserError

log = logging.getLogger(__name__)

LEASE_FILE = "_LEASE"  # JSON naming the run that holds the folder
LEASE_TIMEOUT_S = 120.0  # a lease not renewed for longer (on the store's clock) belongs to a dead run
LEASE_TIMEOUT_ENV = "RAY_FER_LEASE_TIMEOUT_S"  # replaces LEASE_TIMEOUT_S (seconds), read at each run

# Tests: called with the step's name where a stall of the holder does the most harm (on S3 after
# the fence's renewal, just before the step; locally just before the fence takes the flock);
# None in normal runs.
stall_hook: Callable[[str], None] | None = None


class LeaseError(UserError):
    """A folder another run holds, or a run that lost its hold; the message names the run."""


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


def describe(holder: dict[str, Any]) -> str:
    return (f"run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')}, "
            f"started {holder.get('started')})")


class Lease:
    """This run's claim on a folder, kept alive by a heartbeat thread until `release()`.

    `pending` is the journal of a commit that the previous, dead holder had begun (or None): the
    new holder finishes it (`journal.apply`) before it changes anything else."""

    def __init__(self, folder: str, state: dict[str, Any], token: str, timeout: float, what: str) -> None:
        self.folder = folder
        self.uri = storage.join(folder, LEASE_FILE)
        self.state = state  # the lease's JSON, less the heartbeat
        self.timeout = timeout
        self.what = what
        self.lost: str | None = None  # why this run no longer holds the lease
        self.pending: dict[str, Any] | None = state.get("commit")
        self.made: str | None = None  # locally: the top folder `acquire` had to make (removed if left empty)
        self.on_lost: Callable[[], None] | None = None  # called by the heartbeat thread once the lease is lost
        self._token = token
        self._lock = threading.RLock()  # the heartbeat thread and the fenced steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ray-fer-lease", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str:
        return self.state["run_id"]

    @property
    def generation(self) -> int:
        return int(self.state["generation"])

    @classmethod
    def acquire(cls, folder: str, run_id: str, *, what: str = "output", fix: str = "pick another --output") -> Lease:
        """Take the folder's lease; LeaseError naming the holder if a live run has it.

        `what` names the folder in messages ("output", "run folder"), `fix` says what else to do."""
        uri = storage.join(folder, LEASE_FILE)
        timeout = lease_timeout()
        mine = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        made = None if storage.is_remote(folder) else _first_missing(folder)
        with storage.locked(folder):
            for _ in range(3):  # another run may create or take the lease between our read and write
                current = storage.read_versioned(uri)
                state = mine | {"generation": 1}
                token = None
                if current is not None:
                    holder = _parse_lease(uri, current.data)
                    if current.age < timeout:
                        raise LeaseError(
                            f"{what} {folder!r} is in use by {describe(holder)}, last heartbeat {current.age:.0f} s "
                            f"ago; wait for it to end or {fix} (a run that died stops counting {timeout:.0f} s "
                            f"after its last heartbeat, see {LEASE_FILE})")
                    log.warning("taking over the lease on %s from %s: its last heartbeat is %.0f s old on the "
                                "store's clock, over the %.0f s timeout (%s), so that run is presumed dead",
                                folder, describe(holder), current.age, timeout, LEASE_TIMEOUT_ENV)
                    state["generation"] = int(holder.get("generation", 0)) + 1
                    if holder.get("commit"):  # the dead run's begun commit stays until it is finished
                        state["commit"] = holder["commit"]
                    token = current.token
                new_token = storage.write_if_unchanged(uri, _encode(state), token)
                if new_token is None:
                    continue
                if storage.is_remote(uri):
                    try:
                        _check_store_honours_conditions(uri, new_token, run_id)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            storage.delete_if_unchanged(uri, new_token)
                        raise
                lease = cls(folder, state, new_token, timeout, what)
                lease.made = made
                return lease
        raise LeaseError(f"{what} {folder!r}: another run keeps taking its lease ({LEASE_FILE}); make sure only "
                         "one job writes into it, then run again")

    # -- keeping it --------------------------------------------------------------------------

    def renew(self) -> None:
        """Write the lease again if it is still ours; LeaseError if another run took it."""
        with self._lock:
            self._write(self.state)

    def _write(self, state: dict[str, Any]) -> None:
        """Replace the lease with `state` if it is still our version (under the folder's lock
        locally); on success `state` is the lease. LeaseError if the lease is lost."""
        with self._lock, storage.locked(self.folder):
            if self.lost is None:
                token = storage.write_if_unchanged(self.uri, _encode(state), self._token)
                if token is None:
                    current = storage.read_versioned(self.uri)
                    holder = _parse_lease(self.uri, current.data) if current else {}
                    self.lost = (f"taken over by {describe(holder)}" if holder else
                                 "taken over by another run that has finished since, or deleted")
                else:
                    self._token, self.state = token, state
            if self.lost is not None:
                raise LeaseError(f"run {self.run_id} lost its lease on {self.what} {self.folder!r} ({self.lost}), "
                                 "so it changes nothing more there: make sure only one job writes into it, then "
                                 "run again")

    @contextlib.contextmanager
    def fence(self, step: str = "") -> Iterator[None]:
        """Run one step that changes the folder only while this run holds the lease (see the
        module's docstring for what that means locally and on S3). LeaseError if it does not."""
        remote = storage.is_remote(self.folder)
        if stall_hook is not None and not remote:
            stall_hook(step)  # locally a stall inside the flock would only keep the successor waiting
        with self._lock, storage.locked(self.folder):
            if remote or self.lost is not None:
                self._write(self.state)  # the store checks the version: a lost lease fails here
            else:  # under the flock nobody can take the lease over: checking it is enough
                current = storage.read_versioned(self.uri)
                if current is None or current.token != self._token:
                    self._write(self.state)  # fails, and says who took it
            if stall_hook is not None and remote:
                stall_hook(step)  # the worst place on S3: between the renewal and the step
            yield

    def begin_commit(self, journal: dict[str, Any]) -> None:
        """The commit point: the journal goes into the lease, in one conditional write."""
        with self.fence("commit"):
            self._write(self.state | {"commit": journal})
        self.pending = journal

    def end_commit(self) -> None:
        """The commit's journal has been carried out: take it out of the lease."""
        with self.fence("end"):
            self._write({k: v for k, v in self.state.items() if k != "commit"})
        self.pending = None

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, unless another run holds it now."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            if self.lost is not None:
                return
            try:
                with storage.locked(self.folder):
                    storage.delete_if_unchanged(self.uri, self._token)
                    self._remove_made_folders()
            except Exception as e:  # noqa: BLE001 - must not hide the run's own error
                log.warning("could not delete %s (%s); it stops blocking other runs %.0f s after its last "
                            "heartbeat", self.uri, storage.short_error(e), self.timeout)

    def _remove_made_folders(self) -> None:
        """Locally, the folders `acquire` made, if they are still empty: a run that failed
        before writing anything leaves nothing behind."""
        if self.made is None:
            return
        folder = os.path.abspath(self.folder)
        with contextlib.suppress(OSError):
            while True:
                os.rmdir(folder)
                if folder == self.made:
                    break
                folder = os.path.dirname(folder)

    def _beat(self) -> None:
        interval = min(15.0, self.timeout / 4)
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LeaseError as e:
                log.warning("%s", e)
                if self.on_lost is not None:
                    self.on_lost()
                return
            except Exception as e:  # noqa: BLE001 - a network hiccup: the next beat tries again
                log.warning("could not renew the lease on %s (%s); trying again in %.0f s",
                            self.folder, storage.short_error(e), interval)

    def stop_heartbeat(self) -> None:
        """Stop renewing (what a crash or a stall does to the heartbeat); for tests."""
        self._stop.set()
        self._thread.join()


def _first_missing(folder: str) -> str | None:
    """The outermost folder of `folder`'s path that does not exist yet (None: it exists)."""
    path, missing = os.path.abspath(os.path.expanduser(folder)), None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _encode(state: dict[str, Any]) -> bytes:
    return json.dumps(state | {"heartbeat": _now()}, indent=2).encode()


def _parse_lease(uri: str, data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
        if not isinstance(holder, dict) or "run_id" not in holder:
            raise ValueError
        return holder
    except ValueError:
        raise LeaseError(f"{uri!r} is not a ray-fer lease; delete it if no job is writing into this folder, "
                         "then run again") from None


def _check_store_honours_conditions(uri: str, token: str, run_id: str) -> None:
    """A store that ignores If-None-Match would let two runs in: creating a probe object twice
    must fail the second time. Then the lease is read back: it must still be the one written."""
    probe = f"{uri}.probe-{run_id}"
    try:
        first = storage.write_if_unchanged(probe, b"probe", None)
        again = storage.write_if_unchanged(probe, b"probe", None)
    finally:
        with contextlib.suppress(Exception):
            storage.delete_file(probe)
    if first is None or again is not None:
        raise storage.StorageError(
            f"the store behind {uri!r} ignores conditional writes (a PUT with If-None-Match: * replaced an "
            "existing object), so it cannot keep two runs apart; use a store that honours them (AWS S3 and "
            "Ceph RGW do)")
    current = storage.read_versioned(uri)
    if current is None or current.token != token or _parse_lease(uri, current.data).get("run_id") != run_id:
        raise LeaseError(f"{uri!r} was taken by another run as this one started; run again")
