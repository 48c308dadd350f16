"""Local and s3:// paths: listing, reading, writing, through pyarrow filesystems.

S3 uses the standard AWS settings (credential chain, AWS_REGION, and AWS_ENDPOINT_URL for
S3-compatible stores). Filesystems are built with `FileSystem.from_uri`, which honours them.
Nothing here logs credentials: only paths appear in messages.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import functools
import hashlib
import itertools
import os
import random
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from ray_fer.config import UserError

SCHEMES = ("s3://",)
S3_HINT = ", the bucket name, AWS credentials and AWS_ENDPOINT_URL (for S3-compatible stores)"


class StorageError(UserError):
    """A path or URI that cannot be used; the message names it and the fix."""


def is_remote(uri: str) -> bool:
    return str(uri).startswith(SCHEMES)


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(base).joinpath(*parts))


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


@functools.lru_cache(maxsize=64)
def _s3_filesystem(bucket: str) -> pafs.FileSystem:
    # from_uri resolves the bucket's region and reads AWS_ENDPOINT_URL; cached per process and bucket.
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
    return fs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `uri` and the path inside it."""
    uri = str(uri)
    if uri.startswith("s3://"):
        rest = uri[len("s3://"):]
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise ValueError(f"{uri!r} names no bucket: use s3://BUCKET/PREFIX")
        return _s3_filesystem(bucket), rest.rstrip("/")
    if "://" in uri:
        raise ValueError(f"unsupported storage scheme in {uri!r}: use a local path or s3://BUCKET/PREFIX")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The inverse of `filesystem`: a path inside `fs` as a user-facing URI."""
    return f"s3://{path}" if fs.type_name == "s3" else path


def info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    return fs.get_file_info(path)


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return info(uri).type == pafs.FileType.Directory


def list_dir(uri: str) -> list[tuple[str, bool]]:
    """Immediate children of a folder or prefix as (uri, is_dir), sorted by name."""
    fs, path = filesystem(uri)
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted((to_uri(fs, e.path), e.type == pafs.FileType.Directory) for e in entries)


def list_files(uri: str, extensions: tuple[str, ...] | None = None) -> list[str]:
    """All files under a folder or prefix, recursively, sorted; optionally only these extensions."""
    return [file for file, _ in file_sizes(uri, extensions)]


def file_sizes(uri: str, extensions: tuple[str, ...] | None = None) -> list[tuple[str, int]]:
    """(URI, bytes) of every file under a folder or prefix, recursively, sorted, from one listing;
    optionally only these extensions."""
    fs, path = filesystem(uri)
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=False))
    exts = tuple(e.lower() for e in extensions) if extensions else None
    files = [
        (to_uri(fs, e.path), e.size)
        for e in entries
        if e.type == pafs.FileType.File and (exts is None or e.path.lower().endswith(exts))
    ]
    return sorted(files)


def read_bytes(uri: str) -> bytes:
    uri = str(uri)
    if "://" not in uri:  # a local path: plain open() is several times faster for small files
        with open(os.path.expanduser(uri), "rb") as f:
            return f.read()
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


# Seconds to wait before each new attempt at a read that failed for a reason other than "not
# found": throttling, 5xx, timeouts, connection resets, access denied. About 30 s in all (with
# jitter), on top of pyarrow's own three quick attempts per S3 request. RETRY_ENV (seconds,
# comma-separated) replaces them for a store that needs longer, or shorter.
READ_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
RETRY_ENV = "RAY_FER_READ_RETRY_DELAYS"


def read_retry_delays() -> tuple[float, ...]:
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return READ_RETRY_DELAYS
    try:
        return tuple(float(x) for x in raw.split(","))
    except ValueError:
        raise StorageError(f"{RETRY_ENV}={raw!r} is not a list of seconds such as 0.5,1,2") from None


class ReadError(StorageError):
    """A file that could not be read even after retries: the run stops rather than record it as
    unreadable, because the cause (a throttled or failing store, a permission) is not the file's."""


def read_with_retries(uri: str, delays: tuple[float, ...] | None = None) -> bytes:
    """`read_bytes` that waits and tries again on any failure but a missing file.

    FileNotFoundError is raised at once (the file is gone: that is the file's own state). Other
    errors are retried after each of `delays` (times 0.5-1.5, so that many readers spread out);
    the last one is raised as ReadError naming the file, the attempts and the cause.
    """
    delays = read_retry_delays() if delays is None else delays
    for attempt, delay in enumerate((*delays, None), start=1):
        try:
            return read_bytes(uri)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow and the OS raise many types for one cause
            if delay is None:
                raise ReadError(f"cannot read {uri} after {attempt} attempts: {short_error(e)}{hint(uri)}") from e
            time.sleep(delay * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


def reported_in_task(e: BaseException) -> re.Match[str] | None:
    """Where the text of an error from a Ray task holds a ReadError or a manifest's InputError,
    which `stop_on_read_errors` reports as one line: the match (group 1 the class, 2 the message)."""
    return re.search(r"ray_fer(?:\.\w+)+\.(ReadError|InputError): (.+)", str(e))  # any module of the package


@contextlib.contextmanager
def stop_on_read_errors(advice: str) -> Iterator[None]:
    """Turn a ReadError (or a manifest's InputError) that stopped a Ray task into one line for
    the user: its message, and for a ReadError `advice`.

    Ray Data hands the driver the worker's traceback as text (RayTaskError), not the exception
    object, so the message is found in that text."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - anything Ray raises for a failed task
        # Ray may raise the task's error as a RayTaskError that is also a ReadError: its text is
        # the whole remote traceback, so it is taken apart like any other
        from_ray = any(c.__name__ == "RayTaskError" for c in type(e).__mro__)
        if isinstance(e, UserError) and not from_ray:
            raise
        found = reported_in_task(e)
        if found is None:
            raise
        if found.group(1) == "InputError":
            raise UserError(found.group(2).strip()) from None
        raise ReadError(f"{found.group(2).strip()}. {advice}") from None


def read_each(uris: list[str], threads: int = 16,
              delays: tuple[float, ...] | None = None) -> Iterator[bytes | FileNotFoundError]:
    """Read many files in order, yielding each one's bytes, or FileNotFoundError for a missing one.

    Every other failure is retried (`read_with_retries`) and, if it persists, raised as
    ReadError: it stops the caller instead of marking the file. Remote stores are read by a
    thread pool, since each GET waits on the network, with at most 2 x threads files ahead of
    the consumer: memory holds a few files, never the whole list (a batch of 2,048
    ten-megabyte photos must not mean 20 GB in one task).
    """
    delays = read_retry_delays() if delays is None else delays

    def one(u: str) -> bytes | FileNotFoundError:
        try:
            return read_with_retries(u, delays)
        except FileNotFoundError as e:
            return e

    if not any(is_remote(u) for u in uris) or threads <= 1:
        yield from map(one, uris)
        return
    pool = ThreadPoolExecutor(max_workers=min(threads, len(uris)))
    try:
        ahead: deque[Future[bytes | FileNotFoundError]] = deque()
        todo = iter(uris)
        for u in itertools.islice(todo, 2 * threads):
            ahead.append(pool.submit(one, u))
        while ahead:
            blob = ahead.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                ahead.append(pool.submit(one, nxt))
            yield blob
    finally:  # a consumer that stops early does not wait for the reads queued ahead
        pool.shutdown(wait=False, cancel_futures=True)


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    if fs.type_name == "local":
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete_file(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.delete_file(path)


def delete_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def check_bucket(uri: str, role: str) -> None:
    """Refuse an s3:// URI whose bucket does not exist; `role` ("input", "output") names it."""
    if not is_remote(uri):
        return
    bucket = uri[len("s3://"):].split("/", 1)[0]
    if info(f"s3://{bucket}").type == pafs.FileType.NotFound:
        raise StorageError(f"{role} bucket s3://{bucket} does not exist; check the bucket name"
                           + (", or create it" if role == "output" else "")
                           + " (and AWS_ENDPOINT_URL for S3-compatible stores)")


def kind_of(uri: str, role: str) -> pafs.FileType:
    """What `uri` is (file, folder, nothing) after checking its bucket; `role` ("input", "output")
    names it in the StorageError raised when it cannot be read."""
    try:
        check_bucket(uri, role)
        return info(uri).type
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot read {role} {uri!r}: {short_error(e)}; check the path{hint(uri)}") from None


def hint(uri: str) -> str:
    """What to check when `uri` cannot be read: the S3 settings for s3:// URIs."""
    return S3_HINT if is_remote(uri) else ""


def short_error(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line errors."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


# --------------------------------------------------------------------------------------------
# Conditional writes of small files, the store's clock, and a folder lock (pyarrow's S3
# filesystem has no conditional requests: boto3 does them)

# botocore's first release whose S3 model has both If-None-Match and If-Match on PutObject (and
# If-Match on DeleteObject): 1.35.69 (read in the wheels' service models; 1.35.68 lacks the first)
BOTOCORE_FLOOR = "1.35.69"
CLOCK_PROBE = "_clock-"  # + pid and thread: the empty file `read_versioned` creates to read a folder's clock
LOCK_WAIT_S = 60.0  # how long a local conditional step waits for another process's folder lock


@dataclass(frozen=True)
class Versioned:
    """A small file as read for a conditional write: its bytes, a token for `write_if_unchanged`
    (S3: the ETag; locally: a digest of the bytes) and its age on the store's clock (S3: the
    answer's Date less LastModified; locally: a file created now less its mtime)."""

    data: bytes
    token: str
    age: float  # seconds since the file was last written, as the store measures time


@functools.lru_cache(maxsize=1)
def s3_client() -> Any:
    """boto3's S3 client, one per process (conditional writes; paginated listings with ranges)."""
    import boto3  # pyarrow's S3 filesystem has no conditional writes

    return boto3.client("s3")  # reads AWS_ENDPOINT_URL and the credential chain, as pyarrow does


@functools.lru_cache(maxsize=1)
def check_conditional_requests() -> None:
    """StorageError when the installed botocore cannot send conditional PUTs and DELETEs."""
    import botocore

    model = s3_client().meta.service_model
    members = {op: set(model.operation_model(op).input_shape.members) for op in ("PutObject", "DeleteObject")}
    if not ({"IfMatch", "IfNoneMatch"} <= members["PutObject"] and "IfMatch" in members["DeleteObject"]):
        raise StorageError(f"botocore {botocore.__version__} cannot send the conditional writes (If-Match, "
                           f"If-None-Match) that keep two runs apart on S3; pip install 'botocore>={BOTOCORE_FLOOR}' "
                           f"'boto3>={BOTOCORE_FLOOR}'")


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _digest(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _unsupported(e: Any, uri: str) -> StorageError | None:
    """The StorageError for a store that rejects conditional requests, else None."""
    meta = e.response.get("ResponseMetadata", {})
    code = e.response.get("Error", {}).get("Code", "")
    message = e.response.get("Error", {}).get("Message", "")
    if meta.get("HTTPStatusCode") == 501 or code in ("NotImplemented", "NotSupported") or (
            code in ("InvalidArgument", "InvalidRequest") and "match" in message.lower()):
        bucket = _bucket_key(uri)[0]
        return StorageError(f"the store behind s3://{bucket} rejects conditional requests (If-Match / "
                            f"If-None-Match: {code or meta.get('HTTPStatusCode')}), which ray-fer needs to keep two "
                            "runs out of one folder; use a store that supports them (AWS S3 and Ceph "
                            "RGW do)")
    return None


def read_versioned(uri: str) -> Versioned | None:
    """A small file's bytes, token and age on the store's clock (see Versioned); None when it
    does not exist."""
    if is_remote(uri):
        from botocore.exceptions import ClientError

        bucket, key = _bucket_key(uri)
        try:
            answer = s3_client().get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        data = answer["Body"].read()
        now, written = (_utc(email.utils.parsedate_to_datetime(answer["ResponseMetadata"]["HTTPHeaders"]["date"])),
                        _utc(answer["LastModified"]))
        return Versioned(data, answer["ETag"], max(0.0, (now - written).total_seconds()))
    path = Path(uri)
    try:
        data = path.read_bytes()
        written = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return Versioned(data, _digest(data), max(0.0, _local_now(path.parent) - written))


def _utc(t: datetime) -> datetime:
    """HTTP dates are UTC; some stores' answers parse without a zone."""
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _local_now(folder: Path) -> float:
    """The time on the clock that stamps files in `folder` (a file server's, on a network mount):
    the mtime of a file created there now."""
    probe = folder / f"{CLOCK_PROBE}{os.getpid()}-{threading.get_ident()}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def write_if_unchanged(uri: str, data: bytes, token: str | None) -> str | None:
    """Write a small file only if the store still holds `token` (None: only if there is no file).

    Returns the new token, or None when the condition failed (another writer got there first).
    S3 checks the condition itself (If-Match / If-None-Match); locally the comparison and the
    write happen under the folder's lock (`locked`), which every conditional step takes."""
    if is_remote(uri):
        from botocore.exceptions import ClientError

        check_conditional_requests()
        bucket, key = _bucket_key(uri)
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        try:
            return s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except ClientError as e:  # 412: the condition failed; 409: a concurrent conditional write won
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return None
            raise _unsupported(e, uri) or e
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(str(path.parent)):
        current = read_versioned(uri)
        if (current is None) != (token is None) or (current is not None and current.token != token):
            return None
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # a reader never sees half a file
    return _digest(data)


def delete_if_unchanged(uri: str, token: str) -> bool:
    """Delete a small file only if the store still holds `token`; False when it does not (or the
    file is gone). S3: DELETE with If-Match; locally under the folder's lock."""
    if is_remote(uri):
        from botocore.exceptions import ClientError

        check_conditional_requests()
        bucket, key = _bucket_key(uri)
        try:
            s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=token)
            return True
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (404, 409, 412) or e.response.get("Error", {}).get("Code") == "NoSuchKey":
                return False
            raise _unsupported(e, uri) or e
    with locked(str(Path(uri).parent)):
        current = read_versioned(uri)
        if current is None or current.token != token:
            return False
        Path(uri).unlink()
        return True


class _FolderLock:
    """An exclusive flock on a local folder, re-entrant within the process (threads wait on an
    RLock; processes on the flock, which the kernel drops when its holder dies)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None

    def __enter__(self) -> None:
        self.rlock.acquire()
        if self.depth == 0:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                os.makedirs(self.folder, exist_ok=True)
                fd = os.open(self.folder, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    if time.monotonic() > deadline:
                        self.rlock.release()
                        raise StorageError(f"{self.folder!r} has been locked by another process for over "
                                           f"{LOCK_WAIT_S:.0f} s (a ray-fer run stopped in the middle of a step?); "
                                           "run again once it ends") from None
                    time.sleep(0.05)
                    continue
                if os.fstat(fd).st_nlink > 0:
                    break
                os.close(fd)  # removed (empty, by the run that held it) while we waited: make it again
            self.fd = fd
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth == 0 and self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        self.rlock.release()


_folder_locks: dict[str, _FolderLock] = {}
_folder_locks_guard = threading.Lock()


def locked(folder: str) -> contextlib.AbstractContextManager[Any]:
    """Hold a local folder's lock (see _FolderLock), making the folder if needed: the steps of
    the lease and the commit that must not interleave with another process's. For s3:// a
    no-op: there each request carries its own condition."""
    if is_remote(folder):
        return contextlib.nullcontext()
    path = os.path.abspath(os.path.expanduser(folder))
    with _folder_locks_guard:
        lock = _folder_locks.setdefault(path, _FolderLock(path))
    return lock
