"""The commit of a labelled output: the journal, applying it, and finishing or clearing what dead
runs left (the protocol is described in store/output.py).

A run's journal names the top-level files to delete, the staged files to move up, the staging
folders of dead runs whose files it adopted, and the new `_SUCCESS`. It is written into the
output's `_LEASE` by one write conditional on the lease being this run's (`Lease.begin_commit`):
that write is the commit point, and a run that lost its lease cannot make it. `apply` carries the
journal out, each step inside the lease's fence; it is safe to repeat after a crash at any step,
and the run that takes the lease of a dead one finishes its journal before anything else.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray_fer.schema import KIND_COLUMN, VIDEO_KIND
from ray_fer.store import storage
from ray_fer.config import UserError
from ray_fer.store.lease import Lease

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS"  # JSON written last: a reader can tell a finished output from a crashed one
STAGING_PREFIX = "_staging-"  # + run id: a run's files until its commit
LEGACY_COMMIT_FILE = "_COMMIT"  # where ray-fer before the fenced commit wrote the journal (staging folder)


class JournalError(UserError):
    """A commit that cannot be carried out as written: the output was changed by another writer."""


def apply(dst: str, record: dict[str, Any], lease: Lease) -> None:
    """Carry out a commit journal, each step inside the lease's fence; safe to repeat after a
    crash at any point. JournalError when the output no longer matches the journal (a step
    whose file is in neither of its places, a `_SUCCESS` another run wrote)."""
    success_uri = storage.join(dst, SUCCESS_FILE)
    with lease.fence("read _SUCCESS"):
        previous = storage.read_versioned(success_uri)
    if previous is None or _run_id(previous.data) != record["run_id"]:
        if previous is not None:  # first: from here on the output is unfinished
            with lease.fence("delete _SUCCESS"):
                if not storage.delete_if_unchanged(success_uri, previous.token):
                    raise _changed(dst, record, f"{SUCCESS_FILE} changed as it was being replaced")
        for name in record["delete"]:
            with lease.fence(f"delete {name}"):
                uri = storage.join(dst, name)
                if storage.exists(uri):
                    storage.delete_file(uri)
        for src, name in record["move"]:
            with lease.fence(f"move {name}"):
                src_uri, dst_uri = storage.join(dst, src), storage.join(dst, name)
                if storage.exists(src_uri):
                    fs, src_path = storage.filesystem(src_uri)
                    fs.move(src_path, storage.filesystem(dst_uri)[1])
                elif not storage.exists(dst_uri):  # not moved before a crash either: someone deleted it
                    raise _changed(dst, record, f"{src} is neither staged nor at the top level as {name}")
        with lease.fence("write _SUCCESS"):
            data = json.dumps(record["success"], indent=2).encode()
            if storage.write_if_unchanged(success_uri, data, None) is None:
                raise _changed(dst, record, f"another run wrote {SUCCESS_FILE}")
    for folder in record.get("drop", []):  # dead runs whose files this commit adopted
        with lease.fence(f"delete {folder}"):
            storage.delete_dir(storage.join(dst, folder))
    with lease.fence("delete staging"):
        storage.delete_dir(storage.join(dst, STAGING_PREFIX + record["run_id"]))


def _changed(dst: str, record: dict[str, Any], what: str) -> JournalError:
    return JournalError(f"output {dst!r} was changed by another writer while run {record['run_id']} committed "
                        f"({what}); nothing more was changed: make sure only one job writes into it, then delete "
                        f"its _LEASE and run again with --skip-existing")


UNTRACKED = f"{KIND_COLUMN}={VIDEO_KIND}"


def recover(dst: str, lease: Lease, *, salvage: bool = False) -> tuple[list[str], list[str]]:
    """Finish the commit a dead run began (the journal its lease still held), then clear the
    staging folders of the runs that had not reached their commit: deleted, or with `salvage`
    (--skip-existing) kept: returns (the Parquet files they staged, their folders), whose rows
    the run may adopt, so that a crashed job's work is not lost."""
    if lease.pending is not None:
        log.warning("finishing the commit of run %s into %s, which stopped half-way", lease.pending["run_id"], dst)
        apply(dst, lease.pending, lease)
        lease.end_commit()
    salvaged: list[str] = []
    dead: list[str] = []
    for uri, is_dir in list_dir(dst):
        if not (is_dir and storage.basename(uri).startswith(STAGING_PREFIX)):
            continue
        legacy = storage.join(uri, LEGACY_COMMIT_FILE)
        if storage.exists(legacy):  # committed by an earlier ray-fer, which wrote the journal here
            record = json.loads(storage.read_bytes(legacy))
            log.warning("finishing the commit of run %s into %s, which stopped half-way", record["run_id"], dst)
            apply(dst, record, lease)
        elif salvage:
            files = parquet_files(storage.join(uri, "new"))
            log.warning("keeping the %d files that %s, a run that ended before its commit, had written",
                        len(files), uri)
            salvaged += files
            dead.append(uri)
        else:
            log.warning("deleting %s: the files of a run that ended before its commit", uri)
            with lease.fence(f"delete {storage.basename(uri)}"):
                storage.delete_dir(uri)
    return salvaged, dead


def list_dir(dst: str) -> list[tuple[str, bool]]:
    try:
        return storage.list_dir(dst)
    except FileNotFoundError:
        return []


def parquet_files(folder: str) -> list[str]:
    """The Parquet files under a staging folder, but for a run's video frames not yet tracked
    (kind=video/: label/infer.py), which are never output rows."""
    try:
        return [f for f in storage.list_files(folder) if f.endswith(".parquet") and f"/{UNTRACKED}/" not in f]
    except FileNotFoundError:
        return []


def _run_id(data: bytes) -> str | None:
    try:
        return json.loads(data).get("run_id")
    except (ValueError, AttributeError):
        return None
