"""The lease: one run at a time in a folder, a heartbeat, the takeover of a dead run's lease, ages
on the store's clock, the fence around every commit step, and stores that reject or ignore
conditional writes; locally and on the loopback S3 server."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta

import pyarrow as pa
import pytest

from ray_fer.store import lease as lease_module
from ray_fer.store import storage
from ray_fer.config import UserError
from ray_fer.store.lease import LEASE_FILE, LEASE_TIMEOUT_ENV, Lease, LeaseError
from ray_fer.store.output import SUCCESS_FILE, OutputRun

from conftest import _lease_timeout, _one_line, _past_lease_timeout
from test_output import _names, _old_output, _read, _stage


_timeout, _past_timeout = _lease_timeout, _past_lease_timeout


def test_lease_refuses_a_second_run_and_is_taken_over_when_stale(dst, monkeypatch, caplog):
    timeout = _timeout(dst)
    monkeypatch.setenv(LEASE_TIMEOUT_ENV, str(timeout))  # a heartbeat every timeout/4
    first = Lease.acquire(dst, "run-a")
    owner = json.loads(storage.read_bytes(storage.join(dst, LEASE_FILE)))
    assert {"run_id", "host", "pid", "started", "generation", "heartbeat"} <= set(owner) and owner["run_id"] == "run-a"
    time.sleep(timeout * 1.3)  # longer than the timeout, but the heartbeat keeps the lease alive
    later = json.loads(storage.read_bytes(storage.join(dst, LEASE_FILE)))
    assert later["heartbeat"] > owner["heartbeat"]
    with pytest.raises(LeaseError) as e:
        Lease.acquire(dst, "run-b")
    assert f"output {dst!r} is in use by run run-a (host {owner['host']}, pid {owner['pid']}" in _one_line(e)

    first.stop_heartbeat()  # the first run dies: its heartbeat stops, its lease stays behind
    time.sleep(_past_timeout(dst))
    with caplog.at_level(logging.WARNING, logger="ray_fer.store.lease"):
        second = Lease.acquire(dst, "run-b")
    assert "taking over the lease" in caplog.text and "run run-a" in caplog.text
    taken = json.loads(storage.read_bytes(storage.join(dst, LEASE_FILE)))
    assert taken["run_id"] == "run-b" and taken["generation"] == owner["generation"] + 1
    with pytest.raises(LeaseError, match="run run-a lost its lease .*taken over by run run-b"):
        first.renew()  # had the first run only stalled, it could not write
    with pytest.raises(LeaseError):
        with first.fence("a step"):
            pytest.fail("a run that lost its lease must not run a fenced step")
    first.release()  # and would not delete the second's lease
    assert json.loads(storage.read_bytes(storage.join(dst, LEASE_FILE)))["run_id"] == "run-b"
    second.release()
    assert not storage.exists(storage.join(dst, LEASE_FILE))


class _SkewedDatetime(datetime):
    skew = timedelta(0)

    @classmethod
    def now(cls, tz=None):  # noqa: D102 - datetime.now, off by `skew`
        return datetime.now(tz) + cls.skew


class _SkewedTime:
    """The time module, with time() off by `seconds`."""

    def __init__(self, real_time, seconds: float) -> None:
        self._real, self._seconds = real_time, seconds

    def time(self) -> float:
        return self._real() + self._seconds

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.mark.parametrize("skew_s", [-3600, 3600])
def test_lease_ages_are_read_on_the_stores_clock_whatever_the_hosts_clock_says(dst, monkeypatch, skew_s):
    """The holder's host clock is an hour off (far more than the timeout), either way: a live
    lease is still refused and a dead one still taken over once the timeout has passed."""
    timeout = _timeout(dst)
    monkeypatch.setenv(LEASE_TIMEOUT_ENV, str(timeout))
    real_time = time.time

    def skewed(seconds: float) -> None:
        """What this host's clocks read from now on, as the lease code sees them. On S3 the
        server runs in this process: there only ray-fer's modules see the skewed clock."""
        _SkewedDatetime.skew = timedelta(seconds=seconds)
        clock = _SkewedTime(real_time, seconds)
        for module in (lease_module, storage):
            monkeypatch.setattr(module, "time", clock, raising=False)
        if not storage.is_remote(dst):
            monkeypatch.setattr(time, "time", clock.time)

    monkeypatch.setattr(lease_module, "datetime", _SkewedDatetime)
    skewed(skew_s)
    holder = Lease.acquire(dst, "run-skewed")  # its heartbeats carry times an hour off
    time.sleep(timeout / 2)
    skewed(0)
    with pytest.raises(LeaseError, match="is in use by run run-skewed"):
        Lease.acquire(dst, "run-b")  # alive: refused, though its heartbeat reads an hour old or ahead
    holder.stop_heartbeat()
    time.sleep(_past_timeout(dst))
    skewed(-skew_s)  # the taker's clock is off the other way
    taker = Lease.acquire(dst, "run-b")  # dead for longer than the timeout: taken over
    assert json.loads(storage.read_bytes(storage.join(dst, LEASE_FILE)))["run_id"] == "run-b"
    taker.release()


# --------------------------------------------------------------------------------------------
# The fence: a run stalled at any step of its commit, while another run takes the output over


COMMIT_STEPS = ["commit", "read _SUCCESS", "delete _SUCCESS", "delete old-a.parquet", "move x_000000.parquet",
                "write _SUCCESS", "delete staging", "end"]


# on S3 each stall waits out a longer lease timeout (~8 s a step): the default run stalls at the
# commit point and at one step on either side of it; make test-all at every step
S3_DEFAULT_STEPS = ("commit", "move x_000000.parquet", "write _SUCCESS")


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_a_run_stalled_at_any_commit_step_never_mixes_its_output_with_its_successors(tmp_path, monkeypatch, step):
    """Run A stalls (heartbeat and all) at `step` of its commit for longer than the lease
    timeout; run B takes the output over, labels and commits; then A goes on. A must stop with
    one line and change nothing: the output is B's, each path once, `_SUCCESS` names B's files,
    all of which exist, and nothing else is at the top level."""
    _stalled_commit(str(tmp_path / "out"), monkeypatch, step)


@pytest.mark.s3
@pytest.mark.parametrize("step", [s if s in S3_DEFAULT_STEPS else pytest.param(s, marks=pytest.mark.slow)
                                  for s in COMMIT_STEPS])
def test_a_run_stalled_at_a_commit_step_on_s3_never_mixes_its_output_with_its_successors(s3_bucket, monkeypatch,
                                                                                          step):
    """The same on the S3 server on loopback, where the fence is a conditional write."""
    _stalled_commit(f"s3://{s3_bucket}/out/labels", monkeypatch, step)


def _stalled_commit(dst: str, monkeypatch, step: str) -> None:
    timeout = _timeout(dst)
    monkeypatch.setenv(LEASE_TIMEOUT_ENV, str(timeout))
    _old_output(dst)  # /a.jpg, /b.jpg, /c.jpg
    a = OutputRun(dst, overwrite=True, skip_existing=False, model_id="m").__enter__()
    _stage(a, ["/x.jpg", "/y.jpg"])
    a.check(pa.array(["/x.jpg", "/y.jpg"]))
    a.lease.stop_heartbeat()  # the stall below stops it as a frozen process would; the fence still renews
    b_runs: list[OutputRun] = []
    stalled: list[str] = []

    def stall(name: str) -> None:
        if name != step or stalled:  # once: B's own steps go through here too
            return
        stalled.append(name)
        time.sleep(_past_timeout(dst))  # A is frozen here, past the timeout; meanwhile B runs from start to end
        with OutputRun(dst, overwrite=False, skip_existing=True, model_id="m") as b:
            b_runs.append(b)
            _write_new(b, ["/z.jpg"])
            b.check(pa.array(["/z.jpg"]))
            b.commit({"images": "B"})

    monkeypatch.setattr(lease_module, "stall_hook", stall)
    with pytest.raises(UserError) as e:
        a.commit({"images": "A"})
    _one_line(e)
    a._close()
    assert b_runs, f"the step {step!r} was never reached: {e.value}"

    # A's rows are in B's output only if A reached its commit point before it stalled (B then
    # finished A's commit first); otherwise B kept the rows A had staged (--skip-existing salvage)
    a_committed = step != "commit"
    expected = ["/x.jpg", "/y.jpg", "/z.jpg"] + ([] if a_committed else ["/a.jpg", "/b.jpg", "/c.jpg"])
    assert sorted(_read(dst)["path"].to_pylist()) == sorted(expected)
    success = json.loads(storage.read_bytes(storage.join(dst, SUCCESS_FILE)))
    assert success["run_id"] == b_runs[0].run_id and success["images"] == "B"
    assert sorted(_names(dst)) == sorted([SUCCESS_FILE, *success["files"]])  # every file named, nothing else


def _write_new(run: OutputRun, paths: list[str]) -> None:
    from test_output import _rows, _write

    _write(storage.join(run.new_dir, "z_000000.parquet"), _rows(paths))


# --------------------------------------------------------------------------------------------
# Stores that do not do conditional writes


@pytest.mark.s3
@pytest.mark.parametrize("how", ["reject", "ignore"])
def test_a_store_without_conditional_writes_is_refused_at_the_start_in_one_line(s3_bucket, s3_faults, how):
    s3_faults.conditions = how
    dst = f"s3://{s3_bucket}/out"
    started = time.perf_counter()
    with pytest.raises(storage.StorageError) as e:
        Lease.acquire(dst, "run-a")
    text = _one_line(e)
    assert (f"s3://{s3_bucket}" in text and "conditional" in text and "use a store that" in text), text
    assert ("rejects" in text) if how == "reject" else ("ignores" in text)
    assert time.perf_counter() - started < 10
    s3_faults.heal()
    assert not storage.exists(storage.join(dst, LEASE_FILE))  # nothing left behind to block the next run
