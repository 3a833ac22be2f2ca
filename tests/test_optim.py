"""Freezing and layer-wise LR over the same layer groups, checked on real timm models."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from tltrain.core.loop import train
from tltrain.core.model import layer_groups
from tltrain.core.optim import build_optimizer, build_scheduler, lr_multiplier, resolve_freeze_depth
from tltrain.spec.load import parse_spec
from tltrain.spec.schema import OptimSpec, ScheduleSpec, StrategySpec


def _spec(**strategy):
    return parse_spec(
        {
            "name": "t",
            "model": {"name": "test_resnet"},
            "data": {"train": "unused", "val_fraction": 0.2},
            "strategy": strategy,
            "optim": {"lr": 0.05, "weight_decay": 0.01},
            "loop": {"epochs": 1, "precision": "fp32", "max_steps_per_epoch": 4},
            "tracking": {"enabled": False},
        }
    )


class Batches(list):
    """A loader stand-in: fixed batches of real tensors (the loop only iterates and takes len)."""


def _batches(n: int, size: int = 8, res: int = 32, seed: int = 0) -> Batches:
    g = torch.Generator().manual_seed(seed)
    return Batches(
        (torch.randn(size, 3, res, res, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)
    )


@pytest.mark.parametrize("depth", [0, 2, 4])
def test_freeze_depth_keeps_exactly_the_first_groups_bit_identical(depth: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    groups = layer_groups(model)
    before = copy.deepcopy(model.state_dict())
    spec = _spec(freeze_depth=depth)
    train(
        spec,
        model,
        groups,
        _batches(4),
        _batches(1),
        device=torch.device("cpu"),
        num_classes=4,
        report=lambda m, c: None,
    )
    after = model.state_dict()
    params = dict(model.named_parameters())
    for index, group in enumerate(groups):
        changed = [n for n in group.param_names if not torch.equal(before[n], after[n])]
        if index < depth:
            assert not changed, f"frozen group {group.name} changed: {changed[:3]}"
            # BatchNorm running stats of frozen groups are frozen too (eval mode).
            prefixes = {n.rsplit(".", 1)[0] for n in group.param_names}
            for key in after:
                if key.rsplit(".", 1)[0] in prefixes and "running" in key:
                    assert torch.equal(before[key], after[key]), key
        else:
            assert changed, f"trainable group {group.name} did not change"
    assert all(not params[n].requires_grad for g in groups[:depth] for n in g.param_names)


def test_freeze_all_is_feature_extraction() -> None:
    model = timm.create_model("test_resnet", num_classes=4)
    groups = layer_groups(model)
    assert resolve_freeze_depth("all", groups) == len(groups) - 1
    assert groups[-1].name == "head"
    with pytest.raises(ValueError, match="strategy.freeze_depth"):
        resolve_freeze_depth(len(groups), groups)


def test_layer_wise_lr_each_group_gets_decay_power_times_scheduled_base() -> None:
    model = timm.create_model("test_vit", num_classes=4)
    groups = layer_groups(model)
    strategy = StrategySpec(layer_decay=0.7, head_lr_mult=5)
    optim_spec = OptimSpec(lr=1e-3)
    schedule = ScheduleSpec(kind="cosine", warmup_epochs=1)
    optimizer = build_optimizer(model, groups, strategy, optim_spec, torch.device("cpu"))
    steps_per_epoch, epochs = 5, 4
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch, epochs)
    top = len(groups) - 1
    for step in range(12):
        if step:
            optimizer.step()
            scheduler.step()
        base = 1e-3 * lr_multiplier(step, steps_per_epoch * epochs, steps_per_epoch, schedule)
        seen = set()
        for pg in optimizer.param_groups:
            k = pg["layer_group"]
            expected = base * 0.7 ** (top - k) * (5 if k == top else 1)
            assert pg["lr"] == pytest.approx(expected, rel=1e-9), (step, k)
            seen.add(k)
        assert seen == set(range(len(groups)))
    # Warmup really ramps and cosine really decays.
    assert lr_multiplier(0, 20, 5, schedule) < lr_multiplier(4, 20, 5, schedule) == 1.0
    assert lr_multiplier(19, 20, 5, schedule) < 0.05


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = timm.create_model("test_resnet", num_classes=4)
    optimizer = build_optimizer(
        model, layer_groups(model), StrategySpec(), OptimSpec(weight_decay=0.1), torch.device("cpu")
    )
    names = {id(p): n for n, p in model.named_parameters()}
    for pg in optimizer.param_groups:
        for p in pg["params"]:
            if p.ndim <= 1:
                assert pg["weight_decay"] == 0.0, names[id(p)]
            else:
                assert pg["weight_decay"] == 0.1, names[id(p)]
