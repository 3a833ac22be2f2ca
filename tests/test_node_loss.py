"""Losing a whole worker node mid-run: a 3-node Ray cluster on this machine (a head with no CPUs,
two 2-CPU worker nodes), a 2-worker run spread over the two worker nodes, one worker node
SIGKILLed (raylet, workers, agents at once) during epoch 2. Ray Train restarts the worker group on
the capacity that is left and tltrain resumes it from the last checkpoint, every epoch once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ray_nodes import LocalRayCluster
from tltrain import storage
from tltrain.core.checkpoint import MANIFEST_FILE, load_meta

pytestmark = pytest.mark.integration

EPOCHS = 4


@pytest.fixture
def three_nodes() -> Iterator[LocalRayCluster]:
    root = Path(tempfile.mkdtemp(prefix="tln-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    cluster = LocalRayCluster(root, env, nodes={"head": 0, "nodeA": 2, "nodeB": 2})
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_lost_worker_node_is_survived_from_the_last_checkpoint(
    three_nodes: LocalRayCluster, fashion_folders: tuple[str, str], tmp_path: Path
) -> None:
    train, val = fashion_folders
    spec = {
        "name": "node-loss",
        "model": {"name": "test_resnet"},
        "data": {"train": train, "val": val, "image_size": 32, "loader_workers": 0},
        "optim": {"lr": 3.0e-3},
        "loop": {"epochs": EPOCHS, "precision": "fp32", "max_steps_per_epoch": 12, "seed": 0},
        "scaling": {"num_workers": 2, "batch_size_per_worker": 8, "placement_strategy": "SPREAD",
                    "address": f"127.0.0.1:{three_nodes.gcs_port}"},
        "storage": {"uri": str(tmp_path / "runs"), "keep": 2, "max_failures": 3},
        "tracking": {"enabled": False},
    }  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**three_nodes.env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tltrain.cli", "train", str(path), "--json"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    killed_at = None
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        lines.append(line)
        if killed_at is None and line.startswith(f"epoch 1/{EPOCHS}"):
            time.sleep(1.0)  # epoch 2 under way on both nodes
            three_nodes.kill_node("nodeB")
            killed_at = time.monotonic()
        assert time.monotonic() < deadline, "".join(lines[-40:])
    rc = proc.wait(timeout=60)
    out = "".join(lines)
    assert killed_at is not None, out[-3000:]
    assert rc == 0, out[-4000:]
    # The driver printed every epoch once; the restarted group resumed from a checkpoint.
    for epoch in range(1, EPOCHS + 1):
        assert sum(line.startswith(f"epoch {epoch}/{EPOCHS}") for line in lines) == 1, out[-4000:]
    assert "resuming node-loss from" in out, out[-4000:]
    summary = json.loads(lines[-1])
    assert summary["epochs_completed"] == EPOCHS
    # The final checkpoint's history: each epoch once, steps strictly one epoch apart.
    best = tmp_path / "best"
    folders = sorted(p for p in (tmp_path / "runs" / "node-loss").iterdir() if p.name.startswith("checkpoint_"))
    # (An upload cut by the lost node, if rank 0 was there, leaves a folder without a manifest.)
    latest = [p for p in folders if (p / MANIFEST_FILE).is_file()][-1]
    storage.download_tree(str(latest), str(best))
    history = load_meta(best).loop_state.history
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    steps = [h["global_step"] for h in history]
    assert steps == [steps[0] * (i + 1) for i in range(EPOCHS)], steps
    assert three_nodes.by_name["nodeB"].poll() is not None  # nodeB stayed gone: the run finished without it
    print(out[-6000:])  # the failure and restart as Ray logged them (for the README's fault table)
