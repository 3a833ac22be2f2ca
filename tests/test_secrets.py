"""Security: weights and checkpoints never unpickle arbitrary objects; a spec cannot name code;
credentials come from the environment only and never reach logs, MLflow or checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tltrain.core.checkpoint import (
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointMeta,
    load_model_state,
    load_train_state,
    save_checkpoint,
    verify_checkpoint,
)


class _WritesAFile:
    """A pickle payload: unpickling it calls os.system, which creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[override]
        return (os.system, (f"touch {self.marker}",))


def _malicious_pth(path: Path, marker: Path) -> Path:
    model = __import__("timm").create_model("test_resnet", num_classes=3)
    torch.save({"state_dict": model.state_dict(), "extra": _WritesAFile(marker)}, path)
    return path


def _tamper_and_reseal(directory: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and rewrite the manifest to match, as someone with write access
    to the bucket could: the checksum then passes, so the loader itself must refuse."""
    import hashlib

    (directory / name).write_bytes(data)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_model_weights_with_a_pickled_object_are_refused(tmp_path: Path) -> None:
    from tltrain.core.model import build_model
    from tltrain.spec.schema import ModelSpec

    marker = tmp_path / "pwned"
    weights = _malicious_pth(tmp_path / "evil.pth", marker)
    with pytest.raises(Exception, match="GLOBAL posix.system|Unsupported global|weights_only"):
        build_model(ModelSpec(name="test_resnet", weights=str(weights)), 3, weights_file=weights)
    assert not marker.exists()


def test_checkpoint_train_state_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"optimizer": {}}, CheckpointMeta(epoch=1))
    payload = tmp_path / "payload.pt"
    torch.save({"optimizer": _WritesAFile(marker)}, payload)
    _tamper_and_reseal(ckpt, STATE_FILE, payload.read_bytes())
    verify_checkpoint(ckpt)  # the hashes match: it is the loader that must refuse
    with pytest.raises(CheckpointError, match=r"refused to load train_state\.pt: it holds Python objects"):
        load_train_state(ckpt)
    assert not marker.exists()


def test_checkpoint_weights_must_be_safetensors(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, None, CheckpointMeta(epoch=1))
    payload = tmp_path / "payload.pt"
    torch.save({"w": _WritesAFile(marker)}, payload)  # a pickle where safetensors belongs
    _tamper_and_reseal(ckpt, MODEL_FILE, payload.read_bytes())
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a valid safetensors file"):
        load_model_state(ckpt)
    assert not marker.exists()


def test_cli_refuses_malicious_weights_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = _malicious_pth(tmp_path / "evil.pth", marker)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "data" / c / f"{i}.png")
    spec = {
        "name": "evil",
        "model": {"name": "test_resnet", "weights": str(weights)},
        "data": {"train": str(tmp_path / "data"), "val_fraction": 0.2},
        "scaling": {"batch_size_per_worker": 2},
        "storage": {"uri": str(tmp_path / "runs")},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "tltrain.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode != 0
    assert "posix.system" in proc.stderr or "model.weights" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()


# ---- a spec cannot name code ------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutation,needle",
    [
        ({"model": {"name": {"_component_": "os.system"}}}, "model.name: Input should be a valid string"),
        ({"model": {"name": "test_resnet", "_component_": "os.system"}}, "model._component_: unknown field"),
        ({"_component_": "tltrain.loop.train"}, "_component_: unknown field"),
        ({"optim": {"_target_": "torch.optim.SGD"}}, "optim._target_: unknown field"),
        ({"optim": {"name": "torch.optim.SGD"}}, "optim.name: Input should be 'adamw' or 'sgd'"),
        ({"data": {"train": "/d", "val_fraction": 0.1, "augment": "os.system"}}, "data.augment: Input should be"),
    ],
)
def test_spec_fields_are_typed_not_import_paths(mutation: dict, needle: str) -> None:
    from tltrain.spec.load import parse_spec
    from tltrain.spec.schema import SpecError

    tree = {"name": "x", "model": {"name": "test_resnet"}, "data": {"train": "/d", "val_fraction": 0.1}}
    tree.update(mutation)
    with pytest.raises(SpecError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        parse_spec(tree)


def test_a_model_name_is_only_looked_up_never_imported(tmp_path: Path) -> None:
    from tltrain.core.model import ModelError, build_model
    from tltrain.spec.schema import ModelSpec

    for name in ("os.system", "torchvision:os.system", "builtins.eval", "subprocess:run"):
        with pytest.raises(ModelError, match="model.name: .*has no model"):
            build_model(ModelSpec(name=name), 2)


# ---- credentials never leak --------------------------------------------------------------------


def _grep_tree(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            try:
                data = p.read_bytes()
            except OSError:
                continue
            hits += [f"{p}: {n.decode()}" for n in needles if n in data]
    return hits


@pytest.mark.integration
def test_credentials_never_reach_logs_mlflow_or_checkpoints(
    tmp_path: Path, s3_server: str, s3_bucket: str, fashion_folders: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tltrain import storage

    # Values that occur nowhere else, so any occurrence is a leak. moto accepts any keys.
    key_id = f"AKIALEAK{uuid.uuid4().hex[:12].upper()}"
    secret = f"tltrainLeakCanary{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    # Data, source weights and checkpoints all in S3, so every part of the run uses the keys.
    storage.upload_tree(fashion_folders[0], f"{s3_bucket}/data/train")
    storage.upload_tree(fashion_folders[1], f"{s3_bucket}/data/val")
    weights = tmp_path / "weights.pth"
    torch.save(__import__("timm").create_model("test_resnet", num_classes=1000).state_dict(), weights)
    storage.upload_file(str(weights), f"{s3_bucket}/models/test_resnet.pth")

    work = tmp_path / "work"
    work.mkdir()
    spec = {
        "name": "leak-check",
        "model": {"name": "test_resnet", "weights": f"{s3_bucket}/models/test_resnet.pth"},
        "data": {
            "train": f"{s3_bucket}/data/train",
            "val": f"{s3_bucket}/data/val",
            "image_size": 32,
            "loader_workers": 0,
            "max_images_per_class": 8,
            "cache_dir": str(work / "cache"),
        },
        "loop": {"epochs": 2, "precision": "fp32"},
        "scaling": {"num_workers": 2, "batch_size_per_worker": 8, "address": "local"},
        "storage": {"uri": f"{s3_bucket}/runs"},
        "tracking": {
            "enabled": True,
            "uri": f"sqlite:///{work}/mlflow.db",
            "experiment": "leak-check",
            "registry_name": "leak-check-model",
        },
    }
    path = work / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    ray_tmp = tempfile.mkdtemp(prefix="tlk", dir="/tmp")  # this run's Ray session logs, and only them
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tltrain.cli", "-v", "train", str(path), "--json"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["epochs_completed"] == 2 and summary["mlflow_run_id"]
        assert summary.get("registered_model", "").startswith("models:/leak-check-model/")

        needles = [secret.encode(), key_id.encode()]
        leaks = [f"stdout: {n.decode()}" for n in needles if n.decode() in proc.stdout]
        leaks += [f"stderr: {n.decode()}" for n in needles if n.decode() in proc.stderr]
        leaks += _grep_tree(work, needles)  # MLflow db + artifacts, dataset cache, spec
        leaks += _grep_tree(Path(ray_tmp), needles)  # Ray session logs of driver, controller, workers
        bucket_copy = tmp_path / "bucket"
        storage.download_tree(s3_bucket, str(bucket_copy))  # checkpoints and Ray's run state
        assert list(bucket_copy.rglob(MANIFEST_FILE))
        leaks += _grep_tree(bucket_copy, needles)
        assert not leaks, leaks
        # Positive controls: the same search finds what those places do hold, so it is not vacuous.
        assert b"leak-check" in (work / "mlflow.db").read_bytes()
        assert _grep_tree(Path(ray_tmp), [b"RayTrainWorker"])
        assert _grep_tree(bucket_copy, [b"leak-check"])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
