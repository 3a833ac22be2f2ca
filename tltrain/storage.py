"""URIs and object storage: the only module that imports boto3 and pyarrow.fs.

Every function takes either an `s3://bucket/key` URI or a local path, so callers never branch.
Endpoint, region and credentials come from boto3's own resolution (AWS_ENDPOINT_URL /
AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, profiles, instance roles): a custom S3-compatible
endpoint (MinIO, Ceph, moto) needs no spec field, and credentials never pass through our code
except to hand them to pyarrow. Never log them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import urlparse

import boto3
import botocore.loaders
import botocore.session
import pyarrow as pa
import pyarrow.fs as pafs
from botocore.config import Config
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
    {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
     "Throttling", "ThrottlingException"}
)

# Enough threads to hide per-object latency on many small files (datasets of 20k+ images)
# without opening more connections than one client's pool holds.
_TRANSFER_THREADS = 16
_CLIENT_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 10},
    max_pool_connections=_TRANSFER_THREADS * 2,
)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b"); the key has no leading slash and may be ""."""
    if not is_s3(uri):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket name (expected s3://bucket/prefix)")
    return bucket, key.lstrip("/")


def _local(path: str) -> Path:
    return Path(path).expanduser().absolute()


def _join_key(prefix: str, rel: str) -> str:
    return f"{prefix.rstrip('/')}/{rel}" if prefix.strip("/") else rel


# botocore spends ~0.2 s parsing its service JSON per new session; sharing the loader keeps that
# cost once per process while each session still resolves endpoint and credentials afresh.
_LOADER = botocore.loaders.create_loader()


def _session() -> boto3.session.Session:
    core = botocore.session.Session()
    core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core)


def s3_client(max_attempts: int | None = None) -> Any:
    """A boto3 S3 client; endpoint/region/credentials resolved by boto3 from its environment.
    `max_attempts` overrides boto3's per-request retries (callers with their own retry loop)."""
    config = _CLIENT_CONFIG
    if max_attempts is not None:
        config = config.merge(Config(retries={"mode": "standard", "max_attempts": max_attempts}))
    return _session().client("s3", config=config)


def _is_aws_endpoint(host: str) -> bool:
    return host == "amazonaws.com" or host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


def pyarrow_filesystem(uri: str, retry_s: float = 0.0) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for Ray's RunConfig(storage_path=path, storage_filesystem=fs).

    Ray wants "bucket/prefix" without the scheme once a filesystem is given. We build the
    S3FileSystem's endpoint from boto3's resolution so that pyarrow talks to the same endpoint as
    the rest of the service (pyarrow's own resolution ignores AWS_ENDPOINT_URL).

    retry_s > 0 wraps an S3 filesystem so that every call Ray makes through it (its controller
    writes the run snapshot after each checkpoint, deletes old checkpoints, reads state on resume)
    rides out a storage outage like our own uploads do. pyarrow's `retry_strategy` cannot do this:
    it is lost when Ray pickles the filesystem to its controller and workers.
    """
    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(_local(uri))
    bucket, key = split_s3(uri)
    session = _session()
    client = session.client("s3", config=_CLIENT_CONFIG)
    kwargs: dict[str, Any] = {"region": client.meta.region_name or "us-east-1"}
    endpoint = urlparse(client.meta.endpoint_url)
    if endpoint.hostname and not _is_aws_endpoint(endpoint.hostname):
        kwargs["endpoint_override"] = endpoint.netloc
        kwargs["scheme"] = endpoint.scheme or "https"
    # Credentials are NOT passed: Ray pickles this filesystem into its run/experiment state in
    # storage, and pyarrow's own AWS chain (env, profile, instance role) finds the same ones.
    fs: pafs.FileSystem = pafs.S3FileSystem(**kwargs)
    if retry_s > 0:
        fs = pafs.PyFileSystem(RetryingFileSystem(fs, retry_s))
    return fs, f"{bucket}/{key}".rstrip("/")


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


def _publish(tmp: str, dst: Path) -> None:
    # mkstemp makes 0600 files; a dataset cache or checkpoint copy is read by other users/processes.
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)


def _atomic_copy(src: Path, dst: Path) -> None:
    # Copy to a sibling temp file and rename, so a reader (or a second rank downloading the same
    # dataset) never sees a half-written file.
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        _publish(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Below this, one PUT/GET per file: s3transfer's managed transfer (threads, multipart) costs more
# than it saves on the small images that make up datasets.
_SINGLE_REQUEST_BYTES = 8 * 1024 * 1024


def _upload(client: Any, src: Path, bucket: str, key: str) -> None:
    if src.stat().st_size < _SINGLE_REQUEST_BYTES:
        with open(src, "rb") as f:
            client.put_object(Bucket=bucket, Key=key, Body=f)
    else:
        client.upload_file(str(src), bucket, key)


def _download(client: Any, bucket: str, key: str, dst: Path, size: int | None = None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    try:
        if size is not None and size < _SINGLE_REQUEST_BYTES:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(client.get_object(Bucket=bucket, Key=key)["Body"], f)
        else:
            os.close(fd)
            client.download_file(bucket, key, tmp)
        _publish(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upload_file(local: str, uri: str) -> None:
    src = _local(local)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _upload(s3_client(), src, bucket, key)
    else:
        _atomic_copy(src, _local(uri))


def download_file(uri: str, local: str) -> None:
    dst = _local(local)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        _download(s3_client(), bucket, key, dst)
    else:
        _atomic_copy(_local(uri), dst)


def _local_files(root: Path) -> dict[str, int]:
    """Relative POSIX path -> size for every file under root (temp .part files excluded)."""
    out: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith(".part") and name.startswith("."):
                continue
            p = Path(dirpath) / name
            out[p.relative_to(root).as_posix()] = p.stat().st_size
    return out


def _s3_objects(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    """Relative key -> size for every object under the prefix (folder markers excluded)."""
    prefix = prefix.strip("/")
    list_prefix = f"{prefix}/" if prefix else ""
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=list_prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(list_prefix) :]
            if rel and not rel.endswith("/"):
                out[rel] = obj["Size"]
    return out


def _sizes(uri: str) -> dict[str, int]:
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        return _s3_objects(s3_client(), bucket, prefix)
    root = _local(uri)
    return _local_files(root) if root.is_dir() else {}


def list_files(uri: str) -> list[str]:
    """Keys (relative to uri, '/'-separated, sorted) of every file under a prefix or folder."""
    return sorted(_sizes(uri))


# How pyarrow's S3 filesystem (the AWS C++ SDK) words the same transient failures in its OSErrors.
_PYARROW_TRANSIENT = (
    "AWS Error NETWORK_CONNECTION", "AWS Error SERVICE_UNAVAILABLE", "AWS Error SLOW_DOWN",
    "AWS Error INTERNAL_FAILURE", "AWS Error THROTTLING", "AWS Error REQUEST_TIMEOUT",
)


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
            return _error_code(e) in _TRANSIENT_CODES or int(status) >= 500
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
                    log.error("%s: storage still unavailable after %.0fs and %d attempts: %s", what, waited, attempt, err)
                raise
            log.warning(
                "%s: storage unavailable (%s: %s); retry %d in %.1fs (giving up after %.0fs)",
                what, type(err).__name__, err, attempt, delay, retry_s,
            )
            time.sleep(delay)
            delay = min(delay * 2, _RETRY_MAX_DELAY_S)
            attempt += 1


def upload_tree(local_dir: str, uri: str, *, last: Sequence[str] = (), retry_s: float = 0.0) -> int:
    """Upload every file under local_dir to uri/<relative path>; returns the number of files.

    Files named in `last` (relative paths) are uploaded only after every other file is stored: a
    reader that trusts a marker file (a checkpoint's MANIFEST.json) then never sees the marker
    without the data. `retry_s` > 0 retries each file through storage outages (see with_retries).
    """
    root = _local(local_dir)
    everything = sorted(_local_files(root))
    final = [rel for rel in last if rel in everything]
    first = [rel for rel in everything if rel not in final]
    if not is_s3(uri):
        dst = _local(uri)
        for rel in first + final:
            _atomic_copy(root / rel, dst / rel)
        return len(everything)
    bucket, prefix = split_s3(uri)
    # With an outer retry loop, boto3's own retries are kept short so an outage shows up in our
    # (logged) loop within seconds rather than hiding for a minute inside one request.
    client = s3_client(max_attempts=3 if retry_s > 0 else None)

    def put(rel: str) -> None:
        key = _join_key(prefix, rel)
        with_retries(lambda: _upload(client, root / rel, bucket, key), f"upload s3://{bucket}/{key}", retry_s)

    with ThreadPoolExecutor(_TRANSFER_THREADS) as pool:
        list(pool.map(put, first))
    for rel in final:
        put(rel)
    return len(everything)


def download_tree(uri: str, local_dir: str) -> int:
    """Mirror uri into local_dir, skipping files already present with the same size.

    Returns the number of files transferred (0 when the local copy is already complete), which
    makes a dataset cache cheap to re-validate on every run and on every node.
    """
    dst = _local(local_dir)
    have = _local_files(dst) if dst.is_dir() else {}
    if not is_s3(uri):
        src = _local(uri)
        todo = [rel for rel, size in _local_files(src).items() if have.get(rel) != size]
        for rel in todo:
            _atomic_copy(src / rel, dst / rel)
        return len(todo)
    bucket, prefix = split_s3(uri)
    client = s3_client()
    todo = {rel: size for rel, size in _s3_objects(client, bucket, prefix).items() if have.get(rel) != size}
    with ThreadPoolExecutor(_TRANSFER_THREADS) as pool:
        list(pool.map(lambda rel: _download(client, bucket, _join_key(prefix, rel), dst / rel, todo[rel]), todo))
    if todo:
        log.info("downloaded %d files from %s to %s", len(todo), uri, dst)
    return len(todo)


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def exists(uri: str) -> bool:
    """True for an existing file/object, a non-empty prefix or folder, or (bare s3://bucket) a bucket."""
    if not is_s3(uri):
        return _local(uri).exists()
    bucket, key = split_s3(uri)
    client = s3_client()
    try:
        if not key:
            client.head_bucket(Bucket=bucket)
            return True
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as err:
        if _error_code(err) not in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise
        if not key:
            return False
    try:
        resp = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
    except ClientError as err:
        if _error_code(err) == "NoSuchBucket":
            return False
        raise
    return resp.get("KeyCount", 0) > 0


def ensure_bucket(uri: str) -> None:
    """Create the URI's bucket if absent (a local path: create the folder)."""
    if not is_s3(uri):
        _local(uri).mkdir(parents=True, exist_ok=True)
        return
    bucket, _ = split_s3(uri)
    client = s3_client()
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as err:
        if _error_code(err) not in ("404", "NoSuchBucket", "NotFound"):
            raise
    region = client.meta.region_name
    kwargs: dict[str, Any] = {"Bucket": bucket}
    # us-east-1 rejects an explicit LocationConstraint; every other region requires it.
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
        log.info("created bucket %s", bucket)
    except ClientError as err:
        if _error_code(err) not in ("BucketAlreadyOwnedByYou",):
            raise


def sha256_file(path: str | Path) -> str:
    with open(_local(str(path)), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
