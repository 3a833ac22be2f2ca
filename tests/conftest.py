"""Shared fixtures: a real S3 server (moto, as a subprocess), fresh buckets, real images.

Markers the lead may register in pyproject ([tool.pytest.ini_options] markers = [...]):
  integration: starts real servers on 127.0.0.1 (S3, Ray, MLflow)
  slow: more than a few seconds
  gpu: needs CUDA; skipped without it
"""

from __future__ import annotations

import os

# Set before anything imports timm/huggingface_hub or ray: a hub lookup otherwise retries for ~50 s,
# and Ray 2.60 turns token auth on for clusters started by `ray start`.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # no usage reports from test runs

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_command(port: int) -> list[str]:
    exe = Path(sys.executable).parent / "moto_server"
    if exe.exists():
        return [str(exe), "-H", "127.0.0.1", "-p", str(port)]
    found = shutil.which("moto_server")
    if found:
        return [found, "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode} before answering")
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answered, even if not with 200
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout_s:.0f}s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 endpoint on 127.0.0.1; boto3 (and so storage.*) is pointed at it via the env
    variables boto3 itself reads. Yields the endpoint URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(_moto_command(port), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(url, proc)
        with pytest.MonkeyPatch.context() as mp:
            for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
                mp.delenv(var, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", url)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no slow instance-metadata probes
            yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the test S3 server, as "s3://<name>"."""
    from tltrain import storage

    uri = f"s3://tltrain-test-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(uri)
    return uri


@pytest.fixture(scope="session")
def fashion_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Real Fashion-MNIST images as ImageFolder trees: 30 train / 10 val per class (10 classes)."""
    from tltrain.data.packaged import materialize_fashion_mnist

    return materialize_fashion_mnist(
        str(tmp_path_factory.mktemp("fashion")), train_per_class=30, val_per_class=10, seed=0
    )


def apply_overrides(tree: dict, **overrides: object) -> dict:
    """A spec tree with `section__key=value` overrides set (nested sections created): the tests'
    shorthand for one changed field, e.g. `loop__ema_decay=0.9`."""
    for dotted, value in overrides.items():
        node = tree
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
