"""Riding out object-store outages: the retry loop, what counts as transient, and a pyarrow
filesystem that retries through them.

storage.py moves bytes; this module decides when a failure is worth waiting out (a network error
or a 5xx/throttling answer, never a refusal such as 403 or 404) and for how long. It is separate
because it is one policy with two users that must agree: our own checkpoint upload/download
(`with_retries`) and the filesystem Ray writes its run state through (`RetryingFileSystem`). It
imports nothing from tltrain, so storage.py can import it without a cycle.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long checkpoint I/O (upload; listing and download on restore) keeps retrying while the object
# store is unreachable or answers 5xx: long enough to ride out an endpoint restart, a load-balancer
# failover or a short network partition; bounded, so a store that is really gone fails the run
# (which Ray then restarts from its last complete checkpoint) instead of hanging it.
OUTAGE_RETRY_S = 180.0
_RETRY_FIRST_DELAY_S = 0.5
_RETRY_MAX_DELAY_S = 8.0
_TRANSIENT_CODES = frozenset(
    {
        "500",
        "502",
        "503",
        "504",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
    }
)

# How pyarrow's S3 filesystem (the AWS C++ SDK) words the same transient failures in its OSErrors.
_PYARROW_TRANSIENT = (
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error SLOW_DOWN",
    "AWS Error INTERNAL_FAILURE",
    "AWS Error THROTTLING",
    "AWS Error REQUEST_TIMEOUT",
)


def error_code(err: ClientError) -> str:
    """The S3 error code of a boto3 ClientError ("404", "NoSuchBucket", "SlowDown", ...)."""
    return str(err.response.get("Error", {}).get("Code", ""))


def _is_transient(err: BaseException) -> bool:
    """A network failure or a 5xx/throttling answer (worth retrying), not a refusal (403, 404, ...).
    s3transfer wraps the real error in S3UploadFailedError, so the whole chain is checked."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (BotoConnectionError, HTTPClientError)):
            return True
        if isinstance(e, OSError) and any(token in str(e) for token in _PYARROW_TRANSIENT):
            return True
        if isinstance(e, ClientError):
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return error_code(e) in _TRANSIENT_CODES or int(status) >= 500
        e = e.__cause__ or e.__context__
    return False


def with_retries(fn: Callable[[], T], what: str, retry_s: float) -> T:
    """Call fn, retrying transient storage failures with backoff for up to retry_s seconds.

    boto3 already retries each request a few times; this outer loop is what rides out an endpoint
    that is gone for longer (a restart, a failover). Each retry is logged (the message has the
    endpoint and the error, never credentials)."""
    started = time.monotonic()
    delay = _RETRY_FIRST_DELAY_S
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as err:
            waited = time.monotonic() - started
            if not _is_transient(err) or waited + delay > retry_s:
                if _is_transient(err) and retry_s > 0:
                    log.error(
                        "%s: storage still unavailable after %.0fs and %d attempts: %s", what, waited, attempt, err
                    )
                raise
            log.warning(
                "%s: storage unavailable (%s: %s); retry %d in %.1fs (giving up after %.0fs)",
                what,
                type(err).__name__,
                err,
                attempt,
                delay,
                retry_s,
            )
            time.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_DELAY_S)
            attempt += 1


class _BufferedUpload:
    """A write stream that keeps the bytes and uploads them on close, so the whole object can be
    written again if the store fails mid-way (Ray writes small state files this way)."""

    def __init__(self, fs: pafs.FileSystem, path: str, metadata: Any, retry_s: float) -> None:
        self._fs, self._path, self._metadata, self._retry_s = fs, path, metadata, retry_s
        self._buffer = io.BytesIO()
        self.closed = False

    def write(self, data: Any) -> int:
        return self._buffer.write(bytes(data))

    def tell(self) -> int:
        return self._buffer.tell()

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        data = self._buffer.getvalue()

        def put() -> None:
            with self._fs.open_output_stream(self._path, metadata=self._metadata) as out:
                out.write(data)

        with_retries(put, f"write {self._path}", self._retry_s)
        self.closed = True


class RetryingFileSystem(pafs.FileSystemHandler):
    """A pyarrow filesystem handler that retries transient failures of the wrapped filesystem for
    up to retry_s seconds (see with_retries). Reads are whole-object (small state files; our own
    checkpoint downloads go through boto3); writes are buffered and retried as a whole."""

    def __init__(self, fs: pafs.FileSystem, retry_s: float) -> None:
        self.fs, self.retry_s = fs, retry_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (RetryingFileSystem, (self.fs, self.retry_s))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingFileSystem) and self.fs.equals(other.fs) and self.retry_s == other.retry_s

    def __ne__(self, other: object) -> bool:
        return not self == other

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, what, self.retry_s)

    def get_type_name(self) -> str:
        return f"retrying+{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._retry(f"stat {paths[:3]}", lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._retry(f"list {selector.base_dir}", lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry(f"mkdir {path}", lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._retry(f"delete {path}", lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry(f"delete {path}/*", lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the whole bucket")

    def delete_file(self, path: str) -> None:
        self._retry(f"delete {path}", lambda: self.fs.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._retry(f"move {src}", lambda: self.fs.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._retry(f"copy {src}", lambda: self.fs.copy_file(src, dest))

    def _read_all(self, path: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(path) as stream:
                return stream.read()

        return self._retry(f"read {path}", read)

    def open_input_stream(self, path: str) -> Any:
        return pa.BufferReader(self._read_all(path))

    def open_input_file(self, path: str) -> Any:
        return pa.BufferReader(self._read_all(path))

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        return pa.PythonFile(_BufferedUpload(self.fs, path, metadata, self.retry_s), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        raise OSError("append is not supported on object storage")
