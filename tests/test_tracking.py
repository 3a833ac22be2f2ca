"""tracking.py against a real MLflow sqlite store (no server): runs, nesting, resume, reports,
and what must never be logged."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage pings from tests

from mlflow import MlflowClient  # noqa: E402

from tltrain.reports import classification as report
from tltrain.spec.load import parse_spec
from tltrain.spec.schema import JobSpec
from tltrain.tracking import tracker as tracking

CLASSES = ["cat", "dog", "fox"]
CONFUSION = [[8, 2, 0], [1, 7, 2], [0, 0, 10]]  # rows = true class


def make_spec(tmp_path: Path, **tracking_fields: Any) -> JobSpec:
    return parse_spec(
        {
            "name": "pets",
            "model": {"name": "test_resnet", "weights": "s3://models/base.pth"},
            "data": {"train": str(tmp_path / "train"), "val": str(tmp_path / "val"), "image_size": 32},
            "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "unit", **tracking_fields},
        }
    )


def write_checkpoint(directory: Path) -> Path:
    import torch

    from tltrain.core.checkpoint import CheckpointMeta, save_checkpoint

    meta = {
        "epoch": 3,
        "global_step": 30,
        "metrics": {"val/acc": 25 / 30},
        "class_names": CLASSES,
        "confusion_matrix": CONFUSION,
        "model_name": "test_resnet",
        "data_config": {},
        "source_weights_uri": "s3://models/base.pth",
        "source_weights_sha256": "ab" * 32,
        "tltrain_version": "0.1.0",
    }
    return save_checkpoint(directory, {"w": torch.zeros(2)}, None, CheckpointMeta.from_dict(meta))


def test_disabled_tracking_gives_a_null_tracker(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, enabled=False)
    with tracking.open_tracker(spec) as t:
        assert t.run_id is None
        t.log_spec(spec.to_dict())
        t.set_tags({"a": "b"})
        t.log_epoch({"train/loss": 1.0}, step=1)
        t.log_final(None, [])
    assert not (tmp_path / "mlflow.db").exists()


def test_default_tracking_uri_is_sqlite_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/.tltrain/mlflow.db"
    assert tracking.resolve_tracking_uri("sqlite:///~/x.db") == f"sqlite:///{tmp_path}/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.resolve_tracking_uri(None) == "http://127.0.0.1:1"
    assert tracking.resolve_tracking_uri("http://other:5000") == "http://other:5000"


def test_flatten_spec_drops_secret_sections_and_masks_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    tree = {
        "optim": {"lr": 3e-4, "betas": [0.9, 0.999]},
        "strategy": {"unfreeze": {}, "freeze_depth": "all"},
        "loop": {"clip_grad_norm": None, "compile": False},
        "runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "very-secret-value-123"}},
        "scaling": {"env": {"X": "1"}, "address": "ray://admin:hunter2222@head:10001"},
        "data": {"train": "s3://bucket/very-secret-value-123/train", "note": "x" * 7000},
    }
    flat = tracking.flatten_spec(tree)
    assert flat["optim.lr"] == "0.0003"
    assert flat["optim.betas"] == "[0.9, 0.999]"
    assert flat["strategy.unfreeze"] == "{}"
    assert flat["strategy.freeze_depth"] == "all"
    assert flat["loop.clip_grad_norm"] == "null" and flat["loop.compile"] == "false"
    assert not any("env" in k.split(".") or "runtime_env" in k for k in flat)
    assert flat["scaling.address"] == "ray://***@head:10001"
    assert flat["data.train"] == "s3://bucket/***/train"
    assert len(flat["data.note"]) == 6000
    assert "hunter2222" not in json.dumps(flat) and "very-secret-value-123" not in json.dumps(flat)


def test_classification_report_matches_hand_computation() -> None:
    rep = report.classification_report(CONFUSION, CLASSES)
    assert rep["cat"]["precision"] == pytest.approx(8 / 9)
    assert rep["cat"]["recall"] == pytest.approx(8 / 10)
    assert rep["dog"]["f1"] == pytest.approx(2 * (7 / 9) * (7 / 10) / (7 / 9 + 7 / 10))
    assert rep["fox"]["support"] == 10
    assert rep["accuracy"] == pytest.approx(25 / 30)
    assert rep["macro avg"]["recall"] == pytest.approx((0.8 + 0.7 + 1.0) / 3)
    assert "accuracy" in report.format_report(rep)
    with pytest.raises(ValueError):
        report.classification_report([[1, 2]], CLASSES)


def test_run_logs_spec_metrics_and_final_report(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    ckpt = write_checkpoint(tmp_path / "ckpt")
    history = [
        {
            "epoch": e,
            "train/loss": 1.0 / e,
            "val/loss": 1.2 / e,
            "val/acc": 0.3 * e,
            "lr/group_0": 1e-3,
            "img_per_s": 100.0,
        }
        for e in (1, 2, 3)
    ]
    with tracking.open_tracker(spec, tags={"ray_run": "pets", "empty": None}) as t:
        t.log_spec(spec.to_dict())
        t.set_tags(
            tracking.lineage_tags(spec.to_dict(), {"class_names": CLASSES, "num_files": 40, "sha256": "cd" * 32})
        )
        for h in history:
            t.log_epoch({k: v for k, v in h.items() if k != "epoch"} | {"note": "not a number"}, step=h["epoch"])
        t.log_final(str(ckpt), history)
        run_id = t.run_id

    client = MlflowClient(spec.tracking.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "pets"
    assert run.data.params["optim.lr"] == "0.0003"
    assert run.data.params["model.name"] == "test_resnet"
    assert run.data.tags["ray_run"] == "pets" and "empty" not in run.data.tags
    assert run.data.tags["dataset_sha256"] == "cd" * 32
    assert json.loads(run.data.tags["dataset_class_names"]) == CLASSES
    assert run.data.tags["source_weights_uri"] == "s3://models/base.pth"
    assert [m.value for m in client.get_metric_history(run_id, "val/acc")] == pytest.approx([0.3, 0.6, 0.9])
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert "note" not in run.data.metrics
    assert run.data.metrics["best/acc"] == pytest.approx(25 / 30)

    names = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "report")}
    for expected in ("spec.yaml", "report/learning_curves.png", "report/confusion_matrix.png",
                     "report/classification_report.json", "report/classification_report.txt"):  # fmt: skip
        assert expected in names
    local = Path(client.download_artifacts(run_id, "report", str(tmp_path / "dl")))
    assert (local / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    rep = json.loads((local / "classification_report.json").read_text())
    assert rep["dog"]["recall"] == pytest.approx(0.7)
    spec_yaml = Path(client.download_artifacts(run_id, "spec.yaml", str(tmp_path / "dl2")))
    import yaml

    assert yaml.safe_load(spec_yaml.read_text())["optim"]["lr"] == pytest.approx(3e-4)


def test_sweep_parent_with_nested_trials_and_failure_status(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    parent = tracking.open_tracker(spec, run_name="sweep")
    children = []
    for i in range(3):
        with tracking.open_tracker(
            spec, parent_run_id=parent.run_id, run_name=f"trial_{i}", tags={"trial": f"trial_{i}"}
        ) as child:
            child.log_epoch({"val/acc": 0.1 * i}, step=1)
            children.append(child.run_id)
    with pytest.raises(RuntimeError):
        with tracking.open_tracker(spec, parent_run_id=parent.run_id, run_name="trial_bad") as bad:
            raise RuntimeError("trial crashed")
    parent.end()

    client = MlflowClient(spec.tracking.uri)
    for run_id in children:
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.info.experiment_id == client.get_run(parent.run_id).info.experiment_id
    assert client.get_run(bad.run_id).info.status == "FAILED"
    assert "mlflow.parentRunId" not in client.get_run(parent.run_id).data.tags


def test_rerunning_an_unfinished_name_resumes_its_run(tmp_path: Path) -> None:
    spec = make_spec(tmp_path)
    first = tracking.open_tracker(spec)
    first.log_spec(spec.to_dict())
    first.log_epoch({"train/loss": 2.0}, step=1)
    first.end("FAILED")  # e.g. the driver died

    changed = spec.model_copy(update={"optim": spec.optim.model_copy(update={"lr": 1e-3})})
    with tracking.open_tracker(changed) as again:
        assert again.run_id == first.run_id
        again.log_spec(changed.to_dict())  # a changed value must not crash the resumed job
        again.log_epoch({"train/loss": 1.0}, step=2)
    client = MlflowClient(spec.tracking.uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.0003"
    assert "optim.lr" in run.data.tags["spec_changed_on_resume"]
    assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == [1, 2]

    with tracking.open_tracker(spec) as fresh:  # the finished run is not reopened
        assert fresh.run_id != first.run_id
