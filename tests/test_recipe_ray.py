"""The recipe through real Ray runs: `tltrain compare` (four rungs under one MLflow parent, held-out
test scores, the recipe registered with them), and the held-out split influencing no choice."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from tltrain import storage
from tltrain.core.checkpoint import MODEL_FILE, load_meta, sha256_file
from tltrain.spec.metrics import Twin
from tltrain.spec.rungs import RUNGS

pytestmark = pytest.mark.integration


def _tltrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tltrain.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def _recipe(tmp_path: Path, train: str, name: str, **data: object) -> dict:
    weights = tmp_path / "source.pth"
    if not weights.exists():  # "pretrained" source weights of the tiny model (what compare needs)
        torch.manual_seed(1)
        torch.save(timm.create_model("test_resnet", num_classes=7).state_dict(), weights)
    return {
        "name": name,
        "model": {"name": "test_resnet", "weights": str(weights), "drop_path_rate": 0.05},
        "data": {
            "train": train,
            "val_fraction": 0.2,
            "image_size": 32,
            "loader_workers": 0,
            "augment": "light",
            "orientation": "natural",
            "tta": "flip",
            **data,
        },  # fmt: skip
        "strategy": {"freeze_depth": 1, "layer_decay": 0.8, "head_lr_mult": 2},
        "optim": {"lr": 3.0e-3, "weight_decay": 0.01},
        "schedule": {"kind": "constant"},
        "loop": {
            "epochs": 2,
            "precision": "fp32",
            "seed": 0,
            "ema_decay": 0.8,
            "mixup_alpha": 0.2,
            "class_weights": "balanced",
        },  # fmt: skip
        "scaling": {"num_workers": 2, "batch_size_per_worker": 8, "address": "local"},
        "storage": {"uri": str(tmp_path / "runs"), "keep": 2},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "recipe", "registry_name": name},
    }


def _write(tmp_path: Path, tree: dict, file: str = "spec.yaml") -> Path:
    path = tmp_path / file
    path.write_text(yaml.safe_dump(tree))
    return path


def test_compare_runs_four_rungs_and_registers_the_recipe_with_its_test_scores(
    tmp_path: Path, fashion_folders: tuple[str, str]
) -> None:
    from mlflow import MlflowClient

    train, test = fashion_folders
    res = _tltrain("compare", str(_write(tmp_path, _recipe(tmp_path, train, "cmp", test=test))), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    rows = {r["rung"]: r for r in result["rungs"]}
    assert list(rows) == list(RUNGS)
    for row in rows.values():
        assert 0.0 <= row["test/acc"] <= 1.0 and 0.0 <= row["test/f1_macro"] <= 1.0
        assert 0.0 <= row["test/balanced_acc"] <= 1.0
        assert row["epochs"] == 2 and row["worker_s"] > 0
    # 10 classes: the runs that train the body learn well above chance (0.10) on images no run chose on.
    assert rows["recipe"]["test/acc"] > 0.25, res.stdout[-3000:]
    assert "recipe - scratch:" in res.stdout and "held-out test split" in res.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("recipe")
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'"
    )
    assert sorted(r.info.run_name for r in children) == sorted(f"cmp-{rung}" for rung in RUNGS)
    recipe_run = next(r for r in children if r.info.run_name == "cmp-recipe")
    assert recipe_run.data.metrics["test/acc"] == pytest.approx(rows["recipe"]["test/acc"])

    # Only the recipe is registered, with its held-out scores as lineage.
    assert rows["recipe"]["registered_model"] == "models:/cmp/1"
    assert all(rows[r]["registered_model"] is None for r in RUNGS if r != "recipe")
    version = client.get_model_version("cmp", "1")
    assert float(version.tags["test/acc"]) == pytest.approx(rows["recipe"]["test/acc"])

    # EMA on: the exported twin is the one the selection metric (val/acc) prefers, and the other is kept.
    local = tmp_path / "best"
    storage.download_tree(rows["recipe"]["best_checkpoint"], str(local))
    meta = load_meta(local)
    ema_better = meta.metrics["val_ema/acc"] > meta.metrics["val_raw/acc"]
    assert meta.exported_weights == (Twin.EMA if ema_better else Twin.RAW)
    other = Twin.RAW if meta.exported_weights == Twin.EMA else Twin.EMA
    assert (local / f"{other}.safetensors").is_file()


def test_a_test_split_with_permuted_labels_changes_no_choice(tmp_path: Path, fashion_folders: tuple[str, str]) -> None:
    """Any leak of the test split into a choice (epoch, EMA twin, registered checkpoint) would change
    it when the test labels are permuted; the run with it must equal the run without a test split."""
    train, test = (Path(p) for p in fashion_folders)
    classes = sorted(p.name for p in test.iterdir())
    permuted = tmp_path / "permuted-test"
    for name, shown_as in zip(classes, classes[1:] + classes[:1]):
        shutil.copytree(test / name, permuted / shown_as)
    runs = {}
    for label, extra in (("with-test", {"test": str(permuted)}), ("without-test", {})):
        tree = _recipe(tmp_path, str(train), f"leak-{label}", **extra)
        tree["scaling"]["num_workers"] = 1
        tree["loop"]["epochs"] = 3
        res = _tltrain("train", str(_write(tmp_path, tree, f"{label}.yaml")), "--json", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[label] = json.loads(res.stdout.strip().splitlines()[-1])
    with_test, without = runs["with-test"], runs["without-test"]
    assert with_test["test_metrics"]["test/count"] == 100 and "test_metrics" not in without
    a, b = tmp_path / "a", tmp_path / "b"
    storage.download_tree(with_test["best_checkpoint"], str(a))
    storage.download_tree(without["best_checkpoint"], str(b))
    ma, mb = load_meta(a), load_meta(b)
    assert ma.epoch == mb.epoch and ma.exported_weights == mb.exported_weights

    def scores(history: list[dict]) -> list[dict]:  # every epoch's val scores (timings differ run to run)
        return [{k: v for k, v in h.items() if k.startswith(("val", "train/", "best_", "exported"))} for h in history]

    assert scores(ma.loop_state.history) == scores(mb.loop_state.history)
    assert sha256_file(a / MODEL_FILE) == sha256_file(b / MODEL_FILE)  # the registered weights, bit for bit
    assert with_test["registered_model"] == "models:/leak-with-test/1"
