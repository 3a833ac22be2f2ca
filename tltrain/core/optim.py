"""Freezing, layer-wise LR and the schedule — all over the same `model.layer_groups`.

Every parameter is in the optimizer from the start, one param group per (layer group, decay or
not), each with its `lr_scale`. Frozen parameters have requires_grad=False, so they get no grad, no
backward compute and no update (AdamW skips params whose grad is None, weight decay included);
progressive unfreezing only flips requires_grad. The scheduler is a LambdaLR, which multiplies each
group's initial LR (= base LR x lr_scale), so the scale survives every scheduler step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import cast

import torch
from torch import nn

from tltrain.core.model import LayerGroup
from tltrain.spec.bounds import check_freeze_depth
from tltrain.spec.metrics import LR_PREFIX
from tltrain.spec.schema import FreezeDepth, OptimSpec, ScheduleSpec, StrategySpec


def resolve_freeze_depth(depth: FreezeDepth, groups: list[LayerGroup]) -> int:
    """Number of backbone groups to freeze; "all" = every group but the head."""
    backbone = len(groups) - 1
    check_freeze_depth("strategy.freeze_depth", depth, backbone, "this model")
    return backbone if depth == "all" else depth


def freeze_depth_at_epoch(strategy: StrategySpec, epoch: int) -> FreezeDepth:
    """The freeze depth in force at `epoch` (0-based): the last `unfreeze` entry at or before it."""
    depth = strategy.freeze_depth
    for start, d in strategy.unfreeze.items():
        if epoch >= start:
            depth = d
    return depth


def apply_freeze(model: nn.Module, groups: list[LayerGroup], depth: int) -> None:
    """requires_grad=False for the first `depth` groups, True for the rest."""
    frozen = {n for g in groups[:depth] for n in g.param_names}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)


def set_frozen_norms_eval(model: nn.Module) -> None:
    """Keep BatchNorm of frozen groups in eval mode: their running stats are part of the frozen
    features and must not drift with the new data. Call after every model.train()."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def layer_lr_scales(groups: list[LayerGroup], strategy: StrategySpec) -> list[float]:
    """LR multiplier per group: decay^(distance from the head); the head also x head_lr_mult."""
    top = len(groups) - 1
    decay = strategy.layer_decay if strategy.layer_decay is not None else 1.0
    scales = [decay ** (top - i) for i in range(len(groups))]
    scales[top] *= strategy.head_lr_mult
    return scales


def _no_weight_decay(name: str, param: nn.Parameter, model: nn.Module) -> bool:
    # Norm weights, biases, and tokens/embeddings the model itself lists (timm's no_weight_decay).
    skip = (
        set(cast(Callable[[], Iterable[str]], model.no_weight_decay)()) if hasattr(model, "no_weight_decay") else set()
    )
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def build_param_groups(
    model: nn.Module, groups: list[LayerGroup], strategy: StrategySpec, optim: OptimSpec
) -> list[dict]:
    params = dict(model.named_parameters())
    scales = layer_lr_scales(groups, strategy)
    param_groups: list[dict] = []
    for index, (group, scale) in enumerate(zip(groups, scales)):
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name in group.param_names:
            (no_decay if _no_weight_decay(name, params[name], model) else decay).append(params[name])
        for plist, wd in ((decay, optim.effective_weight_decay), (no_decay, 0.0)):
            if plist:
                param_groups.append(
                    {
                        "params": plist,
                        "lr": optim.lr * scale,
                        "weight_decay": wd,
                        "lr_scale": scale,
                        "layer_group": index,
                        "group_name": group.name,
                    }
                )
    return param_groups


def build_optimizer(
    model: nn.Module, groups: list[LayerGroup], strategy: StrategySpec, optim: OptimSpec, device: torch.device
) -> torch.optim.Optimizer:
    param_groups = build_param_groups(model, groups, strategy, optim)
    # The fused CUDA kernels avoid one launch per tensor; CPU keeps the default (foreach).
    fused = {"fused": True} if device.type == "cuda" else {}
    if optim.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=optim.lr, betas=optim.betas, **fused)
    return torch.optim.SGD(param_groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, **fused)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: ScheduleSpec) -> float:
    """Multiplier on the base LR at optimizer step `step`: linear warmup, then the decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule.kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = schedule.min_lr_ratio
    if schedule.kind == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleSpec, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = steps_per_epoch * epochs
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total, warmup, schedule))


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current LR per layer group, for metrics (`lr/<index>_<name>`)."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        out[f"{LR_PREFIX}{g['layer_group']:02d}_{g['group_name']}"] = g["lr"]
    return out
