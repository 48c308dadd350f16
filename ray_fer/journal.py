"""The commit of a labelled output: the `_COMMIT` journal, applying it, and finishing or
clearing what dead runs left (the protocol is described in output.py).

A run's journal (`_staging-<run id>/_COMMIT`, one atomic write) names the top-level files to
delete, the staged files to move up, the staging folders of dead runs whose files it adopted,
and the new `_SUCCESS`. Writing it is the commit point; `apply` carries it out and is safe to
repeat after a crash at any step, so the next run on the output rolls it forward.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray_fer import storage

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS"  # JSON written last: a reader can tell a finished output from a crashed one
STAGING_PREFIX = "_staging-"  # + run id: a run's files until its commit
COMMIT_FILE = "_COMMIT"  # in the staging folder: the journal whose write commits the run


def write_journal(staging: str, journal: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(staging, COMMIT_FILE), json.dumps(journal, indent=2).encode())


def apply(dst: str, staging: str, journal: dict[str, Any]) -> None:
    """Carry out a commit journal; safe to repeat after a crash at any point."""
    if _success_run_id(dst) != journal["run_id"]:
        _delete_if_present(storage.join(dst, SUCCESS_FILE))  # first: from here on the output is unfinished
        for name in journal["delete"]:
            _delete_if_present(storage.join(dst, name))
        for src, name in journal["move"]:
            src_uri = storage.join(dst, src)
            if storage.exists(src_uri):  # else moved before the crash
                fs, src_path = storage.filesystem(src_uri)
                fs.move(src_path, storage.filesystem(storage.join(dst, name))[1])
        write_success(dst, journal["success"])
    for folder in journal.get("drop", []):  # dead runs whose files this commit adopted
        storage.delete_dir(storage.join(dst, folder))
    storage.delete_dir(staging)


def recover(dst: str, *, salvage: bool = False) -> tuple[list[str], list[str]]:
    """Finish the commits that dead runs began. The staging folders of those that had not are
    deleted, or with `salvage` (--skip-existing) kept: returns (the Parquet files they staged,
    their folders), whose rows the run may adopt, so that a crashed job's work is not lost.

    Call only while holding the lease: a live run's staging folder would be deleted."""
    salvaged: list[str] = []
    dead: list[str] = []
    for uri, is_dir in list_dir(dst):
        if not (is_dir and storage.basename(uri).startswith(STAGING_PREFIX)):
            continue
        journal_uri = storage.join(uri, COMMIT_FILE)
        if storage.exists(journal_uri):
            journal = json.loads(storage.read_bytes(journal_uri))
            log.warning("finishing the commit of run %s into %s, which stopped half-way", journal["run_id"], dst)
            apply(dst, uri, journal)
        elif salvage:
            files = parquet_files(storage.join(uri, "new"))
            log.warning("keeping the %d files that %s, a run that ended before its commit, had written",
                        len(files), uri)
            salvaged += files
            dead.append(uri)
        else:
            log.warning("deleting %s: the files of a run that ended before its commit", uri)
            storage.delete_dir(uri)
    return salvaged, dead


def write_success(dst: str, summary: dict[str, Any]) -> None:
    """Mark the output finished: `_SUCCESS` holds the run's summary. Written last."""
    storage.write_bytes(storage.join(dst, SUCCESS_FILE), json.dumps(summary, indent=2).encode())


def list_dir(dst: str) -> list[tuple[str, bool]]:
    try:
        return storage.list_dir(dst)
    except FileNotFoundError:
        return []


def parquet_files(folder: str) -> list[str]:
    try:
        return [f for f in storage.list_files(folder) if f.endswith(".parquet")]
    except FileNotFoundError:
        return []


def _delete_if_present(uri: str) -> None:
    if storage.exists(uri):
        storage.delete_file(uri)


def _success_run_id(dst: str) -> str | None:
    uri = storage.join(dst, SUCCESS_FILE)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_bytes(uri)).get("run_id")
    except ValueError:
        return None
