"""Forward-only feature extraction for the transferability scores (`tltrain rank`).

What a source model "offers" a target set: the pooled features its backbone hands the classifier
(timm's `forward_features` + `forward_head(pre_logits=True)`), the logits of its own source head
where the weights carry one (LEEP and NCE read them), and — for `--depths` — the pooled output of
each layer group of `core/model.layer_groups` (the one notion of depth: freezing d groups means the
trainable part starts from group d-1's output).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from tltrain.core.model import ModelError, _read_state_dict, head_param_names, layer_groups, shared_module_path


@dataclass
class SourceHead:
    """The source classifier over the pooled features: logits = features @ weight.T + bias."""

    weight: torch.Tensor  # (source classes, feature dim)
    bias: torch.Tensor | None

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])


@dataclass
class Extracted:
    features: np.ndarray  # (N, D) pooled pre-logits features
    labels: np.ndarray  # (N,) target class indices
    source_logits: np.ndarray | None = None  # (N, Z), where the weights carry a source head
    depth_features: dict[int, np.ndarray] = field(default_factory=dict)  # freeze depth -> (N, D_d)
    depth_names: dict[int, str] = field(default_factory=dict)  # freeze depth -> the group it follows


def check_extractable(model: nn.Module, name: str) -> None:
    """The rank command needs timm's forward_features / forward_head (pooled pre-logits features)."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ModelError(f"model.name: {name} has no forward_features/forward_head; `tltrain rank` scores timm models")


def source_head(model: nn.Module, weights_file: Path | None, remap: bool) -> SourceHead | None:
    """The weights file's own classifier, if it has a linear one over the model's pooled features.

    Found as build_model pairs tensors: by the model's head parameter names, or with `remap` (the
    in-order convention of model.weights_remap) as the tensors left after the backbone's. None for
    random init and for a head-less file (a backbone export, a checkpoint whose head was dropped)."""
    if weights_file is None:
        return None
    state = _read_state_dict(Path(weights_file))
    head = head_param_names(model)
    num_features = int(cast(Any, model).num_features)
    if remap:
        backbone = [k for k in model.state_dict() if k not in head and not k.endswith("num_batches_tracked")]
        rest = [v for k, v in state.items() if not k.endswith("num_batches_tracked")][len(backbone) :]
        weight = next((t for t in rest if t.ndim == 2), None)
        bias = next((t for t in rest if t.ndim == 1), None)
    else:
        named = {n.rsplit(".", 1)[-1]: state.get(n) for n in head}
        weight, bias = named.get("weight"), named.get("bias")
    if weight is None or weight.ndim != 2 or int(weight.shape[1]) != num_features:
        return None
    if bias is not None and bias.shape != (weight.shape[0],):
        bias = None
    return SourceHead(weight.float(), bias.float() if bias is not None else None)


def hub_source_head(model_name: str) -> SourceHead | None:
    """The hub checkpoint's own classifier (timm's default head for its pretrained weights)."""
    import timm

    hub = timm.create_model(model_name, pretrained=True)
    classifier = cast(Any, hub).get_classifier()
    if not isinstance(classifier, nn.Linear):
        return None
    return SourceHead(
        classifier.weight.detach().float(), classifier.bias.detach().float() if classifier.bias is not None else None
    )


def _pool(out: Any) -> torch.Tensor:
    """A layer's output as one vector per image: spatial mean for (B, C, H, W), token mean for
    (B, T, C), as is for (B, C)."""
    x = out[0] if isinstance(out, (tuple, list)) else out
    if x.ndim == 4:
        return x.mean(dim=(2, 3))
    if x.ndim == 3:
        return x.mean(dim=1)
    return x.flatten(1)


def _group_module(model: nn.Module, param_names: list[str]) -> str:
    """The module whose output is a group's output: the deepest module holding all its parameters,
    or (a stem made of siblings, e.g. conv_stem + bn1) the module of its last parameter."""
    common = shared_module_path(param_names)
    return ".".join(common) if common else param_names[-1].rpartition(".")[0]


def depth_modules(model: nn.Module, coarse: bool = True) -> list[tuple[int, str, str]]:
    """(freeze depth, group name, module path) for depths 1..groups (strategy.group_granularity's
    groups, so the numbers are freeze_depth's): the output a run frozen to that depth trains from."""
    groups = layer_groups(model, coarse=coarse)[:-1]  # the head is never frozen input
    return [(d, g.name, _group_module(model, g.param_names)) for d, g in enumerate(groups, start=1)]


@torch.no_grad()
def extract(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    head: SourceHead | None = None,
    depths: bool = False,
    coarse: bool = True,
) -> Extracted:
    """Forward every batch once in eval mode; float32 arrays out (the scores cast to float64)."""
    check_extractable(model, type(model).__name__)
    model.eval().to(device)
    net = cast(Any, model)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    names: dict[int, str] = {}
    if depths:
        for depth, name, path in depth_modules(model, coarse):
            names[depth] = name

            def hook(_m: nn.Module, _i: Any, out: Any, depth: int = depth) -> None:
                captured[depth] = _pool(out).float().cpu()

            hooks.append(model.get_submodule(path).register_forward_hook(hook))
    feats, labels, logits = [], [], []
    per_depth: dict[int, list[torch.Tensor]] = {d: [] for d in names}
    weight = head.weight.to(device) if head is not None else None
    bias = head.bias.to(device) if head is not None and head.bias is not None else None
    try:
        for images, targets in batches:
            pooled = net.forward_head(net.forward_features(images.to(device)), pre_logits=True).float()
            feats.append(pooled.cpu())
            labels.append(targets.cpu())
            if weight is not None:
                logits.append(nn.functional.linear(pooled, weight, bias).cpu())
            for d in per_depth:
                per_depth[d].append(captured[d])
    finally:
        for h in hooks:
            h.remove()
    return Extracted(
        features=torch.cat(feats).numpy(),
        labels=torch.cat(labels).numpy().astype(np.int64),
        source_logits=torch.cat(logits).numpy() if logits else None,
        depth_features={d: torch.cat(v).numpy() for d, v in per_depth.items()},
        depth_names=names,
    )
