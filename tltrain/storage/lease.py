"""One writer per run and per sweep: a lease object in the run's storage folder.

`<storage.uri>/<name>/LEASE.json` holds the owner (host, pid and the pid's start time, Ray job id,
the command), when it started and a heartbeat the owner refreshes every `HEARTBEAT_S`. A start of
the same name while the lease is live is refused (`LeaseHeld`, naming the owner and what to do);
the owner deletes the lease when it ends. A lease is dead, and taken over, when:
- its owner ran on this host and that process no longer runs (a pid that was reused by another
  process counts as gone: the start time differs), so a killed driver's re-run resumes at once;
- its owner ran on another host and its heartbeat is older than `STALE_S` (that host's processes
  cannot be seen from here).

The guarantee, by store:
- local disk: the read-decide-write runs under an exclusive `flock` on a lock file beside the
  lease, so of any number of simultaneous starts exactly one wins (on one host, or several hosts
  sharing a POSIX file system whose locks work; many NFS setups do, some do not);
- S3: writes are conditional (`If-None-Match: *` to create, `If-Match: <etag>` to take over or
  refresh), which AWS S3, MinIO and moto honour. A store that ignores the headers (older Ceph
  RGW, some gateways) would let two writers through; as a second line every winner reads the
  lease back after `SETTLE_S` and gives up unless it still holds its own token, which catches
  starts that are not exactly simultaneous but is not a proof against every interleaving.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from tltrain.storage._retry import error_code
from tltrain.storage.store import _local, is_s3, list_files, s3_client, split_s3

log = logging.getLogger(__name__)

LEASE_FILE = "LEASE.json"
LOCK_FILE = ".LEASE.lock"  # local disk: the flock beside the lease (never on S3)
LEASE_FILES = (LEASE_FILE, LOCK_FILE)  # what a lease leaves in a folder: not output of the run
HEARTBEAT_S = 15.0  # how often a live owner refreshes its heartbeat
STALE_S = 120.0  # a lease from another host with an older heartbeat is dead (8 missed heartbeats)
SETTLE_S = 1.0  # S3: read the lease back this long after winning it (stores without conditional writes)


class LeaseHeld(RuntimeError):
    """Another live process owns the run or sweep name."""


@dataclass
class LeaseInfo:
    """What LEASE.json holds."""

    name: str
    kind: str  # "run" or "sweep"
    host: str
    pid: int
    pid_started: str  # the process's start time on its host ("" where it cannot be read)
    started_at: float
    heartbeat_at: float
    token: str  # unique per acquisition: who wrote this version
    command: str = ""
    ray_job_id: str = ""

    @classmethod
    def from_json(cls, text: str) -> LeaseInfo:
        raw = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def state(self, now: float | None = None) -> str:
        """ "live", or why the lease is dead: "dead: pid N is not running on HOST", "stale: ..."."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname():
            if _process_start(self.pid) != self.pid_started or not _running(self.pid):
                return f"dead: pid {self.pid} is not running on {self.host}"
            return "live"
        age = now - self.heartbeat_at
        if age > STALE_S:
            return f"stale: no heartbeat from {self.host} for {age:.0f}s (> {STALE_S:.0f}s)"
        return "live"

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        job = f", Ray job {self.ray_job_id}" if self.ray_job_id else ""
        return (
            f"pid {self.pid} on {self.host}{job}, started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_at))}, "
            f"last heartbeat {now - self.heartbeat_at:.0f}s ago" + (f" ({self.command})" if self.command else "")
        )


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), "" if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _new_info(name: str, kind: str) -> LeaseInfo:
    now = time.time()
    return LeaseInfo(
        name=name, kind=kind, host=socket.gethostname(), pid=os.getpid(), pid_started=_process_start(os.getpid()),
        started_at=now, heartbeat_at=now, token=uuid.uuid4().hex, command=" ".join(sys.argv[:4])[:200],
    )  # fmt: skip


# ---- the two backends: read, and write only if the lease is what we read -------------------------


class _LocalStore:
    def __init__(self, folder: str) -> None:
        self.path = _local(folder) / LEASE_FILE
        self.lock_path = self.path.with_name(LOCK_FILE)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> tuple[LeaseInfo | None, str | None]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        info = LeaseInfo.from_json(text)
        return info, info.token

    def write(self, info: LeaseInfo, expected: str | None) -> str | None:
        """Write if the lease's current version is `expected` (None = absent); the new version or
        None when someone else's is there. Callers hold `exclusive()`."""
        _, current = self.read()
        if current != expected:
            return None
        tmp = self.path.with_name(f".{LEASE_FILE}.{info.token}")
        tmp.write_text(info.to_json())
        os.replace(tmp, self.path)
        return info.token

    def delete(self, expected: str) -> None:
        _, current = self.read()
        if current == expected:
            self.path.unlink(missing_ok=True)


class _S3Store:
    def __init__(self, folder: str) -> None:
        self.bucket, prefix = split_s3(folder.rstrip("/") + "/" + LEASE_FILE)
        self.key = prefix
        self.client = s3_client()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        yield  # the conditional writes are the exclusion

    def read(self) -> tuple[LeaseInfo | None, str | None]:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if error_code(err) in ("NoSuchKey", "404"):
                return None, None
            raise
        return LeaseInfo.from_json(obj["Body"].read().decode()), obj["ETag"]

    def write(self, info: LeaseInfo, expected: str | None) -> str | None:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            out = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=info.to_json().encode(), **condition)
        except ClientError as err:
            if error_code(err) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey"):
                return None
            raise
        return str(out["ETag"])

    def delete(self, expected: str) -> None:
        _, current = self.read()
        if current == expected:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


def _store(folder: str) -> _LocalStore | _S3Store:
    return _S3Store(folder) if is_s3(folder) else _LocalStore(folder)


def holds_output(folder: str) -> bool:
    """Whether the folder holds anything but a lease (checkpoints, a sweep record, a user's files)."""
    return any(f not in LEASE_FILES for f in list_files(folder))


def read_lease(folder: str) -> LeaseInfo | None:
    """The lease in a run or sweep folder, if any (live or not)."""
    return _store(folder).read()[0]


# ---- holding one --------------------------------------------------------------------------------


@dataclass
class Lease:
    """A lease this process holds; `with` it, or call `release()`. The heartbeat runs in a daemon
    thread; `lost` turns true (and an error is logged) if another process took the lease over."""

    folder: str
    info: LeaseInfo
    version: str
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start_heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        def beat() -> None:
            while not self._stop.wait(every_s):
                self.refresh()

        self._thread = threading.Thread(target=beat, name=f"lease-{self.info.name}", daemon=True)
        self._thread.start()

    def refresh(self, ray_job_id: str | None = None) -> None:
        store = _store(self.folder)
        with store.exclusive():
            self.info.heartbeat_at = time.time()
            if ray_job_id:
                self.info.ray_job_id = ray_job_id
            try:
                version = store.write(self.info, self.version)
            except Exception as err:  # noqa: BLE001  # an outage: the next beat tries again
                log.warning("lease %s: heartbeat not written (%s); retrying", self.folder, err)
                return
        if version is None:
            if not self.lost:
                log.error(
                    "lease %s: another process took this %s over (its heartbeat was older than %.0fs); "
                    "stop this one: two writers now share the folder",
                    self.folder, self.info.kind, STALE_S,
                )  # fmt: skip
            self.lost = True
        else:
            self.version = version

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost:
            return
        store = _store(self.folder)
        with contextlib.suppress(Exception), store.exclusive():
            store.delete(self.version)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire(folder: str, name: str, kind: str, *, force: bool = False, heartbeat: bool = True) -> Lease:
    """Take the lease of `folder` (a run's or sweep's storage folder) or raise LeaseHeld.

    `force` (`--force-unlock`): take it even from a live-looking owner, for when the user has
    checked that owner is gone (a host that is down, a container that was removed)."""
    store = _store(folder)
    mine = _new_info(name, kind)
    with store.exclusive():
        current, version = store.read()
        if current is not None and not force:
            state = current.state()
            if state == "live":
                raise LeaseHeld(_held_message(folder, current))
            log.warning("lease %s: taking over from %s (%s)", folder, current.describe(), state)
        won = store.write(mine, version)
    if won is None:  # someone else wrote between our read and our write
        current = store.read()[0]
        raise LeaseHeld(_held_message(folder, current) if current else f"{folder}: another start won the lease")
    if isinstance(store, _S3Store):
        time.sleep(SETTLE_S)
        now, version_now = store.read()
        if now is None or now.token != mine.token:
            raise LeaseHeld(_held_message(folder, now) if now else f"{folder}: the lease vanished while taking it")
        won = version_now or won
    lease = Lease(folder=folder, info=mine, version=won)
    if heartbeat:
        lease.start_heartbeat()
    return lease


def _held_message(folder: str, owner: LeaseInfo) -> str:
    what = "sweep" if owner.kind == "sweep" else "run"
    return (
        f"{what} {owner.name!r} is in use: {folder}/{LEASE_FILE} is held by {owner.describe()}. "
        f"Wait for it to finish (`tltrain runs {folder.rsplit('/', 1)[0]}` shows the owners), start under "
        f"another name (--set name=...), or, once you have checked that owner is gone, re-run with --force-unlock"
    )


def list_leases(storage_uri: str) -> list[tuple[str, LeaseInfo | None]]:
    """(run or sweep folder name, its lease or None) for every folder directly under storage_uri
    that holds tltrain output (a lease, checkpoints or a sweep record)."""
    out: list[tuple[str, LeaseInfo | None]] = []
    if is_s3(storage_uri):
        bucket, prefix = split_s3(storage_uri.rstrip("/") + "/")
        client = s3_client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        names = sorted(p["Prefix"][len(prefix) :].rstrip("/") for page in pages for p in page.get("CommonPrefixes", []))
    else:
        root = _local(storage_uri)
        names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for name in names:
        out.append((name, read_lease(f"{storage_uri.rstrip('/')}/{name}")))
    return out
