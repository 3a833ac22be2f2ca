"""Faults a long fine-tuning run meets, injected for real: a training worker SIGKILLed mid-epoch,
the driver SIGKILLed, the S3 endpoint gone for ~10 s during a checkpoint upload, a checkpoint
damaged in storage. Each run is the real CLI (`python -m tltrain.cli train`) on 2 Ray Train CPU
workers, with checkpoints in a real S3 server (moto) on 127.0.0.1.

The Ray cluster for the kill tests is started here with `ray start --head --block` in a new
session, with its own temp dir and ports: killing a driver then leaves nothing behind that the
test did not start, and teardown ends exactly the processes of that session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tltrain import storage
from tltrain.core.checkpoint import (
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointMeta,
    load_meta,
    save_checkpoint,
    verify_checkpoint,
)
from tltrain.storage import _retry as storage_retry
from tltrain.storage import store

RAY = str(Path(sys.executable).parent / "ray")


# ---- processes: only ever the ones this module started ------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces


def _session_of(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[3])  # state ppid pgrp session ...
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _session_pids(sid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _session_of(int(p)) == sid]


def _train_workers(sid: int) -> list[int]:
    """PIDs of live Ray Train worker actors of the cluster (Ray sets their title to ray::RayTrainWorker...)."""
    return sorted(p for p in _session_pids(sid) if _cmdline(p).startswith("ray::RayTrainWorker"))


def _alive(pid: int) -> bool:
    try:
        state = _stat_fields(pid)[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class RayCluster:
    def __init__(self, address: str, sid: int, temp_dir: str) -> None:
        self.address, self.sid, self.temp_dir = address, sid, temp_dir


@pytest.fixture(scope="module")
def s3_proxy(s3_server: str) -> Iterator[FlakyProxy]:
    """Every S3 request of the runs in this module goes through this forwarder (transparent until a
    test arms an outage); the test itself talks to the S3 server directly."""
    with FlakyProxy(int(s3_server.rsplit(":", 1)[1])) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def ray_cluster(s3_proxy: FlakyProxy) -> Iterator[RayCluster]:
    """A 2-CPU Ray head in its own session; workers inherit the (proxied) S3 endpoint and fake keys."""
    temp_dir = tempfile.mkdtemp(prefix="tlf", dir="/tmp")  # short: Ray's unix socket paths are limited
    port = _free_port()
    ports = {
        flag: _free_port()
        for flag in (
            "--dashboard-port",
            "--ray-client-server-port",
            "--node-manager-port",
            "--object-manager-port",
            "--dashboard-agent-grpc-port",
            "--dashboard-agent-listen-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
        )
    }
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--temp-dir",
        temp_dir,
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--object-store-memory",
        str(200 << 20),
        "--disable-usage-stats",
    ]
    for flag, value in ports.items():
        cmd += [flag, str(value)]
    env = _cli_env(s3_proxy)
    # Not read by `ray start --head`, but by Ray's own helper actors (Train's PlacementGroupCleaner
    # looks actors up through the state API), which otherwise refuse to pick among the several
    # Ray instances other test runs keep on a shared machine.
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log_file:
        head = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    sid = head.pid  # start_new_session: the session id is the leader's pid
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text(errors="replace"):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield RayCluster(f"127.0.0.1:{port}", sid, temp_dir)
    finally:
        head.send_signal(signal.SIGTERM)  # --block: ray start stops what it started ...
        deadline = time.monotonic() + 10
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _session_pids(sid):  # ... and what is left of this session (only) is killed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---- the job ----------------------------------------------------------------------------------


def _spec(
    tmp_path: Path, fashion: tuple[str, str], bucket: str, name: str, epochs: int, address: str, keep: int = 2
) -> Path:
    spec = {
        "name": name,
        "model": {"name": "test_resnet"},
        "data": {
            "train": fashion[0],
            "val": fashion[1],
            "image_size": 32,
            "loader_workers": 0,
            "augment": "none",
            "max_images_per_class": 16,
        },
        "strategy": {"freeze_depth": 1},
        "optim": {"lr": 3.0e-3, "weight_decay": 0.01},
        "schedule": {"kind": "constant"},
        "loop": {"epochs": epochs, "precision": "fp32", "seed": 0},
        # 160 train images / (2 workers x 8) = 10 optimizer steps an epoch.
        "scaling": {"num_workers": 2, "batch_size_per_worker": 8, "address": address},
        "storage": {"uri": f"{bucket}/runs", "keep": keep, "max_failures": 2},
        "tracking": {"enabled": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


STEPS_PER_EPOCH = 10


def _cli_env(proxy: FlakyProxy) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", AWS_ENDPOINT_URL=proxy.url)
    return env


class Cli:
    """`python -m tltrain.cli ...` in the background, output to files (read while it runs)."""

    def __init__(self, tmp_path: Path, label: str, proxy: FlakyProxy, *args: str) -> None:
        self.out_path, self.err_path = tmp_path / f"{label}.out", tmp_path / f"{label}.err"
        self.started = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tltrain.cli", *args], stdout=out, stderr=err, cwd=tmp_path, env=_cli_env(proxy)
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout_s)
            print(f"{self.out_path.stem}: exit {code} after {time.monotonic() - self.started:.0f}s")
            return code
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"CLI still running after {timeout_s:.0f}s\n{self.stdout[-2000:]}\n{self.stderr[-4000:]}"
            ) from None

    def summary(self) -> dict[str, Any]:
        return json.loads(self.stdout.strip().splitlines()[-1])


def _complete_checkpoints(run_uri: str) -> list[str]:
    """Names of checkpoint folders in the run that have a MANIFEST (sorted = oldest first)."""
    return sorted(k.split("/")[0] for k in storage.list_files(run_uri) if k.endswith(f"/{MANIFEST_FILE}"))


def _wait_for(predicate: Any, timeout_s: float, what: str, cli: Cli | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if cli is not None and cli.proc.poll() is not None:
            raise AssertionError(
                f"CLI exited ({cli.proc.returncode}) before {what}\n{cli.stdout[-2000:]}\n{cli.stderr[-4000:]}"
            )
        time.sleep(0.3)
    raise AssertionError(
        f"timed out after {timeout_s:.0f}s waiting for {what}" + (f"\n{cli.stderr[-4000:]}" if cli else "")
    )


def _epoch_lines(stdout: str, total: int) -> list[int]:
    return [int(m) for m in re.findall(rf"^epoch (\d+)/{total}\b", stdout, flags=re.M)]


def _final_meta(tmp_path: Path, checkpoint_uri: str) -> CheckpointMeta:
    local = tmp_path / f"dl-{checkpoint_uri.rsplit('/', 1)[-1]}"
    storage.download_tree(checkpoint_uri, str(local))
    verify_checkpoint(local)
    return load_meta(local)


def _latest_checkpoint_uri(run_uri: str) -> str:
    return f"{run_uri}/{_complete_checkpoints(run_uri)[-1]}"


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train writes it when it registers a checkpoint


def _registered_latest(run_uri: str) -> str | None:
    """The checkpoint Ray has registered as the run's latest (what a restart resumes from)."""
    client = storage.s3_client()
    bucket, key = storage.split_s3(f"{run_uri}/{SNAPSHOT}")
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    latest = json.loads(body).get("latest_checkpoint_result")
    return latest["checkpoint_dir_name"] if latest else None


# ---- 1. a training worker is SIGKILLed mid-epoch ----------------------------------------------


@pytest.mark.integration
def test_worker_sigkill_mid_epoch_restores_from_last_checkpoint(
    tmp_path: Path, s3_proxy: FlakyProxy, ray_cluster: RayCluster, s3_bucket: str, fashion_folders: tuple[str, str]
) -> None:
    epochs = 3
    spec = _spec(tmp_path, fashion_folders, s3_bucket, "kill-worker", epochs, ray_cluster.address)
    run_uri = f"{s3_bucket}/runs/kill-worker"
    cli = Cli(tmp_path, "run", s3_proxy, "train", str(spec), "--json")
    # Once Ray has registered checkpoint 1, rank 0 is already training epoch 2 (an epoch takes a
    # few seconds here): kill a worker half a second into it.
    registered = _wait_for(lambda: _registered_latest(run_uri), 600, "checkpoint 1 registered", cli)
    workers = _wait_for(lambda: _train_workers(ray_cluster.sid), 30, "train workers", cli)
    time.sleep(0.5)
    registered = _registered_latest(run_uri)
    victim = workers[-1]
    os.kill(victim, signal.SIGKILL)
    print(
        f"SIGKILL worker pid {victim} of {workers}; latest registered checkpoint {registered}, "
        f"complete in storage: {_complete_checkpoints(run_uri)}"
    )

    assert cli.wait(600) == 0, cli.stderr[-5000:]
    assert not _alive(victim)
    summary = cli.summary()
    resumed = re.search(
        r"resuming kill-worker from \S+/(checkpoint_\S+) \(epoch (\d+), global_step (\d+)\)", cli.stderr
    )
    assert resumed, cli.stderr[-5000:]  # the worker group was restarted from a checkpoint ...
    # ... the last one registered before the kill, or a later one: on an idle machine an epoch can
    # finish and register in the 0.5 s between reading the latest and the kill (names sort by time).
    assert resumed.group(1) >= registered
    restored_epoch = int(resumed.group(2))
    assert 1 <= restored_epoch < epochs and int(resumed.group(3)) == restored_epoch * STEPS_PER_EPOCH
    # Every epoch reported exactly once and in order: the interrupted epoch was re-run from the
    # checkpoint, and nothing before the checkpoint was trained (or reported) twice.
    assert _epoch_lines(cli.stdout, epochs) == list(range(1, epochs + 1)), cli.stdout
    assert summary["epochs_completed"] == epochs and summary["epochs_this_invocation"] == epochs

    meta = _final_meta(tmp_path, _latest_checkpoint_uri(run_uri))
    history = meta.loop_state.history
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert [h["global_step"] for h in history] == [STEPS_PER_EPOCH * e for e in range(1, epochs + 1)]
    assert meta.epoch == epochs and meta.global_step == epochs * STEPS_PER_EPOCH


# ---- 2. the driver is SIGKILLed; running the same job again resumes -----------------------------


@pytest.mark.integration
def test_driver_sigkill_then_rerun_resumes(
    tmp_path: Path, s3_proxy: FlakyProxy, ray_cluster: RayCluster, s3_bucket: str, fashion_folders: tuple[str, str]
) -> None:
    epochs = 3
    spec = _spec(tmp_path, fashion_folders, s3_bucket, "kill-driver", epochs, ray_cluster.address)
    run_uri = f"{s3_bucket}/runs/kill-driver"
    first = Cli(tmp_path, "first", s3_proxy, "train", str(spec), "--json")
    _wait_for(lambda: _registered_latest(run_uri), 600, "checkpoint 1 registered", first)
    time.sleep(0.5)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    print(f"SIGKILL driver pid {first.proc.pid} after epoch lines {_epoch_lines(first.stdout, epochs)}")
    # The cluster ends the dead driver's job: its Train controller and workers go away.
    _wait_for(lambda: not _train_workers(ray_cluster.sid), 120, "the killed job's workers to exit")
    registered = _registered_latest(run_uri)

    second = Cli(tmp_path, "second", s3_proxy, "train", str(spec), "--json")
    assert second.wait(600) == 0, second.stderr[-5000:]
    resumed = re.search(
        r"resuming kill-driver from \S+/(checkpoint_\S+) \(epoch (\d+), global_step (\d+)\)", second.stderr
    )
    assert resumed, second.stderr[-5000:]
    assert resumed.group(1) == registered
    done_before = int(resumed.group(2))
    assert 1 <= done_before < epochs and int(resumed.group(3)) == done_before * STEPS_PER_EPOCH
    assert _epoch_lines(second.stdout, epochs) == list(range(done_before + 1, epochs + 1)), second.stdout
    summary = second.summary()
    assert summary["epochs_completed"] == epochs
    assert summary["epochs_this_invocation"] == epochs - done_before
    meta = _final_meta(tmp_path, _latest_checkpoint_uri(run_uri))
    assert [h["epoch"] for h in meta.loop_state.history] == list(range(1, epochs + 1))
    assert meta.global_step == epochs * STEPS_PER_EPOCH


# ---- 3. the S3 endpoint goes away for ~10 s during a checkpoint upload ---------------------------


class FlakyProxy:
    """A TCP forwarder on 127.0.0.1 in front of the S3 server, transparent until armed.

    `arm(pattern, nth, outage_s)`: when the nth request matching `pattern` arrives, that request
    is dropped, every open connection is cut (uploads in flight fail mid-request) and the port
    stops listening (new connections are refused) for outage_s; then it listens on the same port
    again. The S3 server behind keeps its state, like a store behind a failed load balancer."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.outages: list[dict[str, Any]] = []  # {"cut": request line, "start": t, "end": t}
        self._triggers: list[list[Any]] = []  # [pattern, nth, outage_s, seen]
        self._outage_s = 0.0
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._down = threading.Event()
        self._stop = threading.Event()
        self._listener = self._listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def arm(self, pattern: bytes, nth: int, outage_s: float) -> None:
        with self._lock:
            self._triggers.append([re.compile(pattern), nth, outage_s, 0])

    def down_for(self, outage_s: float) -> None:
        """An outage starting now (returns once the port refuses connections)."""
        self._start_outage(b"(manual)", outage_s)
        while self._down.is_set() and self._listener.fileno() != -1:
            time.sleep(0.01)

    def _start_outage(self, cut: bytes, outage_s: float) -> None:
        self._outage_s = outage_s
        self.outages.append({"cut": cut.decode(errors="replace"), "start": time.monotonic(), "end": None})
        self._down.set()

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drop_all()

    def _listen(self) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(128)
        s.settimeout(0.1)
        return s

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._down.is_set():
                self._listener.close()  # refused from now on
                self._drop_all()
                time.sleep(self._outage_s)
                self._listener = self._listen()
                self.outages[-1]["end"] = time.monotonic()
                self._down.clear()
                continue
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._listener.close()

    def _fires(self, data: bytes) -> bytes | None:
        with self._lock:
            if self._down.is_set():
                return None
            for trigger in self._triggers:
                m = trigger[0].search(data)
                if m:
                    trigger[3] += 1
                    if trigger[3] == trigger[1]:
                        self._triggers.remove(trigger)
                        self._start_outage(m.group(0), trigger[2])
                        return m.group(0)
        return None

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and self._triggers and self._fires(data):
                    return  # this request never reaches the server
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            src.close()

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.mark.integration
def test_s3_outages_during_checkpoint_upload_and_ray_state_write_are_ridden_out(
    tmp_path: Path, s3_proxy: FlakyProxy, ray_cluster: RayCluster, s3_bucket: str, fashion_folders: tuple[str, str]
) -> None:
    epochs = 3
    # keep=3: Ray's retention must not delete the interrupted checkpoint before it is inspected.
    spec = _spec(tmp_path, fashion_folders, s3_bucket, "s3-outage", epochs, ray_cluster.address, keep=3)
    # Outage 1: 10 s from the moment rank 0 uploads checkpoint 2's weights (tltrain's upload).
    s3_proxy.arm(rb"PUT /[^ ?]*?/s3-outage/checkpoint_[^/ ?]+/model\.safetensors", nth=2, outage_s=10.0)
    # Outage 2: 10 s from Ray's controller writing its run snapshot for checkpoint 3 (Ray's I/O).
    s3_proxy.arm(rb"POST /[^ ?]*?/s3-outage/checkpoint_manager_snapshot\.json\?uploads[ =&]", nth=3, outage_s=10.0)
    first_outage = len(s3_proxy.outages)
    cli = Cli(tmp_path, "run", s3_proxy, "train", str(spec), "--json")
    assert cli.wait(600) == 0, cli.stderr[-5000:]
    outages = s3_proxy.outages[first_outage:]
    for o in outages:
        print(f"S3 endpoint down {o['end'] - o['start']:.1f}s from: {o['cut']}")
    assert len(outages) == 2, "an outage never happened"
    assert all(o["end"] - o["start"] >= 10.0 for o in outages)
    summary = cli.summary()
    assert summary["epochs_completed"] == epochs and summary["epochs_this_invocation"] == epochs
    assert _epoch_lines(cli.stdout, epochs) == list(range(1, epochs + 1))
    # Retried in place (each retry logged), by the worker and by Ray's controller; no restart.
    assert re.search(r"RayTrainWorker.*upload s3://\S+/model\.safetensors: storage unavailable", cli.stderr), (
        cli.stderr[-5000:]
    )
    assert re.search(r"TrainController.*write \S+checkpoint_manager_snapshot\.json: storage unavailable", cli.stderr), (
        cli.stderr[-5000:]
    )
    assert "resuming s3-outage" not in cli.stderr and "ControllerError" not in cli.stderr
    run_uri = f"{s3_bucket}/runs/s3-outage"
    cut_name = outages[0]["cut"].split("/")[-2]
    complete = _complete_checkpoints(run_uri)
    assert len(complete) == epochs and cut_name in complete  # the interrupted checkpoint made it, whole
    for name in complete:  # and every checkpoint that has a manifest verifies
        local = tmp_path / "verify" / name
        storage.download_tree(f"{run_uri}/{name}", str(local))
        verify_checkpoint(local)
    assert load_meta(tmp_path / "verify" / cut_name).epoch == 2
    assert load_meta(tmp_path / "verify" / complete[-1]).epoch == epochs
    assert _registered_latest(run_uri) == complete[-1]  # Ray's snapshot was written after all


# ---- 4. the latest checkpoint is damaged in storage ----------------------------------------------


@pytest.mark.integration
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, s3_proxy: FlakyProxy, ray_cluster: RayCluster, s3_bucket: str, fashion_folders: tuple[str, str]
) -> None:
    spec = _spec(tmp_path, fashion_folders, s3_bucket, "bitrot", 2, ray_cluster.address)
    run_uri = f"{s3_bucket}/runs/bitrot"
    first = Cli(tmp_path, "first", s3_proxy, "train", str(spec), "--json")
    assert first.wait(600) == 0, first.stderr[-5000:]
    older, latest = _complete_checkpoints(run_uri)
    latest_uri = f"{run_uri}/{latest}"
    assert _final_meta(tmp_path, latest_uri).epoch == 2

    # Flip one byte in the tensor data (past the safetensors header) of the latest checkpoint.
    local = tmp_path / "tamper" / MODEL_FILE
    storage.download_file(f"{latest_uri}/{MODEL_FILE}", str(local))
    data = bytearray(local.read_bytes())
    data[len(data) // 2] ^= 0xFF
    local.write_bytes(bytes(data))
    storage.upload_file(str(local), f"{latest_uri}/{MODEL_FILE}")

    second = Cli(tmp_path, "second", s3_proxy, "train", str(spec), "--set", "loop.epochs=3", "--json")
    assert second.wait(600) == 0, second.stderr[-5000:]
    err = second.stderr
    assert f"{latest} is corrupt: {MODEL_FILE} does not match its sha256" in err, err[-5000:]
    assert "falling back to the previous checkpoint" in err
    assert re.search(rf"resuming bitrot from s3://\S+/{older} \(epoch 1, global_step {STEPS_PER_EPOCH}\)", err), err[
        -5000:
    ]
    # Epoch 2 is trained again from the good epoch-1 checkpoint, then epoch 3.
    assert _epoch_lines(second.stdout, 3) == [2, 3], second.stdout
    # ... and it is the same epoch 2 as the first time (weights, optimizer and schedule restored;
    # this job has no random augmentation, so training is deterministic on CPU).
    loss = re.compile(r"^epoch 2/\d+  train/loss (\S+)  val/loss (\S+)", re.M)
    assert loss.search(second.stdout).groups() == loss.search(first.stdout).groups()
    summary = second.summary()
    assert summary["epochs_completed"] == 3
    assert summary["best_checkpoint"] != latest_uri  # never the damaged one, whatever its val/acc
    meta = _final_meta(tmp_path, _latest_checkpoint_uri(run_uri))
    assert latest_uri in meta.invalid_checkpoints
    assert [h["epoch"] for h in meta.loop_state.history] == [1, 2, 3]
    assert meta.global_step == 3 * STEPS_PER_EPOCH


# ---- the same mechanisms, without Ray (seconds) --------------------------------------------------


def _local_run(tmp_path: Path) -> tuple[Any, Path, list[Path]]:
    """A local run folder with four complete checkpoints of a tiny model (epochs 1-4)."""
    from torch import nn

    from tltrain.spec.load import parse_spec

    spec = parse_spec(
        {
            "name": "r",
            "model": {"name": "test_resnet"},
            "data": {"train": "/d", "val_fraction": 0.1},
            "storage": {"uri": str(tmp_path / "runs")},
        }
    )
    run = tmp_path / "runs" / "r"
    dirs = []
    for epoch in range(1, 5):
        model = nn.Linear(2, 2)
        nn.init.constant_(model.weight, float(epoch))
        d = run / f"checkpoint_2026-01-01_00-00-0{epoch}.000000"
        save_checkpoint(d, model.state_dict(), {"optimizer": {}}, CheckpointMeta(epoch=epoch, global_step=10 * epoch))
        dirs.append(d)
    return spec, run, dirs


def _restore_from(monkeypatch: pytest.MonkeyPatch, spec: Any, latest: Path) -> tuple[Any, list[str], Any]:
    import ray.train
    from torch import nn

    from tltrain.execution import worker as ray_train

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(path=str(latest)))
    model = nn.Linear(2, 2)
    resume, rejected = ray_train._restore(model, spec, rank=0)
    return resume, rejected, model


def test_restore_falls_back_past_corrupt_and_incomplete_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec, _run, (c1, c2, c3, c4) = _local_run(tmp_path)
    # Ray's latest is c3 (c4 is a newer upload Ray never registered: not a candidate).
    data = bytearray((c3 / MODEL_FILE).read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the tensor data
    (c3 / MODEL_FILE).write_bytes(bytes(data))
    (c2 / MANIFEST_FILE).unlink()  # an upload that never finished
    resume, rejected, model = _restore_from(monkeypatch, spec, c3)
    assert resume.meta.epoch == 1 and float(model.weight[0, 0].detach()) == 1.0
    assert rejected == [str(c3), str(c2)]
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{c3} is corrupt: {MODEL_FILE} does not match its sha256; falling back" in m for m in messages), (
        messages
    )
    assert any(f"{c2} is incomplete: no {MANIFEST_FILE}" in m for m in messages), messages
    assert any(m.startswith(f"resuming r from {c1} (epoch 1, global_step 10)") for m in messages), messages


def test_restore_refuses_a_resealed_malicious_train_state_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import json as _json

    spec, _run, (_c1, _c2, c3, _c4) = _local_run(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # type: ignore[override]
            return (os.system, (f"touch {marker}",))

    import torch

    torch.save({"optimizer": Payload()}, c3 / STATE_FILE)
    manifest = _json.loads((c3 / MANIFEST_FILE).read_text())
    manifest["files"][STATE_FILE] = hashlib.sha256((c3 / STATE_FILE).read_bytes()).hexdigest()
    (c3 / MANIFEST_FILE).write_text(_json.dumps(manifest))
    resume, rejected, _ = _restore_from(monkeypatch, spec, c3)
    assert resume.meta.epoch == 2 and rejected == [str(c3)]
    assert not marker.exists()


def test_restore_with_no_complete_checkpoint_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, run, dirs = _local_run(tmp_path)
    for d in dirs:
        (d / MANIFEST_FILE).unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"no complete checkpoint to resume r from \(3 tried under {re.escape(str(run))}\); delete",
    ):
        _restore_from(monkeypatch, spec, dirs[2])


def test_best_checkpoint_skips_ones_a_restore_rejected(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import ray.train

    from tltrain.execution.trainer import best_checkpoint

    spec, _run, (c1, c2, c3, c4) = _local_run(tmp_path)
    meta = CheckpointMeta.from_json((c4 / "meta.json").read_text())
    meta.invalid_checkpoints = [str(c3)]
    (c4 / "meta.json").write_text(meta.to_json())
    ckpt = {d: ray.train.Checkpoint(path=str(d)) for d in (c1, c2, c3, c4)}
    result = SimpleNamespace(
        checkpoint=ckpt[c4],
        best_checkpoints=[(ckpt[c1], {"val/acc": 0.5}), (ckpt[c3], {"val/acc": 0.9}), (ckpt[c4], {"val/acc": 0.7})],
    )
    best, metrics = best_checkpoint(result, spec.storage.uri, spec.storage.metric, spec.storage.mode)
    assert best == str(c4) and metrics == {"val/acc": 0.7}


@pytest.mark.integration
def test_checkpoint_upload_puts_the_manifest_last(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    ckpt = save_checkpoint(tmp_path / "c", {"w": torch.ones(3)}, {"optimizer": {}}, CheckpointMeta(epoch=1))
    order: list[str] = []
    real_upload = store._upload
    monkeypatch.setattr(
        store,
        "_upload",
        lambda client, src, bucket, key: (real_upload(client, src, bucket, key), order.append(Path(key).name)),
    )
    assert storage.upload_tree(str(ckpt), f"{s3_bucket}/run/c", last=[MANIFEST_FILE], retry_s=5) == 4
    assert order[-1] == MANIFEST_FILE and sorted(order[:-1]) == sorted(["meta.json", MODEL_FILE, STATE_FILE])


@pytest.mark.integration
def test_upload_retries_through_an_outage_and_gives_up_on_refusals(
    tmp_path: Path, s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch
    from botocore.exceptions import ClientError

    ckpt = save_checkpoint(tmp_path / "c", {"w": torch.ones(3)}, None, CheckpointMeta(epoch=1))
    with FlakyProxy(int(s3_server.rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        # Down for 4 s: the upload waits it out (logging each retry) and completes.
        proxy.down_for(4.0)
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="tltrain.storage._retry"):
            storage.upload_tree(str(ckpt), f"{s3_bucket}/run/c", last=[MANIFEST_FILE], retry_s=60)
        assert time.monotonic() - t0 >= 3.0
        assert any("storage unavailable" in r.getMessage() for r in caplog.records)
        local = tmp_path / "back"
        storage.download_tree(f"{s3_bucket}/run/c", str(local))
        verify_checkpoint(local)
        # Down for longer than the retry budget: a clear failure, not a hang.
        proxy.down_for(8.0)
        t0 = time.monotonic()
        with pytest.raises(Exception) as err:
            storage.upload_tree(str(ckpt), f"{s3_bucket}/run/d", retry_s=2)
        assert storage_retry._is_transient(err.value) and time.monotonic() - t0 < 8.0
        time.sleep(max(0.0, 8.5 - (time.monotonic() - t0)))
        # A refusal (no such bucket) is not retried.
        t0 = time.monotonic()
        with pytest.raises(ClientError, match="NoSuchBucket"):
            storage.upload_tree(str(ckpt), "s3://no-such-bucket-here/x", retry_s=60)
        assert time.monotonic() - t0 < 5.0


@pytest.mark.integration
def test_rays_filesystem_rides_out_an_outage(
    tmp_path: Path, s3_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The filesystem handed to Ray (storage.pyarrow_filesystem(..., retry_s)) retries its writes,
    reads and listings through an outage: Ray's controller writes its run snapshot through it."""
    import pickle

    import pyarrow.fs as pafs

    with FlakyProxy(int(s3_server.rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        fs, base = storage.pyarrow_filesystem(f"{s3_bucket}/ray", retry_s=60)
        fs = pickle.loads(pickle.dumps(fs))  # as Ray ships it to its controller and workers
        with fs.open_output_stream(f"{base}/before.json") as out:
            out.write(b"{}")
        proxy.down_for(4.0)
        with caplog.at_level("WARNING", logger="tltrain.storage._retry"):
            with fs.open_output_stream(f"{base}/run/snapshot.json") as out:
                out.write(b'{"latest": 1}')
        assert any("storage unavailable" in r.getMessage() for r in caplog.records)
        proxy.down_for(3.0)
        with fs.open_input_stream(f"{base}/run/snapshot.json") as stream:
            assert stream.read() == b'{"latest": 1}'
        proxy.down_for(3.0)
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        assert {i.path.rsplit("/", 1)[-1] for i in infos if i.type == pafs.FileType.File} == {
            "before.json",
            "snapshot.json",
        }
        # Not found is an answer, not an outage: no retry.
        t0 = time.monotonic()
        with pytest.raises(FileNotFoundError):
            fs.open_input_stream(f"{base}/missing.json")
        assert time.monotonic() - t0 < 5
