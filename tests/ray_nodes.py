"""A multi-node Ray cluster on one machine for the tests that need real nodes (submit, node loss)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray") if (VENV_BIN / "ray").exists() else shutil.which("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRayCluster:
    """`ray start --head` + `ray start --address` per further node, each a `--block` process in its
    own session: a multi-node cluster on one machine.

    `nodes`: {name: CPUs}, the head first. Each node gets its own ports and --temp-dir, its CPUs
    and a custom resource naming it (`e2e_<name>`). (Ray
    advertises the machine's address even when told 127.0.0.1; the dashboard listens on
    127.0.0.1.) Teardown stops exactly what it started: SIGTERM to each `ray start --block` (which
    drains and shuts its node down), then a kill of any process recorded in their process trees
    (or carrying this cluster's marker variable) that outlived them. Never `ray stop`: it would
    hit every Ray on the machine.
    """

    def __init__(self, root: Path, env: dict[str, str], nodes: dict[str, int] | None = None) -> None:
        self.root = root
        self.nodes = nodes or {"head": 1, "node2": 1}
        self.marker = f"tltrain-e2e-{uuid.uuid4().hex[:8]}"
        self.env = {**env, "TLTRAIN_E2E_CLUSTER": self.marker}
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.by_name: dict[str, subprocess.Popen[bytes]] = {}

    def _node_args(self, name: str) -> list[str]:
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--metrics-export-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        index = list(self.nodes).index(name)
        low = 20000 + (os.getpid() % 100) * 200 + index * 50
        return [
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.nodes[name]}",
            "--num-gpus=0",
            f"--resources={json.dumps({f'e2e_{name}': 1})}",
            f"--temp-dir={self.root / name}",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 49}",
            *[f"{k}={v}" for k, v in ports.items()],
        ]

    def _start(self, name: str, extra: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [RAY, "start", *extra, *self._node_args(name)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        self.by_name[name] = proc

    def start(self) -> None:
        self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ],
        )
        # One node at a time: `ray start` gives its raylet a fixed 30 s to register.
        self._wait(lambda: self._started("head") and self._get("/api/version") is not None, 180, "the head")
        for count, name in enumerate(list(self.nodes)[1:], start=2):
            self._start(name, [f"--address=127.0.0.1:{self.gcs_port}"])
            self._wait(
                lambda n=name, c=count: self._started(n) and len(self.alive_nodes()) == c, 180, f"{name} to join"
            )

    def kill_node(self, name: str) -> None:
        """Lose a node at once: SIGKILL to its whole session (raylet, workers, agents), no drain."""
        os.killpg(self.by_name[name].pid, signal.SIGKILL)
        self.by_name[name].wait()

    def _started(self, name: str) -> bool:
        return "Ray runtime started" in (self.root / f"{name}.log").read_text(errors="replace")

    def _get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.address + path, timeout=5) as r:
                return json.loads(r.read())
        except Exception:
            return None

    def alive_nodes(self) -> list[dict[str, Any]]:
        from ray.util.state import list_nodes

        try:
            return [n.__dict__ for n in list_nodes(address=self.address, filters=[("state", "=", "ALIVE")])]
        except Exception:
            return []

    def _wait(self, ok: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a `ray start` exited early:\n{self.log_tails()}")
            if ok():
                return
            time.sleep(1)
        raise TimeoutError(f"waited {timeout_s:.0f}s for {what}:\n{self.log_tails()}")

    def log_tails(self, lines: int = 25) -> str:
        return "\n".join(
            f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            for log in sorted(self.root.glob("*.log"))
        )

    def _started_processes(self) -> list[Any]:
        """Every live process these `ray start` commands begat: their process trees (GCS, raylets,
        dashboard, agents, workers, job drivers), plus any that left the tree but still carry this
        cluster's marker in their environment."""
        import psutil

        found: dict[int, Any] = {}
        for popen in self.procs:
            try:
                root = psutil.Process(popen.pid)
                for proc in [root, *root.children(recursive=True)]:
                    found[proc.pid] = proc
            except psutil.NoSuchProcess:
                continue
        for proc in psutil.process_iter():
            try:
                if proc.pid not in found and proc.environ().get("TLTRAIN_E2E_CLUSTER") == self.marker:
                    found[proc.pid] = proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return list(found.values())

    def stop(self) -> None:
        import psutil

        started = self._started_processes()
        for popen in reversed(self.procs):  # the worker nodes first, then the head
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)  # `ray start --block` drains, then stops its node
        for popen in reversed(self.procs):
            try:
                popen.wait(timeout=45)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        # Whatever outlived its node (agents, workers): only the processes recorded above.
        # psutil's is_running() also checks the start time, so a recycled PID is never hit.
        left = [p for p in started + self._started_processes() if p.is_running()]
        for proc in left:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
