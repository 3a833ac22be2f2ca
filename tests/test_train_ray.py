"""`tltrain train` end to end: a real local Ray with 2 workers, real images, checkpoints through a
real S3 server on 127.0.0.1, and resuming by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tltrain import storage
from tltrain.core.checkpoint import load_meta, verify_checkpoint

pytestmark = pytest.mark.integration


def _write_spec(tmp_path: Path, train: str, val: str, bucket: str, epochs: int, name: str = "tiny-ray") -> Path:
    spec = {
        "name": name,
        "model": {"name": "test_resnet"},
        "data": {"train": train, "val": val, "image_size": 32, "loader_workers": 0, "augment": "none"},
        "strategy": {"freeze_depth": 1, "layer_decay": 0.8, "head_lr_mult": 2},
        "optim": {"lr": 3.0e-3, "weight_decay": 0.01},
        "schedule": {"kind": "constant"},
        "loop": {"epochs": epochs, "precision": "fp32", "grad_accum": 1, "clip_grad_norm": 1.0, "seed": 0},
        "scaling": {"num_workers": 2, "batch_size_per_worker": 8, "address": "local"},
        "storage": {"uri": f"{bucket}/runs", "keep": 2},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _tltrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tltrain.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_two_worker_run_learns_checkpoints_to_s3_and_resumes_by_name(
    tmp_path: Path, s3_server: str, s3_bucket: str, fashion_folders: tuple[str, str]
) -> None:
    train_dir, val_dir = fashion_folders
    spec_path = _write_spec(tmp_path, train_dir, val_dir, s3_bucket, epochs=4)

    first = _tltrain("train", str(spec_path), "--set", "loop.epochs=3", "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["epochs_completed"] == 3
    assert "epoch 1/3" in first.stdout and "epoch 3/3" in first.stdout  # live progress lines
    # 10 classes: chance is 0.10.
    assert summary["best_metric"] > 0.3, first.stdout[-2000:]
    assert summary["best_checkpoint"].startswith(f"{s3_bucket}/runs/tiny-ray/checkpoint_")

    keys = storage.list_files(f"{s3_bucket}/runs/tiny-ray")
    manifests = [k for k in keys if k.endswith("MANIFEST.json")]
    assert len(manifests) >= 2, keys  # keep=2 best (+ the latest)
    local = tmp_path / "best"
    storage.download_tree(summary["best_checkpoint"], str(local))
    verify_checkpoint(local)
    meta = load_meta(local)
    assert meta.class_names[0] == "ankle-boot" and len(meta.class_names) == 10
    assert meta.metrics["val/acc"] == pytest.approx(summary["best_metric"])

    # Same name again with 4 epochs: continues from epoch 3, trains only epoch 4.
    second = _tltrain("train", str(spec_path), "--json", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = json.loads(second.stdout.strip().splitlines()[-1])
    assert resumed["epochs_completed"] == 4
    assert resumed["epochs_this_invocation"] == 1
    assert "epoch 1/4" not in second.stdout and "epoch 4/4" in second.stdout
    # keep=2: top-2 by val/acc plus the latest survive.
    manifests = [k for k in storage.list_files(f"{s3_bucket}/runs/tiny-ray") if k.endswith("MANIFEST.json")]
    assert 2 <= len(manifests) <= 3


def test_three_workers_with_two_val_images_finish(tmp_path: Path, fashion_folders: tuple[str, str]) -> None:
    """A rank with no val image must not hang the others (BatchNorm model: a DDP forward in eval
    is a collective that rank would never join)."""
    train_dir, val_dir = (Path(p) for p in fashion_folders)
    classes = sorted(p.name for p in train_dir.iterdir())[:2]
    for name in classes:
        shutil.copytree(train_dir / name, tmp_path / "train" / name)
        (tmp_path / "val" / name).mkdir(parents=True)
        first = sorted((val_dir / name).iterdir())[0]
        shutil.copy(first, tmp_path / "val" / name / first.name)
    spec_path = _write_spec(tmp_path, str(tmp_path / "train"), str(tmp_path / "val"), str(tmp_path / "s"), epochs=1)
    res = _tltrain(
        "train", str(spec_path), "--set", "scaling.num_workers=3", "--set", "scaling.cpus_per_worker=0.5",
        "--set", "name=three-workers", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["epochs_completed"] == 1 and summary["best_metric"] in (0.0, 0.5, 1.0)  # 2 val images
