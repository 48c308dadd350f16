"""The lease: one run at a time on an output, a heartbeat, and the takeover of a dead run's lease;
locally and on the loopback S3 server (conditional writes)."""

from __future__ import annotations

import json
import logging
import time

import pytest

from ray_fer import storage
from ray_fer.lease import LEASE_FILE, LEASE_TIMEOUT_ENV, Lease, LeaseError

from conftest import _one_line


def test_lease_refuses_a_second_run_and_is_taken_over_when_stale(dst, monkeypatch, caplog):
    monkeypatch.setenv(LEASE_TIMEOUT_ENV, "1.2")  # heartbeat every 0.3 s
    first = Lease.acquire(dst, "run-a")
    owner = json.loads(storage.read_bytes(storage.join(dst, LEASE_FILE)))
    assert {"run_id", "host", "pid", "started", "heartbeat"} <= set(owner) and owner["run_id"] == "run-a"
    time.sleep(1.5)  # longer than the timeout, but the heartbeat keeps the lease alive
    later = json.loads(storage.read_bytes(storage.join(dst, LEASE_FILE)))
    assert later["heartbeat"] > owner["heartbeat"]
    with pytest.raises(LeaseError) as e:
        Lease.acquire(dst, "run-b")
    assert f"output {dst!r} is in use by run run-a (host {owner['host']}, pid {owner['pid']}" in _one_line(e)

    first._stop.set()  # the first run dies: its heartbeat stops, its lease stays behind
    first._thread.join()
    time.sleep(1.3)
    with caplog.at_level(logging.WARNING, logger="ray_fer.lease"):
        second = Lease.acquire(dst, "run-b")
    assert "taking over the lease" in caplog.text and "run run-a" in caplog.text
    assert json.loads(storage.read_bytes(storage.join(dst, LEASE_FILE)))["run_id"] == "run-b"
    with pytest.raises(LeaseError, match="run run-a lost its lease .*taken over by run run-b"):
        first.renew()  # had the first run only stalled, it could not commit
    first.release()  # and would not delete the second's lease
    assert json.loads(storage.read_bytes(storage.join(dst, LEASE_FILE)))["run_id"] == "run-b"
    second.release()
    assert not storage.exists(storage.join(dst, LEASE_FILE))
