"""LoRA on timm models (CPU, tiny inputs): targets, freezing, counts, merge, adapter checkpoints, DDP."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn

from tltrain.core.lora import (
    LoraError,
    adapter_state,
    apply_lora,
    check_adapters_used,
    freeze_base,
    is_lora_model,
    load_adapter_state,
    lora_param_count,
    lora_target_names,
    merge_lora,
)
from tltrain.core.model import head_param_names, layer_groups
from tltrain.core.optim import apply_freeze, set_frozen_norms_eval

torch.set_num_threads(1)

RANK = 4
VIT = "vit_tiny_patch16_224"
CNN = "tf_efficientnet_lite0"


def _model(name: str, img_size: int | None = 32) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"img_size": img_size} if name == VIT and img_size is not None else {}
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)


def _adapt(model: nn.Module, depth: int = 0, targets: str | list[str] = "auto", dropout: float = 0.0) -> list[str]:
    """The order the recipe uses: freeze, pick targets, inject."""
    groups = layer_groups(model)
    apply_freeze(model, groups, depth)
    names = lora_target_names(model, groups, depth, targets)
    apply_lora(model, names, rank=RANK, alpha=2.0 * RANK, dropout=dropout)
    return names


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model: nn.Module, steps: int = 3, lr: float = 0.05) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    model.train()
    set_frozen_norms_eval(model)  # the loop does this: frozen BatchNorm keeps its running stats
    x, y = _batch()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _trainable_non_head(model: nn.Module) -> int:
    head = head_param_names(model)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in head)


@pytest.mark.parametrize("name", [VIT, CNN])
def test_only_adapters_and_head_change(name: str) -> None:
    model = _model(name)
    _adapt(model, dropout=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model)
    head = head_param_names(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "nothing trained"
    assert all(".lora_A." in k or ".lora_B." in k or k in head for k in changed), sorted(changed)[:5]
    assert any(".lora_B." in k for k in changed) and head <= changed  # adapters and the head both moved
    # Base weights, norms, BatchNorm running stats: bit-identical (checked by `changed` above).
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".base_layer." in n)


@pytest.mark.parametrize(("name", "targets"), [(VIT, "auto"), (CNN, "auto"), (VIT, ["patch_embed.proj", "*.qkv"])])
def test_trainable_count_matches_formula(name: str, targets: str | list[str]) -> None:
    model = _model(name)
    groups = layer_groups(model)
    names = lora_target_names(model, groups, 0, targets)
    predicted = lora_param_count(model, names, RANK)  # from shapes, before injection
    apply_lora(model, names, rank=RANK, alpha=8.0, dropout=0.0)
    assert _trainable_non_head(model) == predicted == lora_param_count(model, names, RANK)
    if (name, targets) == (VIT, "auto"):  # qkv 192->576, proj 192->192, fc1 192->768, fc2 768->192; 12 blocks
        assert len(names) == 48
        assert predicted == 12 * RANK * ((192 + 576) + (192 + 192) + (192 + 768) + (768 + 192))


@pytest.mark.parametrize(("name", "targets"), [(VIT, "auto"), (CNN, "auto"), (VIT, ["*"])])
def test_merged_model_gives_the_same_logits(name: str, targets: str | list[str]) -> None:
    model = _model(name)
    names = _adapt(model, targets=targets)
    _train(model)  # lora_B starts at zero: merge would be trivially exact before training
    model.eval()
    x, _ = _batch()
    with torch.no_grad():
        adapted = model(x)
    merged = merge_lora(model)
    assert is_lora_model(model) and not is_lora_model(merged)  # a copy: training could go on
    assert not hasattr(merged, "peft_config")
    plain = _model(name)
    assert list(merged.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(merged.state_dict(), strict=True)  # loads into plain timm
    plain.eval()
    with torch.no_grad():
        # fp32: W x + s B A x vs (W + s B A) x differ by rounding only.
        torch.testing.assert_close(plain(x), adapted, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain(x), _model(name).eval()(x))  # the merge did change the weights
    if targets == ["*"]:
        assert "patch_embed.proj" in names  # a 16x16 conv merged too


def test_adapter_checkpoint_is_small() -> None:
    model = _model(VIT, img_size=None)  # 224 px: the size of the real thing, no forward needed
    _adapt(model)
    state = adapter_state(model)
    head = head_param_names(model)
    assert set(state) == {n for n in state if ".lora_" in n} | head
    small, full = len(save(adapter_state(model))), len(save(merge_lora(model).state_dict()))
    assert full >= 10 * small, (full, small)


def test_rebuild_from_source_weights_and_adapter_state() -> None:
    source = _model(VIT).state_dict()  # the pretrained weights the run started from
    trained = _model(VIT)
    _adapt(trained, depth=3)
    _train(trained)
    saved = {k: v.clone() for k, v in adapter_state(trained).items()}

    rebuilt = _model(VIT)
    torch.manual_seed(123)  # other adapter init: the checkpoint must overwrite it
    rebuilt.load_state_dict(source)
    _adapt(rebuilt, depth=3)
    load_adapter_state(rebuilt, saved)
    x, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), trained.eval()(x), atol=0, rtol=0)

    missing = dict(saved)
    missing.pop(next(iter(missing)))
    with pytest.raises(LoraError, match="missing"):
        load_adapter_state(rebuilt, missing)
    with pytest.raises(LoraError, match="unexpected"):
        load_adapter_state(
            rebuilt, {**saved, "blocks.0.attn.qkv.base_layer.weight": source["blocks.0.attn.qkv.weight"]}
        )
    reshaped = {k: (v[:1] if k.endswith("lora_A.default.weight") else v) for k, v in saved.items()}
    with pytest.raises(LoraError, match="other shape"):
        load_adapter_state(rebuilt, reshaped)
    with pytest.raises(LoraError, match="unexpected"):  # another freeze depth: other adapters
        other = _model(VIT)
        _adapt(other, depth=5)
        load_adapter_state(other, saved)


def test_targets_matching_nothing_name_the_field() -> None:
    model = _model(VIT)
    groups = layer_groups(model)
    with pytest.raises(LoraError, match=r"strategy\.lora\.targets.*qkvv.*\*\.qkv"):
        lora_target_names(model, groups, 0, ["*.qkvv"])
    with pytest.raises(LoraError, match=r"strategy\.lora\.targets.*\*\.fc1"):  # bare names are not globs of the tail
        lora_target_names(model, groups, 0, ["fc1"])
    with pytest.raises(LoraError, match=r"strategy\.lora\.targets.*freeze_depth=5"):  # real modules, all frozen
        lora_target_names(model, groups, 5, ["blocks.[0-3].*"])
    with pytest.raises(LoraError, match=r"strategy\.lora\.targets.*freeze_depth=13"):  # feature extraction
        lora_target_names(model, groups, len(groups) - 1, "auto")


def test_freeze_depth_keeps_adapters_out_of_low_groups() -> None:
    model = _model(VIT)
    groups = layer_groups(model)  # stem, blocks.0 .. blocks.11, head
    names = _adapt(model, depth=5)  # stem + blocks 0-3 frozen
    assert len(names) == 8 * 4 and all(int(n.split(".")[1]) >= 4 for n in names)
    frozen = {n for g in groups[:5] for n in g.param_names}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.", "patch_embed")) for n in trainable)
    assert frozen.isdisjoint(trainable)
    # The optimizer takes layer groups from the adapted model: peft's names keep timm's group regexes.
    after = layer_groups(model)
    assert [g.name for g in after] == [g.name for g in groups]
    assert "blocks.4.attn.qkv.lora_A.default.weight" in after[5].param_names
    assert not any(n.startswith("head") for n in lora_target_names(_model(VIT), groups, 0, ["*"]))  # never the head
    cnn = _model(CNN)
    pointwise = lora_target_names(cnn, layer_groups(cnn), 2, "auto")
    assert pointwise and all(cnn.get_submodule(n).kernel_size == (1, 1) for n in pointwise)
    # The loop's apply_freeze (progressive unfreezing) would train the base weights; freeze_base undoes it.
    apply_freeze(model, after, 0)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".base_layer." in n)
    freeze_base(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(LoraError, match="already"):
        apply_lora(model, names, rank=RANK, alpha=8.0, dropout=0.0)


def test_timm_forward_features_ddp_and_bf16_autocast(tmp_path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    model = _model(VIT)
    _adapt(model, depth=2, dropout=0.1)
    check_adapters_used(model, _batch(1)[0])
    assert model.forward_features(_batch(2)[0]).shape == (2, 5, 192)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        # find_unused_parameters=False: every trainable parameter must get a grad each step, or the
        # second step raises; frozen base weights are not DDP parameters at all.
        ddp = DDP(model, find_unused_parameters=False)
        x, y = _batch()
        opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(2):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = ddp(x)
            assert logits.dtype == torch.bfloat16
            F.cross_entropy(logits.float(), y).backward()
            opt.step()
    finally:
        dist.destroy_process_group()
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in lora_b)


class _ReadsWeight(nn.Module):
    """Like timm BEiT/EVA attention: `F.linear(x, self.qkv.weight, ...)` skips the module call."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(F.linear(x, self.qkv.weight, self.qkv.bias)))


def test_check_adapters_used_finds_bypassed_layers() -> None:
    model = _ReadsWeight()
    apply_lora(model, ["qkv", "fc"], rank=2, alpha=2.0, dropout=0.0)
    with pytest.raises(LoraError, match=r"strategy\.lora\.targets.*\['qkv'\]"):
        check_adapters_used(model, torch.randn(1, 4))
    assert model.training  # modes restored
