"""`tltrain bench` on CPU: a tiny model, real images, a real local Ray; no timing assertions.

Plus what the benchmark's numbers rest on: frozen groups run no backward (fewer counted FLOPs, no
grads), a compiled model's checkpoint loads into a plain one, the peak-FLOP/s table, and the
synthetic JPEG folder the GPU run uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from tltrain.core.checkpoint import load_model_state
from tltrain.core.flops import peak_flops, train_flops_per_image
from tltrain.core.loop import train
from tltrain.core.model import build_model, layer_groups
from tltrain.core.optim import apply_freeze
from tltrain.data.synthetic import make_synthetic_jpeg_folder
from tltrain.execution.bench import SyntheticLoader
from tltrain.spec.load import parse_spec

RATE_KEYS = ("bare_img_per_s", "ray_img_per_s", "e2e_img_per_s")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, logging_level=logging.WARNING)
    yield
    ray.shutdown()


def _spec_tree(train: str, val: str, tmp_path: Path, **data: Any) -> dict[str, Any]:
    return {
        "name": "bench-tiny",
        "model": {"name": "test_resnet"},
        "data": {"train": train, "val": val, "image_size": 32, "loader_workers": 0, **data},
        "strategy": {"freeze_depth": 1},
        "loop": {"precision": "fp32", "epochs": 1},
        "scaling": {"batch_size_per_worker": 8},
        "storage": {"uri": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }


@pytest.mark.integration
def test_bench_command_reports_three_rates_ratios_and_the_frozen_comparison(
    local_ray: None, fashion_folders: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tltrain.cli import main

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec_tree(*fashion_folders, tmp_path)))
    assert main(["bench", str(spec_path), "--steps", "3", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    for line in ("1 bare PyTorch step", "2 tltrain step in Ray", "3 end to end", "data wait", "frozen:"):
        assert line in out
    for key in RATE_KEYS:
        assert summary[key] > 0
    assert summary["ratio_ray_vs_bare"] == pytest.approx(summary["ray_img_per_s"] / summary["bare_img_per_s"])
    assert summary["ratio_e2e_vs_ray"] == pytest.approx(summary["e2e_img_per_s"] / summary["ray_img_per_s"])
    assert summary["device"] == "cpu" and summary["mfu"] is None and summary["peak_flops"] is None
    assert summary["peak_mem_bytes"] > 0 and summary["peak_mem_kind"] == "max_rss"
    assert 0.0 <= summary["data_wait_frac"] <= 1.0
    assert summary["e2e_steps"] == 3 and summary["freeze_depth"] == 1
    # freeze_depth 1: the full fine-tune is measured too, and costs more FLOPs per image.
    assert summary["bare_full_img_per_s"] > 0
    assert summary["train_flops_per_img"] < summary["train_flops_per_img_full"]
    assert summary["trainable_params"] < summary["trainable_params_full"]
    assert not list((tmp_path / "runs").glob("*bench*"))  # bench runs leave no checkpoints behind


@pytest.mark.integration
def test_bench_end_to_end_on_prepared_shards(local_ray: None, fashion_folders: tuple[str, str], tmp_path: Path) -> None:
    from tltrain.execution.bench import run_bench
    from tltrain.execution.prepare import prepare

    tree = _spec_tree(*fashion_folders, tmp_path, format="shards", prepared=str(tmp_path / "shards"))
    tree["strategy"]["freeze_depth"] = 0
    spec = parse_spec(tree)
    prepare(spec, str(tmp_path / "shards"), workers=0, log=lambda m: None)
    summary = run_bench(spec, steps=2)
    assert summary["data_format"] == "shards"
    assert all(summary[k] > 0 for k in RATE_KEYS)
    assert "bare_full_img_per_s" not in summary  # nothing frozen, nothing to compare


def _tiny_spec(**loop: Any):
    return parse_spec(
        {
            "name": "t",
            "model": {"name": "test_resnet"},
            "data": {"train": "unused", "val_fraction": 0.2, "image_size": 32},
            "strategy": {"freeze_depth": 2},
            "optim": {"lr": 0.01},
            "loop": {"epochs": 1, "precision": "fp32", "max_steps_per_epoch": 2, **loop},
            "tracking": {"enabled": False},
        }
    )


def test_frozen_groups_run_no_backward_and_stay_unchanged() -> None:
    spec = _tiny_spec()
    torch.manual_seed(0)
    model = build_model(spec.model, 4)
    groups = layer_groups(model)
    cpu = torch.device("cpu")
    full = train_flops_per_image(model, 32, cpu, None, False)
    apply_freeze(model, groups, 2)
    frozen = train_flops_per_image(model, 32, cpu, None, False)
    with torch.no_grad():
        forward = _forward_flops(model)
    # Full fine-tune: backward ~2x forward (less the input grad of the first conv). Frozen stem +
    # layer1 skip their backward entirely: no weight grads, and no input grads since nothing below
    # them needs one.
    assert full == pytest.approx(3 * forward, rel=0.15)
    assert frozen < full - 0.1 * forward
    frozen_names = {n for g in groups[:2] for n in g.param_names}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in frozen_names}
    train(
        spec,
        model,
        groups,
        SyntheticLoader(8, 32, 4, 2, cpu, False),
        SyntheticLoader(8, 32, 4, 1, cpu, False),
        device=cpu,
        num_classes=4,
        report=lambda m, c: None,
    )
    for n, value in before.items():
        assert torch.equal(dict(model.named_parameters())[n], value), n
        assert not dict(model.named_parameters())[n].requires_grad


def _forward_flops(model: torch.nn.Module) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 32, 32))
    return counter.get_total_flops() / 2


def test_compiled_model_checkpoint_loads_into_a_plain_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # The eager backend keeps this fast on CPU; the wrapper (OptimizedModule, whose state_dict keys
    # carry "_orig_mod.") is the same as with inductor, and it is what a checkpoint must not contain.
    real_compile = torch.compile
    wrapped: list[Any] = []

    def eager_compile(model: torch.nn.Module, **kw: Any) -> Any:
        out = real_compile(model, backend="eager")
        wrapped.append(out)
        return out

    monkeypatch.setattr(torch, "compile", eager_compile)
    spec = _tiny_spec(compile=True)
    torch.manual_seed(0)
    model = build_model(spec.model, 4)
    groups = layer_groups(model)
    cpu = torch.device("cpu")
    saved: dict[str, torch.Tensor] = {}

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        assert checkpoint_dir is not None
        saved.update(load_model_state(checkpoint_dir))

    train(
        spec,
        model,
        groups,
        SyntheticLoader(8, 32, 4, 2, cpu, False),
        SyntheticLoader(8, 32, 4, 1, cpu, False),
        device=cpu,
        num_classes=4,
        report=report,
    )
    assert wrapped and any(k.startswith("_orig_mod.") for k in wrapped[0].state_dict())
    assert not any("_orig_mod" in k for k in saved)
    fresh = build_model(spec.model, 4)
    fresh.load_state_dict(saved, strict=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_peak_flops_table() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", True) == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32", True) == 495e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32", False) == 67e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16", True) == 756e12
    assert peak_flops("cpu", "fp32", True) is None
    assert peak_flops("Some Future GPU", "bf16", True) is None


def test_synthetic_jpeg_folder(tmp_path: Path) -> None:
    root = Path(make_synthetic_jpeg_folder(str(tmp_path / "jpegs"), 6, 3, size=(64, 48), workers=1))
    classes = sorted(p.name for p in root.iterdir())
    assert len(classes) == 3
    files = sorted(root.glob("*/*.jpg"))
    assert len(files) == 6
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.size == (64, 48) and im.mode == "RGB"
