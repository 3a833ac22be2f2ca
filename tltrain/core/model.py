"""Build the model to fine-tune and define its layer groups.

`layer_groups(model)` is the single notion of depth behind freezing and layer-wise LR: an ordered
list from the stem to the classification head (the head is always the last group). It comes from
timm's `group_matcher` when the model has one, else from the model's top-level children.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
from torch import nn

from tltrain.spec.schema import TORCHVISION_PREFIX, ModelSpec

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """The model spec cannot be built (unknown name, weights that do not fit)."""


@dataclass
class LayerGroup:
    name: str
    param_names: list[str]


def _timm_create(spec: ModelSpec, num_classes: int, pretrained_hub: bool, image_size: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {"pretrained": pretrained_hub, "num_classes": num_classes, "drop_rate": spec.drop_rate}
    if spec.drop_path_rate > 0:  # only when asked: a model without stochastic depth refuses the argument
        kwargs["drop_path_rate"] = spec.drop_path_rate
    if image_size is None:
        return timm.create_model(spec.name, **kwargs)
    try:
        # ViT-like models fix their patch grid (and position embeddings) at creation; timm resamples
        # hub weights to it. CNNs take any size and have no img_size argument.
        return timm.create_model(spec.name, img_size=image_size, **kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise
        return timm.create_model(spec.name, **kwargs)


def _torchvision_create(spec: ModelSpec, num_classes: int, pretrained_hub: bool, image_size: int | None) -> nn.Module:
    import torchvision

    tv_name = spec.name[len(TORCHVISION_PREFIX) :]
    if tv_name not in torchvision.models.list_models():
        raise ModelError(f"model.name: torchvision has no model {tv_name!r}")
    weights = "DEFAULT" if pretrained_hub else None
    # torchvision calls stochastic depth stochastic_depth_prob (EfficientNet, ConvNeXt, Swin, MaxViT).
    extra = {"stochastic_depth_prob": spec.drop_path_rate} if spec.drop_path_rate > 0 else {}
    try:
        model = torchvision.models.get_model(tv_name, weights=weights, **extra)
    except TypeError as err:
        if not extra:
            raise
        raise ModelError(_no_drop_path(spec.name)) from err
    native = getattr(model, "image_size", None)  # torchvision ViTs: the grid their pos_embedding is for
    if isinstance(native, int) and image_size is not None and image_size != native:
        resized = torchvision.models.get_model(tv_name, weights=None, image_size=image_size, **extra)
        if pretrained_hub:
            resized.load_state_dict(fit_to_model(model.state_dict(), resized))
        model = resized
    _replace_torchvision_head(model, num_classes, spec.drop_rate)
    return model


def _no_drop_path(name: str) -> str:
    return (
        f"model.drop_path_rate: {name} does not support stochastic depth; set it to 0, or use "
        "a model with drop_path_rate (timm ResNets, EfficientNets, ConvNeXt, ViTs)"
    )


def drop_path_rates(model: nn.Module) -> list[float]:
    """The drop probability of every stochastic-depth layer (timm DropPath, torchvision
    StochasticDepth) in the model, in module order."""
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth

    rates = []
    for m in model.modules():
        if isinstance(m, DropPath):
            rates.append(float(m.drop_prob))
        elif isinstance(m, StochasticDepth):
            rates.append(float(m.p))
    return rates


def _create(spec: ModelSpec, num_classes: int, pretrained_hub: bool, image_size: int | None = None) -> nn.Module:
    if spec.name.startswith(TORCHVISION_PREFIX):
        return _torchvision_create(spec, num_classes, pretrained_hub, image_size)
    if not timm.is_model(spec.name):
        raise ModelError(
            f"model.name: timm has no model {spec.name!r} (see timm.list_models(), or use torchvision:<name>)"
        )
    return _timm_create(spec, num_classes, pretrained_hub, image_size)


def _window_of(table_shape: tuple[int, ...]) -> tuple[int, int]:
    """Window size of a flat relative-position bias table ((2w-1)^2 rows, + 3 for BEiT's cls rows)."""
    n = table_shape[0]
    side = math.isqrt(n) if math.isqrt(n) ** 2 == n else math.isqrt(n - 3)
    return (side + 1) // 2, (side + 1) // 2


def fit_to_model(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Source weights trained at another resolution, made to fit `model`'s grid with timm's helpers:
    absolute position embeddings resampled (prefix tokens kept), relative position bias tables
    resized to the window. Every other tensor is passed through unchanged."""
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

    target = model.state_dict()
    out = dict(source)
    for key, tensor in source.items():
        want = target.get(key)
        if want is None or want.shape == tensor.shape:
            continue
        if key.endswith(("pos_embed", "pos_embedding")) and tensor.ndim == 3 and want.ndim == 3:
            grid = _patch_grid(model, want.shape[1])
            prefix = want.shape[1] - grid[0] * grid[1]
            out[key] = resample_abs_pos_embed(tensor, new_size=list(grid), num_prefix_tokens=prefix)
        elif key.endswith("relative_position_bias_table") and tensor.ndim == 2:
            out[key] = resize_rel_pos_bias_table(tensor, _window_of(tuple(want.shape)), tuple(want.shape))
    return out


def _patch_grid(model: nn.Module, num_tokens: int) -> tuple[int, int]:
    """The patch grid a position embedding of `num_tokens` tokens covers in `model`."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "grid_size"):
        gh, gw = patch_embed.grid_size
        return int(gh), int(gw)
    side = math.isqrt(num_tokens)  # torchvision ViT: one class token + a square grid
    side = side if side * side == num_tokens else math.isqrt(num_tokens - 1)
    return side, side


# Where _replace_torchvision_head put the new classifier (torchvision models have no get_classifier).
_HEAD_ATTR = "_tltrain_head"


def _replace_torchvision_head(model: nn.Module, num_classes: int, drop_rate: float) -> None:
    """Replace the final Linear with a `num_classes` one. Only that Linear is the head: layers before
    it in the classifier (mobilenet_v3's pretrained 576->1024 Linear, convnext's LayerNorm) keep
    their weights and belong to the top backbone group."""
    for attr in ("fc", "classifier", "heads", "head"):
        parent = getattr(model, attr, None)
        if parent is None:
            continue
        if isinstance(parent, nn.Linear):
            setattr(model, attr, nn.Sequential(nn.Dropout(drop_rate), nn.Linear(parent.in_features, num_classes)))
            setattr(model, _HEAD_ATTR, f"{attr}.1")
            return
        if isinstance(parent, nn.Sequential):
            for i in range(len(parent) - 1, -1, -1):
                layer = parent[i]
                if isinstance(layer, nn.Linear):
                    parent[i] = nn.Linear(layer.in_features, num_classes)
                    setattr(model, _HEAD_ATTR, f"{attr}.{list(parent._modules)[i]}")  # vit: heads.head
                    return
    raise ModelError("model.name: cannot find the classification head of this torchvision model")


def head_param_names(model: nn.Module) -> set[str]:
    """Names of the classifier parameters, which are re-initialised for the new classes (both heads
    of a distilled model)."""
    if hasattr(model, "get_classifier"):  # timm
        heads = cast(Callable[[], Any], model.get_classifier)()
        ids = {id(p) for head in (heads if isinstance(heads, tuple) else (heads,)) for p in head.parameters()}
        return {n for n, p in model.named_parameters() if id(p) in ids}
    path = getattr(model, _HEAD_ATTR, None)
    if isinstance(path, str):
        return {f"{path}.{n}" for n, _ in model.get_submodule(path).named_parameters()}
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
    if any(".lora_A." in k for k in source):
        raise ModelError(
            f"model.weights: {weights_file} is a LoRA checkpoint's file (adapters and head only, no backbone): "
            "resume its run by name, or start from the merged weights its registered model version carries "
            "(`mlflow artifacts download -u models:/NAME@ALIAS`: artifacts/model.safetensors)"
        )
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
    source = fit_to_model(source, model)  # position embeddings of another resolution, resampled
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


def build_model(
    spec: ModelSpec, num_classes: int, weights_file: Path | None = None, image_size: int | None = None
) -> nn.Module:
    """The model with a new `num_classes` head; source weights from `weights_file` or the hub.

    `weights_file` is the local copy of spec.weights (the caller downloads s3:// URIs first).
    `image_size` (data.image_size): ViT-like models are built for it, and weights trained at
    another size are resampled to it.
    """
    pretrained_hub = spec.weights == "hub"
    try:
        model = _create(spec, num_classes, pretrained_hub, image_size)
    except TypeError as err:
        if spec.drop_path_rate > 0 and "drop_path_rate" in str(err):
            raise ModelError(_no_drop_path(spec.name)) from None
        raise
    # Some constructors take **kwargs and drop what they do not use: check the blocks got it.
    if spec.drop_path_rate > 0 and not any(r > 0 for r in drop_path_rates(model)):
        raise ModelError(_no_drop_path(spec.name))
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


# torchvision has no group_matcher: one regex list per family (timm's idea), coarse then fine. A
# parameter that matches no pattern (the classifier's pretrained layers before the new Linear, a
# final norm) joins the top backbone group.
_TORCHVISION_GROUPS: list[tuple[str, list[str], list[str]]] = [
    (
        r"^(resnet|resnext|wide_resnet)",
        [r"^(?:conv1|bn1)\.", r"^layer(\d+)\."],
        [r"^(?:conv1|bn1)\.", r"^layer(\d+)\.(\d+)\."],
    ),
    (
        r"^regnet",
        [r"^stem\.", r"^trunk_output\.block(\d+)\."],
        [r"^stem\.", r"^trunk_output\.block(\d+)\.[^.]*?-(\d+)\."],
    ),
    (
        r"^visiontransformer",
        [r"^(?:conv_proj|class_token|encoder\.pos_embedding)", r"^encoder\.layers\.encoder_layer_(\d+)\."],
        [r"^(?:conv_proj|class_token|encoder\.pos_embedding)", r"^encoder\.layers\.encoder_layer_(\d+)\."],
    ),
    # efficientnet (v1, v2), mobilenet (v2, v3), convnext, swin, mnasnet, densenet, ...: stages in `features`
    (r".", [r"^features\.(\d+)\."], [r"^features\.(\d+)\.(?:block\.)?(\d+)\."]),
]


def _torchvision_groups(model: nn.Module, coarse: bool) -> list[list[str]] | None:
    arch = type(model).__name__.lower()
    names = [n for n, _ in model.named_parameters()]
    for family, coarse_rx, fine_rx in _TORCHVISION_GROUPS:
        if not re.search(family, arch):
            continue
        groups = _match_groups(names, coarse_rx)
        if groups is None:
            continue  # this family's layout is not this model's (e.g. no `features`)
        if not coarse:  # blocks within stages, where the model has them
            fine = _match_groups(names, fine_rx)
            groups = fine if fine is not None and len(fine) > len(groups) else groups
        return groups
    return None


def _match_groups(names: list[str], regexes: list[str]) -> list[list[str]] | None:
    patterns = [re.compile(rx) for rx in regexes]
    keyed: dict[tuple[int, ...], list[str]] = {}
    unmatched: list[str] = []
    for name in names:
        for i, rx in enumerate(patterns):
            m = rx.match(name)
            if m:
                keyed.setdefault((i, *(int(g) for g in m.groups() if g is not None)), []).append(name)
                break
        else:
            unmatched.append(name)
    if len(keyed) < 3:
        return None
    groups = [keyed[k] for k in sorted(keyed)]
    groups[-1].extend(unmatched)  # joins the top group; layer_groups takes the head out
    return groups


def _children_groups(model: nn.Module) -> list[list[str]]:
    # Parameters of the root itself (a class token, a position embedding) go with the first child.
    own = [n for n, _ in model.named_parameters(recurse=False)]
    groups: list[list[str]] = [own] if own else []
    for child_name, child in model.named_children():
        names = [f"{child_name}.{n}" for n, _ in child.named_parameters()]
        if names:
            groups.append(names)
    return groups


def layer_groups(model: nn.Module, coarse: bool = True) -> list[LayerGroup]:
    """Ordered layer groups, stem first; the last group is exactly the classification head.

    timm models: their `group_matcher`; torchvision models: the family table above; anything
    else: the top-level children. Every parameter is in exactly one group (else ModelError)."""
    raw = _timm_groups(model, coarse) or _torchvision_groups(model, coarse) or _children_groups(model)
    head = head_param_names(model)
    groups: list[LayerGroup] = []
    for names in raw:
        body = [n for n in names if n not in head]
        if body:
            groups.append(LayerGroup(name="stem" if not groups else _group_label(body), param_names=body))
    groups.append(LayerGroup(name="head", param_names=[n for n, _ in model.named_parameters() if n in head]))
    _check_partition(model, groups)
    return groups


def _check_partition(model: nn.Module, groups: list[LayerGroup]) -> None:
    seen: dict[str, str] = {}
    for g in groups:
        for n in g.param_names:
            if n in seen:
                raise ModelError(f"layer groups: {n} is in both {seen[n]} and {g.name}")
            seen[n] = g.name
    missing = [n for n, _ in model.named_parameters() if n not in seen]
    if missing:
        raise ModelError(f"layer groups: {len(missing)} parameter(s) in no group, e.g. {missing[:3]}")
    if not groups[-1].param_names:
        raise ModelError("layer groups: the model has no classification head parameters")


def shared_module_path(param_names: list[str]) -> list[str]:
    """The deepest module path (as parts) that holds all these parameters; [] for top-level siblings."""
    common: list[str] = []
    for parts in zip(*(n.split(".")[:-1] for n in param_names)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return common


def _group_label(names: list[str]) -> str:
    """The module path the group's parameters share (`layer2`, `features.3`, `blocks.7`)."""
    common = shared_module_path(names)
    # Up to the first index: a stage (`features.3`, `layer2`), not the one block it happens to hold.
    for i, part in enumerate(common):
        if part.isdigit():
            common = common[: i + 1] if not (i + 1 < len(common) and common[i + 1].isdigit()) else common[: i + 2]
            break
    if common:
        return ".".join(common)
    first = names[0].split(".")
    return ".".join(first[:2]) if len(first) > 2 and first[1].isdigit() else first[0]


def num_backbone_groups(model: nn.Module, coarse: bool = True) -> int:
    return len(layer_groups(model, coarse)) - 1
