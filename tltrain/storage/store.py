"""URIs and object storage: with _retry.py (its outage policy), the only module that imports
boto3 and pyarrow.fs.

Every function takes either an `s3://bucket/key` URI or a local path, so callers never branch.
Endpoint, region and credentials come from boto3's own resolution (AWS_ENDPOINT_URL /
AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, profiles, instance roles): a custom S3-compatible
endpoint (MinIO, Ceph, moto) needs no spec field, and credentials never pass through our code
except to hand them to pyarrow. Never log them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import boto3
import botocore.loaders
import botocore.session
import pyarrow.fs as pafs
from botocore.config import Config
from botocore.exceptions import ClientError

from tltrain.storage._retry import RetryingFileSystem, error_code, with_retries

log = logging.getLogger(__name__)

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


def read_files(uris: Sequence[str]) -> list[bytes | Exception]:
    """The content of each file (local path or s3:// object), or the error that reading it raised:
    one missing or unreadable file does not stop the others (batch scoring counts it as skipped).
    Read on threads with one client, so a batch of small objects costs about one round trip."""
    client: Any = s3_client() if any(is_s3(u) for u in uris) else None

    def read(uri: str) -> bytes | Exception:
        try:
            if not is_s3(uri):
                return _local(uri).read_bytes()
            bucket, key = split_s3(uri)
            return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        except Exception as err:  # OSError, ClientError (NoSuchKey, AccessDenied), connection errors
            return err

    if len(uris) <= 1:
        return [read(u) for u in uris]
    with ThreadPoolExecutor(min(_TRANSFER_THREADS, len(uris))) as pool:
        return list(pool.map(read, uris))


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


def file_sizes(uri: str, *, retry_s: float = 0.0) -> dict[str, int]:
    """{key relative to uri: bytes} of every file under a prefix or folder (retried as list_files)."""
    return with_retries(lambda: _sizes(uri), f"list {uri}", retry_s)


def list_files(uri: str, *, retry_s: float = 0.0) -> list[str]:
    """Keys (relative to uri, '/'-separated, sorted) of every file under a prefix or folder.
    `retry_s` > 0 retries the listing through storage outages (see with_retries)."""
    return with_retries(lambda: sorted(_sizes(uri)), f"list {uri}", retry_s)


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


def download_tree(uri: str, local_dir: str, *, retry_s: float = 0.0) -> int:
    """Mirror uri into local_dir, skipping files already present with the same size.

    Returns the number of files transferred (0 when the local copy is already complete), which
    makes a dataset cache cheap to re-validate on every run and on every node. `retry_s` > 0
    retries the whole mirror through storage outages (files already copied are skipped).
    """
    return with_retries(lambda: _download_tree(uri, local_dir), f"download {uri}", retry_s)


def _download_tree(uri: str, local_dir: str) -> int:
    dst = _local(local_dir)
    have = _local_files(dst) if dst.is_dir() else {}
    if not is_s3(uri):
        src = _local(uri)
        copies = [rel for rel, size in _local_files(src).items() if have.get(rel) != size]
        for rel in copies:
            _atomic_copy(src / rel, dst / rel)
        return len(copies)
    bucket, prefix = split_s3(uri)
    client = s3_client()
    todo = {rel: size for rel, size in _s3_objects(client, bucket, prefix).items() if have.get(rel) != size}
    with ThreadPoolExecutor(_TRANSFER_THREADS) as pool:
        list(pool.map(lambda rel: _download(client, bucket, _join_key(prefix, rel), dst / rel, todo[rel]), todo))
    if todo:
        log.info("downloaded %d files from %s to %s", len(todo), uri, dst)
    return len(todo)


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
        if error_code(err) not in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise
        if not key:
            return False
    try:
        resp = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
    except ClientError as err:
        if error_code(err) == "NoSuchBucket":
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
        if error_code(err) not in ("404", "NoSuchBucket", "NotFound"):
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
        if error_code(err) not in ("BucketAlreadyOwnedByYou",):
            raise
