"""Build the model to fine-tune and define its layer groups.

`layer_groups(model)` is the single notion of depth behind freezing and layer-wise LR: an ordered
list from the stem to the classification head (the head is always the last group). It comes from
timm's `group_matcher` when the model has one, else from the model's top-level children.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
from torch import nn

from tltrain.spec.schema import ModelSpec

log = logging.getLogger(__name__)

TORCHVISION_PREFIX = "torchvision:"


class ModelError(ValueError):
    """The model spec cannot be built (unknown name, weights that do not fit)."""


@dataclass
class LayerGroup:
    name: str
    param_names: list[str]


def _create(spec: ModelSpec, num_classes: int, pretrained_hub: bool) -> nn.Module:
    if spec.name.startswith(TORCHVISION_PREFIX):
        import torchvision

        tv_name = spec.name[len(TORCHVISION_PREFIX) :]
        if tv_name not in torchvision.models.list_models():
            raise ModelError(f"model.name: torchvision has no model {tv_name!r}")
        weights = "DEFAULT" if pretrained_hub else None
        model = torchvision.models.get_model(tv_name, weights=weights)
        _replace_torchvision_head(model, num_classes, spec.drop_rate)
        return model
    if not timm.is_model(spec.name):
        raise ModelError(
            f"model.name: timm has no model {spec.name!r} (see timm.list_models(), or use torchvision:<name>)"
        )
    return timm.create_model(spec.name, pretrained=pretrained_hub, num_classes=num_classes, drop_rate=spec.drop_rate)


def _replace_torchvision_head(model: nn.Module, num_classes: int, drop_rate: float) -> None:
    # torchvision classifiers end in one Linear named fc / classifier[-1] / heads.head.
    for attr in ("fc", "classifier", "heads", "head"):
        parent = getattr(model, attr, None)
        if parent is None:
            continue
        if isinstance(parent, nn.Linear):
            setattr(model, attr, nn.Sequential(nn.Dropout(drop_rate), nn.Linear(parent.in_features, num_classes)))
            return
        if isinstance(parent, nn.Sequential):
            for i in range(len(parent) - 1, -1, -1):
                layer = parent[i]
                if isinstance(layer, nn.Linear):
                    parent[i] = nn.Linear(layer.in_features, num_classes)
                    return
    raise ModelError("model.name: cannot find the classification head of this torchvision model")


def head_param_names(model: nn.Module) -> set[str]:
    """Names of the classifier parameters, which are re-initialised for the new classes."""
    if hasattr(model, "get_classifier"):
        head = cast(Callable[[], nn.Module], model.get_classifier)()  # timm models only
        ids = {id(p) for p in head.parameters()}
        return {n for n, p in model.named_parameters() if id(p) in ids}
    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(model, attr):
            return {f"{attr}.{n}" for n, _ in getattr(model, attr).named_parameters()}
    raise ModelError("cannot find the model's classification head")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only: a weights file from outside must never run code when loaded.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).splitlines()[0] if str(err) else "not a plain tensor file"
        raise ModelError(
            f"model.weights: {path} holds Python objects besides tensors; tltrain does not load it ({reason}). "
            "Export the weights as safetensors or a plain state_dict."
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_source_weights(model: nn.Module, weights_file: Path, remap: bool) -> tuple[list[str], list[str]]:
    """Load pretrained weights into all but the new head. Returns (missing, skipped) key lists.

    remap=False matches by name (shape mismatches are an error, so a wrong file fails loudly);
    remap=True pairs the backbone's tensors in order with the file's (same shapes required), for
    weights exported under other names (the packaged EfficientNet-Lite0 .pth).
    """
    source = _read_state_dict(weights_file)
    target = model.state_dict()
    head = head_param_names(model)
    head_buffers = {n for n in target if any(n.startswith(h.rsplit(".", 1)[0] + ".") for h in head)}
    backbone_keys = [k for k in target if k not in head and k not in head_buffers]
    if remap:
        src_items = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
        dst_keys = [k for k in backbone_keys if not k.endswith("num_batches_tracked")]
        src_backbone = src_items[: len(dst_keys)]
        if len(src_backbone) < len(dst_keys):
            raise ModelError(
                f"model.weights: {weights_file.name} has {len(src_items)} tensors, the backbone needs {len(dst_keys)}; "
                "weights_remap pairs tensors in order, so the file must hold the same architecture"
            )
        mapped: dict[str, torch.Tensor] = {}
        for dst, (src, tensor) in zip(dst_keys, src_backbone):
            if target[dst].shape != tensor.shape:
                raise ModelError(
                    f"model.weights: in-order remap failed at {dst} {tuple(target[dst].shape)} <- {src} "
                    f"{tuple(tensor.shape)}; this file does not belong to model.name"
                )
            mapped[dst] = tensor
        source = mapped
    loadable: dict[str, torch.Tensor] = {}
    for key in backbone_keys:
        if key in source:
            if source[key].shape != target[key].shape:
                raise ModelError(
                    f"model.weights: {key} has shape {tuple(source[key].shape)} in the file, "
                    f"{tuple(target[key].shape)} in {type(model).__name__}; wrong file for model.name?"
                )
            loadable[key] = source[key]
    missing = [k for k in backbone_keys if k not in loadable and not k.endswith("num_batches_tracked")]
    if len(missing) > len(backbone_keys) // 2:
        hint = " (names differ: set model.weights_remap: true if the tensors match in order)" if not remap else ""
        raise ModelError(f"model.weights: only {len(loadable)}/{len(backbone_keys)} tensors match by name{hint}")
    model.load_state_dict(loadable, strict=False)
    skipped = [k for k in _read_state_dict(weights_file) if k not in loadable] if not remap else []
    return missing, skipped


def build_model(spec: ModelSpec, num_classes: int, weights_file: Path | None = None) -> nn.Module:
    """The model with a new `num_classes` head; source weights from `weights_file` or the hub.

    `weights_file` is the local copy of spec.weights (the caller downloads s3:// URIs first).
    """
    pretrained_hub = spec.weights == "hub"
    model = _create(spec, num_classes, pretrained_hub)
    if weights_file is not None:
        missing, skipped = load_source_weights(model, Path(weights_file), spec.weights_remap)
        if missing:
            log.warning(
                "model.weights: %d backbone tensors not in the file, left at init: %s", len(missing), missing[:5]
            )
        log.info("loaded %s (%d source tensors not used, e.g. the old head)", weights_file, len(skipped))
    return model


def _timm_groups(model: nn.Module, coarse: bool) -> list[list[str]] | None:
    if not hasattr(model, "group_matcher"):
        return None
    from timm.models import group_parameters

    try:
        grouped = group_parameters(model, cast(Callable[..., Any], model.group_matcher)(coarse=coarse))
    except NotImplementedError:
        return None
    return [list(names) for _, names in sorted(grouped.items())]


def _children_groups(model: nn.Module) -> list[list[str]]:
    groups: list[list[str]] = []
    for child_name, child in model.named_children():
        names = [f"{child_name}.{n}" for n, _ in child.named_parameters()]
        if names:
            groups.append(names)
    return groups


def layer_groups(model: nn.Module, coarse: bool = True) -> list[LayerGroup]:
    """Ordered layer groups, stem first; the last group is exactly the classification head."""
    raw = _timm_groups(model, coarse) or _children_groups(model)
    head = head_param_names(model)
    groups: list[LayerGroup] = []
    for names in raw:
        body = [n for n in names if n not in head]
        if body:
            groups.append(LayerGroup(name="stem" if not groups else _group_label(body), param_names=body))
    groups.append(LayerGroup(name="head", param_names=[n for n, _ in model.named_parameters() if n in head]))
    return groups


def _group_label(names: list[str]) -> str:
    first = names[0].split(".")
    return ".".join(first[:2]) if len(first) > 2 and first[1].isdigit() else first[0]


def num_backbone_groups(model: nn.Module, coarse: bool = True) -> int:
    return len(layer_groups(model, coarse)) - 1
