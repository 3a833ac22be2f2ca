"""LoRA fine-tuning: low-rank adapters (peft) on the trainable layer groups, the head trained fully.

Order of use (training and rebuild alike): build_model -> load source weights -> apply_freeze(depth)
-> lora_target_names -> apply_lora -> (rebuild only) load_adapter_state. Layer groups must be taken
again from the adapted model for the optimizer: peft renames `x.weight` to `x.base_layer.weight`.

peft facts this module works around (peft 0.21.2):
- a list `target_modules` also matches every module whose name *ends* with `.<name>` (`conv1`
  would hit `layer1.0.conv1`); a str is `re.fullmatch`ed, so we pass one escaped alternation.
- injection freezes every non-adapter parameter, the head included; apply_lora re-enables the head.
- it leaves a `peft_config` dict attribute on the model; merge_lora removes it.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from tltrain.core.checkpoint import sha256_file
from tltrain.core.model import LayerGroup, build_model, head_param_names, layer_groups
from tltrain.core.optim import apply_freeze, resolve_freeze_depth
from tltrain.spec.schema import JobSpec, StrategySpec

TARGETS_FIELD = "strategy.lora.targets"


class LoraError(ValueError):
    """LoRA settings that do not fit the model, or an adapter checkpoint that does not fit it."""


def _plain_linear(m: nn.Module) -> bool:
    # A subclass with its own forward (timm's Linear casts, StdConv standardises) would make the
    # merged weight compute something else than base + adapter.
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _plain_conv(m: nn.Module) -> bool:
    # peft builds lora_A as Conv2d(in, r, kernel, stride, padding): no dilation, no groups, no
    # padding mode, and merging grouped convs is unsupported. Conv2dSame pads in forward: refused.
    return (
        isinstance(m, nn.Conv2d)
        and type(m).forward is nn.Conv2d.forward
        and type(m)._conv_forward is nn.Conv2d._conv_forward
        and m.groups == 1
        and tuple(m.dilation) == (1, 1)
        and m.padding_mode == "zeros"
    )


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d modules LoRA can adapt exactly, in module order."""
    # nn.MultiheadAttention reads out_proj.weight directly: an adapter there would never run.
    inside_mha = {
        f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) for c in m._modules
    }
    return {n: m for n, m in model.named_modules() if (_plain_linear(m) or _plain_conv(m)) and n not in inside_mha}


def _pointwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1))


def _suggestions(names: Sequence[str], limit: int = 8) -> str:
    tails = sorted({"*." + n.rsplit(".", 1)[-1] for n in names})
    return ", ".join(tails[:limit] + list(names[:3])) if names else "(none)"


def lora_target_names(
    model: nn.Module, groups: list[LayerGroup], freeze_depth: int, targets: str | Sequence[str]
) -> list[str]:
    """Names of the modules to adapt, in module order.

    Only modules whose parameters all lie in groups[freeze_depth:-1] qualify: lower groups stay
    frozen without adapters and the last group (the head) is trained fully. `targets="auto"`: every
    nn.Linear (ViT attention qkv/proj, MLP fc1/fc2; ConvNeXt's MLP) and every 1x1 nn.Conv2d with
    groups=1 (a CNN's pointwise convs). Otherwise shell-style patterns (fnmatch, case-sensitive)
    matched against the full module name: "*.qkv", "blocks.1[01].*", "layer4.*.conv2"."""
    trainable = {n for g in groups[freeze_depth:-1] for n in g.param_names}
    head = head_param_names(model)
    candidates = _adaptable(model)
    allowed = [
        name
        for name, m in candidates.items()
        if all(f"{name}.{p}" in trainable and f"{name}.{p}" not in head for p, _ in m.named_parameters(recurse=False))
    ]
    if targets == "auto":
        chosen = [n for n in allowed if _pointwise(candidates[n])]
        if not chosen:
            raise LoraError(
                f"{TARGETS_FIELD}: 'auto' found no Linear or 1x1 Conv2d above strategy.freeze_depth={freeze_depth} "
                f"({len(groups) - 1} backbone groups); lower the freeze depth or name targets: {_suggestions(allowed)}"
            )
        return chosen
    patterns = [targets] if isinstance(targets, str) else list(targets)
    all_linear_conv = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    for pattern in patterns:
        # A pattern that names no Linear/Conv2d anywhere is a typo; one whose modules are merely
        # frozen at this depth is not (a sweep over freeze_depth should not fail on it).
        if not any(fnmatch.fnmatchcase(n, pattern) for n in all_linear_conv):
            raise LoraError(
                f"{TARGETS_FIELD}: {pattern!r} matches no nn.Linear/nn.Conv2d module (patterns are fnmatch globs over "
                f"the full module name); candidates: {_suggestions(allowed or list(candidates))}"
            )
    chosen = [n for n in allowed if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise LoraError(
            f"{TARGETS_FIELD}: {patterns} match no adaptable module above strategy.freeze_depth={freeze_depth} "
            "(plain nn.Linear, or nn.Conv2d with groups=1, no dilation and static padding, outside the head); "
            f"candidates: {_suggestions(allowed)}"
        )
    return chosen


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def is_lora_model(model: nn.Module) -> bool:
    return bool(_lora_layers(model))


def adapted_layers(model: nn.Module) -> list[str]:
    """Names of the layers holding adapters, in module order."""
    return list(_lora_layers(model))


def apply_lora(model: nn.Module, names: Sequence[str], rank: int, alpha: float, dropout: float) -> nn.Module:
    """Inject LoRA adapters into exactly `names` (in place; the model is returned for chaining).

    Afterwards only the adapters and the head have requires_grad=True; everything else, the adapted
    base weights included, is frozen. To train more (norms), set requires_grad afterwards:
    adapter_state picks up whatever is trainable."""
    if is_lora_model(model):
        raise LoraError("apply_lora: the model already has LoRA adapters")
    if not names:
        raise LoraError(f"{TARGETS_FIELD}: no module to adapt")
    candidates = _adaptable(model)
    unfit = [n for n in names if n not in candidates]
    if unfit:
        raise LoraError(f"{TARGETS_FIELD}: not an adaptable Linear/Conv2d: {unfit[:5]}")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int; the scaling alpha / r is a float
        lora_dropout=dropout,
        # One anchored alternation: re.fullmatch hits exactly these names (a list would suffix-match).
        target_modules="|".join(re.escape(n) for n in names),
        bias="none",
    )
    inject_adapter_in_model(config, model)
    adapted = _lora_layers(model)
    if set(adapted) != set(names):  # the contract this module promises; peft's matching is not ours
        raise LoraError(f"peft adapted {sorted(set(adapted) ^ set(names))[:5]} unlike asked")
    freeze_base(model)
    return model


def freeze_base(model: nn.Module) -> None:
    """requires_grad=True for the adapters and the head only. What apply_lora leaves; call it
    instead of optim.apply_freeze on a LoRA model (that one would unfreeze the base weights)."""
    head = head_param_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in head)
    for layer in _lora_layers(model).values():
        for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters()):
            p.requires_grad_(True)


def lora_param_count(model: nn.Module, names: Sequence[str], rank: int) -> int:
    """Adapter parameters for `names` at `rank`, from the base layers' shapes alone (before or after
    apply_lora). Linear: A (r x in) + B (out x r). Conv2d as peft builds it: A = Conv2d(in, r,
    base kernel), B = 1x1 Conv2d(r, out, groups=base groups). No adapter bias (bias="none")."""
    total = 0
    for name in names:
        m = model.get_submodule(name)
        base = m.get_base_layer() if isinstance(m, LoraLayer) else m
        if isinstance(base, nn.Linear):
            total += rank * (base.in_features + base.out_features)
        elif isinstance(base, nn.Conv2d):
            kh, kw = base.kernel_size
            total += base.in_channels * rank * kh * kw + base.out_channels * (rank // base.groups)
        else:
            raise LoraError(f"{TARGETS_FIELD}: {name} is a {type(base).__name__}, not Linear/Conv2d")
    return total


def merge_lora(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every adapter folded into its base weight (W + B @ A * alpha / r) and each
    LoRA layer replaced by its plain base layer: the state_dict has exactly the original keys and
    loads into a plain timm/torchvision model. On a deep copy unless `inplace` (training goes on
    with the adapters after an export). Pass the unwrapped module, not the DDP wrapper."""
    merged = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in _lora_layers(merged).items():
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name), child, layer.get_base_layer())
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged


def _trained_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    # A module with a trainable parameter of its own (adapter, head, a norm set trainable); buffers
    # of such modules (BatchNorm running stats in train mode) move with training too.
    return [(n, m) for n, m in model.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint stores: every trainable parameter (adapters, head, norms if trained)
    and the persistent buffers of the modules that own them. Detached views of the live tensors
    (clone before keeping them across steps). Pass the unwrapped module."""
    out: dict[str, torch.Tensor] = {}
    for prefix, m in _trained_modules(model):
        dot = f"{prefix}." if prefix else ""
        for n, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                out[dot + n] = p.detach()
        for n, b in m.named_buffers(recurse=False):
            if b is not None and n not in m._non_persistent_buffers_set:
                out[dot + n] = b.detach()
    return out


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an adapter_state into a model rebuilt the same way (same model, source weights, freeze
    depth and LoRA settings). Strict: any missing, unexpected or reshaped key is a LoraError."""
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
    if missing or unexpected or reshaped:
        raise LoraError(
            "adapter checkpoint does not fit this model (rebuild with the same model, strategy.freeze_depth and "
            f"strategy.lora): missing {missing[:5]}, unexpected {unexpected[:5]}, other shape {reshaped[:5]}"
        )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(state[key])


def check_adapters_used(model: nn.Module, images: torch.Tensor) -> None:
    """Raise LoraError naming the adapted layers a forward pass never calls: models that read a
    layer's `.weight` directly (timm BEiT/EVA qkv via F.linear) bypass the adapter, which then gets
    no gradient (and DDP without find_unused_parameters fails on it). One no-grad eval forward."""
    called: set[str] = set()
    handles = [
        cast(nn.Module, layer).register_forward_hook(lambda *_, name=name: called.add(name))
        for name, layer in _lora_layers(model).items()
    ]
    modes = [m.training for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
        for m, mode in zip(model.modules(), modes):
            m.train(mode)
    skipped = [n for n in _lora_layers(model) if n not in called]
    if skipped:
        raise LoraError(
            f"{TARGETS_FIELD}: the model never calls {skipped[:5]} as a module (it reads their weights directly), "
            "so adapters there would not train; exclude them from the targets"
        )


# --- the run's view: a spec's strategy.lora on a model, and LoRA checkpoints made whole ----------


def adapt_model(model: nn.Module, strategy: StrategySpec, coarse: bool) -> list[LayerGroup]:
    """Freeze the first strategy.freeze_depth groups, put adapters on the rest (strategy.lora) and
    return the adapted model's layer groups: what the optimizer and the loop use from here on
    (peft renamed the adapted weights, so groups taken before would miss them)."""
    lora = strategy.lora
    if lora is None:
        raise LoraError("adapt_model: strategy.lora is not set")
    groups = layer_groups(model, coarse=coarse)
    depth = resolve_freeze_depth(strategy.freeze_depth, groups)
    apply_freeze(model, groups, depth)
    names = lora_target_names(model, groups, depth, lora.targets)
    apply_lora(model, names, lora.rank, lora.alpha, lora.dropout)
    return layer_groups(model, coarse=coarse)


def rebuild_merged(
    spec: JobSpec,
    num_classes: int,
    weights_file: Path | None,
    expected_sha256: str | None,
    states: list[dict[str, torch.Tensor]],
) -> list[dict[str, torch.Tensor]]:
    """Plain full state_dicts (the original model's keys) of LoRA checkpoints: the source model
    rebuilt as the run built it (spec: the checkpoint's), each trained subset loaded, the adapters
    merged. weights_file: the source weights, which must hash to the checkpoint's
    source_weights_sha256 (adapters trained on other weights would be meaningless on these)."""
    if weights_file is not None and not Path(weights_file).is_file():
        raise LoraError(
            f"model.weights {spec.model.weights}: not found here, and this LoRA checkpoint holds only the change to "
            "those weights; run where the file is, or copy it to that path (or put it in object storage)"
        )
    if weights_file is not None and expected_sha256 is not None and sha256_file(weights_file) != expected_sha256:
        raise LoraError(
            f"model.weights {spec.model.weights}: the file's sha256 differs from the one this LoRA checkpoint was "
            "trained on (its adapters hold only the change to those weights); restore the original file"
        )
    model = build_model(spec.model, num_classes, weights_file=weights_file, image_size=spec.data.image_size)
    adapt_model(model, spec.strategy, spec.strategy.group_granularity == "coarse")
    merged = []
    for state in states:
        load_adapter_state(model, state)
        merged.append({k: v.detach().clone() for k, v in merge_lora(model).state_dict().items()})
    return merged
