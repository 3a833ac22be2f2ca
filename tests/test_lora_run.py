"""strategy.lora end to end: `tltrain train` on a real local Ray and real images keeps only the
adapters and head in its checkpoints, resumes to the same weights as an uninterrupted run, and
registers merged weights that a process without peft or tltrain loads and predicts with exactly as
the unmerged adapted model does. Bad LoRA settings are refused before Ray, naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from tltrain.core.checkpoint import MODEL_FILE, load_meta
from tltrain.execution.preflight import build_plan
from tltrain.spec.load import parse_spec
from tltrain.spec.schema import SpecError

MODEL = "test_vit"  # LayerNorm only, timm's ViT blocks: qkv / proj / fc1 / fc2 get adapters
SIZE = 32


def _source(tmp_path: Path) -> str:
    """'Pretrained' weights: a seeded test_vit with its own 7-class head."""
    path = tmp_path / "source.pth"
    if not path.exists():
        torch.manual_seed(3)
        torch.save(timm.create_model(MODEL, num_classes=7, img_size=SIZE).state_dict(), path)
    return str(path)


def _tree(tmp_path: Path, train: str, val: str, name: str, epochs: int, **strategy: Any) -> dict[str, Any]:
    return {
        "name": name,
        "model": {"name": MODEL, "weights": _source(tmp_path)},
        "data": {"train": train, "val_fraction": 0.2, "test": val, "image_size": SIZE, "loader_workers": 0,
                 "augment": "none"},
        "strategy": {"lora": {"rank": 4, "alpha": 8}, "head_lr_mult": 3, **strategy},
        "optim": {"lr": 5.0e-3, "weight_decay": 0.01},
        "schedule": {"kind": "constant"},  # so a resumed run may run more epochs than it was started with
        "loop": {"epochs": epochs, "precision": "fp32", "seed": 0},
        "scaling": {"num_workers": 1, "batch_size_per_worker": 16, "address": "local"},
        "storage": {"uri": str(tmp_path / "runs"), "keep": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "lora", "registry_name": "lora-tiny"},
    }  # fmt: skip


def _tltrain(tmp_path: Path, tree: dict[str, Any], *args: str) -> dict[str, Any]:
    path = tmp_path / f"{tree['name']}.yaml"
    path.write_text(yaml.safe_dump(tree))
    res = subprocess.run(
        [sys.executable, "-m", "tltrain.cli", "train", str(path), "--json", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "output": res.stdout + res.stderr}


# Downstream: a clean process that cannot import peft or tltrain loads the registered model.
DOWNSTREAM = """
import base64, importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("peft", "tltrain"):
            raise ImportError(f"{name} is blocked in this process")
sys.meta_path.insert(0, Block())
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
images = [base64.b64encode(open(p, "rb").read()).decode() for p in json.loads(sys.argv[2])]
out = model.predict(images)
assert not any(m.split(".")[0] in ("peft", "tltrain") for m in sys.modules)
print(json.dumps({"labels": list(out["label"])}))
"""


@pytest.mark.integration
def test_lora_run_checkpoints_adapters_only_resumes_exactly_and_registers_merged_weights(
    tmp_path: Path, fashion_folders: tuple[str, str]
) -> None:
    from tltrain.core.lora import adapt_model, load_adapter_state
    from tltrain.core.model import build_model
    from tltrain.data.decode import load_rgb
    from tltrain.data.loaders import build_transform

    train, val = fashion_folders
    whole = _tltrain(tmp_path, _tree(tmp_path, train, val, "lora-whole", epochs=2))
    # The summary and the plan line say what trains and what a checkpoint weighs.
    assert 0 < whole["trainable_params"] < whole["total_params"] / 3
    assert "LoRA rank 4 (alpha 8) on" in whole["output"] and "MB)" in whole["output"]
    assert whole["test_metrics"]["test/acc"] > 0.2, whole["output"][-2000:]  # 10 classes: chance is 0.10

    # The checkpoint holds the adapters and the head only; meta names the source weights' hash.
    ckpt = Path(whole["best_checkpoint"])
    saved = load_file(str(ckpt / MODEL_FILE))
    assert saved and all(".lora_" in k or k.startswith("head.") for k in saved), sorted(saved)
    full = timm.create_model(MODEL, num_classes=10, img_size=SIZE).state_dict()
    assert sum(t.numel() for t in saved.values()) * 3 < sum(t.numel() for t in full.values())
    meta = load_meta(ckpt)
    assert meta.source_weights_sha256 and meta.spec["strategy"]["lora"]["rank"] == 4

    # Stopped after epoch 1 and re-run by name for 2: the same weights as the uninterrupted run.
    untracked = {"tracking": {"enabled": False}}
    _tltrain(tmp_path, _tree(tmp_path, train, val, "lora-resumed", epochs=1) | untracked)
    resumed = _tltrain(tmp_path, _tree(tmp_path, train, val, "lora-resumed", epochs=2) | untracked)
    assert "resuming lora-resumed from" in resumed["output"]
    again = load_file(str(Path(resumed["best_checkpoint"]) / MODEL_FILE))
    assert saved.keys() == again.keys()
    for k in saved:
        torch.testing.assert_close(again[k], saved[k], rtol=1e-5, atol=1e-6, msg=k)

    # The unmerged adapted model, rebuilt from the source weights and the checkpoint...
    spec = parse_spec(meta.spec)
    model = build_model(spec.model, len(meta.class_names), weights_file=Path(_source(tmp_path)), image_size=SIZE)
    adapt_model(model, spec.strategy, coarse=True)
    load_adapter_state(model, saved)
    model.eval()
    tf = build_transform(meta.data_config, False)
    paths = sorted(str(p) for p in Path(val).rglob("*.png"))[::4]
    with torch.no_grad():
        logits = model(torch.stack([tf(load_rgb(p)) for p in paths]))
    expected = [meta.class_names[i] for i in logits.argmax(1).tolist()]
    # ... and the registered version, loaded where peft and tltrain cannot be imported.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", DOWNSTREAM, whole["registered_model"], json.dumps(paths)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["labels"] == expected
    # The version's lineage names the adapters it was merged from.
    from tltrain.tracking.registry import show

    shown = show(whole["registered_model"], tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert shown["lora"]["rank"] == 4 and shown["domain_adaptation"] is None and shown["target_unlabelled"] is None

    # Re-running the name with another adapter layout, or without LoRA, is refused before Ray: the
    # checkpoints fit only their own layout. A LoRA checkpoint's file is no source model.weights.
    base = _tree(tmp_path, train, val, "lora-whole", epochs=2)
    for field, tree in [
        ("strategy.freeze_depth", base | {"strategy": {**base["strategy"], "freeze_depth": 1}}),
        ("strategy.lora", base | {"strategy": {"head_lr_mult": 3}}),
    ]:
        with pytest.raises(SpecError, match=f"{field}: lora-whole exists in storage"):
            build_plan(parse_spec(tree))
    as_source = _tree(tmp_path, train, val, "from-lora", epochs=1)
    as_source["model"]["weights"] = str(ckpt / MODEL_FILE)
    as_source["strategy"] = {}
    with pytest.raises(SpecError, match="is a LoRA checkpoint's file"):
        build_plan(parse_spec(as_source))


def _plan(tmp_path: Path, fashion_folders: tuple[str, str], **strategy: Any) -> Any:
    train, val = fashion_folders
    tree = _tree(tmp_path, train, val, "lora-bad", epochs=1)
    tree["strategy"].update(strategy)
    tree["tracking"] = {"enabled": False}
    return build_plan(parse_spec(tree))


def test_bad_lora_settings_are_refused_before_ray_naming_the_field(
    tmp_path: Path, fashion_folders: tuple[str, str]
) -> None:
    with pytest.raises(SpecError, match=r"strategy.lora.targets: '\*.no_such_layer' matches no"):
        _plan(tmp_path, fashion_folders, lora={"targets": ["*.no_such_layer"]})
    with pytest.raises(SpecError, match="strategy.lora.targets: 'auto' found no Linear"):
        _plan(tmp_path, fashion_folders, freeze_depth="all")
    with pytest.raises(SpecError, match="strategy.unfreeze with strategy.lora"):
        _plan(tmp_path, fashion_folders, unfreeze={1: 0})
    with pytest.raises(SpecError, match="model.weights is null"):
        train, val = fashion_folders
        tree = _tree(tmp_path, train, val, "lora-bad", epochs=1)
        tree["model"]["weights"] = None
        build_plan(parse_spec(tree | {"tracking": {"enabled": False}}))
    plan = _plan(tmp_path, fashion_folders, freeze_depth=2)
    assert plan.lora_modules > 0 and 0 < plan.trainable_params < plan.total_params


def test_a_sweep_over_lora_and_freeze_depth_is_checked_at_its_deepest_trial_before_ray(
    tmp_path: Path, fashion_folders: tuple[str, str]
) -> None:
    from tltrain.execution.tune import run_tune

    train, val = fashion_folders
    tree = _tree(tmp_path, train, val, "lora-sweep", epochs=1)
    tree["tracking"] = {"enabled": False}
    tree["tune"] = {"num_samples": 2, "space": {"strategy.lora.rank": {"choice": [2, 8]},
                                                "strategy.freeze_depth": {"choice": [0, "all"]}}}  # fmt: skip
    with pytest.raises(SpecError, match=r"tune.space: the trial .*'all'.* strategy.lora.targets: 'auto' found no"):
        run_tune(parse_spec(tree))


def test_lora_with_ema_saves_both_twins_as_the_trained_subset() -> None:
    """In-process loop (no Ray): with loop.ema_decay the checkpoint's two weight files each hold the
    adapters and head only, and the EMA twin really averages (differs from the raw weights)."""
    from tltrain.core.checkpoint import TWIN_FILE
    from tltrain.core.loop import train
    from tltrain.core.lora import adapt_model

    spec = parse_spec({
        "name": "t", "model": {"name": MODEL}, "data": {"train": "unused", "val_fraction": 0.2},
        "strategy": {"lora": {"rank": 4}}, "optim": {"lr": 1e-2},
        "loop": {"epochs": 1, "precision": "fp32", "max_steps_per_epoch": 3, "ema_decay": 0.5},
        "tracking": {"enabled": False},
    })  # fmt: skip
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=4, img_size=SIZE)
    groups = adapt_model(model, spec.strategy, coarse=True)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, SIZE, SIZE, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    files: dict[str, dict[str, torch.Tensor]] = {}

    def report(metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        assert ckpt_dir is not None
        files.update({p.name: load_file(str(p)) for p in Path(ckpt_dir).glob("*.safetensors")})

    train(spec, model, groups, batches, batches[:1], device=torch.device("cpu"), num_classes=4, report=report)
    exported, twin = files[MODEL_FILE], files[next(n for n in files if n != MODEL_FILE)]
    assert set(files) == {MODEL_FILE, TWIN_FILE.format("ema")} or set(files) == {MODEL_FILE, TWIN_FILE.format("raw")}
    assert exported.keys() == twin.keys() and all(".lora_" in k or k.startswith("head.") for k in exported)
    assert any(not torch.equal(exported[k], twin[k]) for k in exported)


def test_compare_keeps_lora_in_the_recipe_rung_only(tmp_path: Path, fashion_folders: tuple[str, str]) -> None:
    from tltrain.spec.rungs import RECIPE, rung_specs

    train, val = fashion_folders
    rungs = rung_specs(parse_spec(_tree(tmp_path, train, val, "lora-compare", epochs=1)))
    assert rungs[RECIPE].strategy.lora is not None
    assert all(s.strategy.lora is None for rung, s in rungs.items() if rung != RECIPE)
    for rung_spec in rungs.values():  # every rung passes the preflight (scratch: no LoRA on random init)
        build_plan(rung_spec.model_copy(update={"tracking": rung_spec.tracking.model_copy(update={"enabled": False})}))
