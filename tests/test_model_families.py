"""Every common model family fine-tunes correctly at the user's image size (issue: model families).

In-process, CPU, random init, tiny images: groups partition the parameters, freezing holds, the
head and the layers above the frozen prefix learn, ViT-like models run at non-native sizes, weights
files load (position embeddings resampled), torchvision models preprocess as their weights did.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from PIL import Image
from timm.layers import resample_abs_pos_embed

from conftest import apply_overrides
from tltrain.core.checkpoint import CheckpointMeta, load_meta, load_model_state, load_train_state, save_checkpoint
from tltrain.core.loop import Resume, train
from tltrain.core.model import build_model, head_param_names, layer_groups
from tltrain.core.optim import apply_freeze, build_optimizer, set_frozen_norms_eval
from tltrain.data.loaders import build_eval_loader, build_train_loader, build_transform, resolve_data_config
from tltrain.execution.preflight import build_plan
from tltrain.spec import SpecError, parse_spec
from tltrain.spec.schema import ModelSpec, OptimSpec, StrategySpec
from tltrain.spec.search import validate_space

# (model.name, image size): the smallest variant of each family; ViT-like ones at a non-native size.
FAMILIES = [
    ("resnet18", 32),
    ("resnext26ts", 32),
    ("efficientnet_b0", 32),
    ("tf_efficientnet_lite0", 32),
    ("mobilenetv3_small_050", 32),
    ("regnetx_002", 32),
    ("convnext_atto", 32),
    ("vit_tiny_patch16_224", 48),
    ("deit_tiny_distilled_patch16_224", 48),
    ("swin_tiny_patch4_window7_224", 64),
    ("eva02_tiny_patch14_224", 56),
    ("cait_xxs24_224", 48),
    ("torchvision:resnet18", 32),
    ("torchvision:efficientnet_b0", 32),
    ("torchvision:efficientnet_v2_s", 32),
    ("torchvision:mobilenet_v3_small", 32),
    ("torchvision:convnext_tiny", 32),
    ("torchvision:vit_b_16", 32),
    ("torchvision:swin_t", 64),
    ("torchvision:regnet_y_400mf", 32),
]


@pytest.mark.parametrize(("name", "size"), FAMILIES, ids=[n for n, _ in FAMILIES])
def test_every_family_fine_tunes_with_frozen_prefix_and_layer_decay(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name=name), 4, image_size=size)
    groups = layer_groups(model)
    assert len(groups) >= 4 and groups[-1].name == "head"
    names = [n for g in groups for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()), "every parameter in exactly one group"
    assert set(groups[-1].param_names) == head_param_names(model)
    # Only the new classifier is the head (mobilenet_v3's 576->1024 Linear, convnext's LayerNorm are not).
    for p in groups[-1].param_names:
        assert model.get_parameter(p).shape[0] == 4 or model.get_parameter(p).ndim == 1 and p.endswith("bias")

    apply_freeze(model, groups, 1)
    optimizer = build_optimizer(
        model, groups, StrategySpec(freeze_depth=1, layer_decay=0.8, head_lr_mult=2.0), OptimSpec(lr=1e-2),
        torch.device("cpu"),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        model.train()
        set_frozen_norms_eval(model)
        out = model(x)
        torch.nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in groups[0].param_names), "the frozen group moved"
    assert all(not torch.equal(before[n], after[n]) for n in groups[-1].param_names if n.endswith("weight"))
    top = groups[-2].param_names
    assert any(not torch.equal(before[n], after[n]) for n in top), "the top backbone group did not learn"


def test_distilled_models_get_both_heads_replaced() -> None:
    model = build_model(ModelSpec(name="deit_tiny_distilled_patch16_224"), 3, image_size=32)
    assert model.head.out_features == 3 and model.head_dist.out_features == 3
    assert {"head.weight", "head_dist.weight"} <= set(layer_groups(model)[-1].param_names)


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


@pytest.mark.parametrize("name", ["test_resnet", "torchvision:resnet18"])
def test_weights_from_a_file_load_into_every_non_head_tensor(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_model(ModelSpec(name=name), 10).state_dict()
    torch.manual_seed(2)
    model = build_model(ModelSpec(name=name, weights="file"), 4, weights_file=_save(source, tmp_path / "w.pth"))
    head = head_param_names(model)
    state = model.state_dict()
    checked = [k for k in state if k not in head and not k.startswith(tuple(h.rsplit(".", 1)[0] for h in head))]
    assert checked and all(torch.equal(state[k], source[k]) for k in checked)


def test_vit_weights_trained_at_224_load_at_64_with_resampled_position_embeddings(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict()
    model = build_model(
        ModelSpec(name="vit_tiny_patch16_224", weights="file"), 4, _save(source, tmp_path / "vit.pth"), image_size=64
    )
    state = model.state_dict()
    expected = resample_abs_pos_embed(source["pos_embed"], new_size=[4, 4], num_prefix_tokens=1)
    assert state["pos_embed"].shape == (1, 17, 192) and torch.equal(state["pos_embed"], expected)
    head = head_param_names(model)
    others = [k for k in state if k != "pos_embed" and k not in head]
    assert others and all(torch.equal(state[k], source[k]) for k in others)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b3", "vit_b_16"])
def test_torchvision_models_preprocess_as_their_weights_were_trained(name: str) -> None:
    preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    config = resolve_data_config(torch.nn.Identity(), None, model_name=f"torchvision:{name}")
    assert config["input_size"] == [3, preset.crop_size[0], preset.crop_size[0]]
    assert config["mean"] == list(preset.mean) and config["std"] == list(preset.std)
    assert config["interpolation"] == preset.interpolation.value
    image = Image.fromarray(torch.randint(0, 256, (375, 500, 3), dtype=torch.uint8).numpy())
    ours, theirs = build_transform(config, train=False)(image), preset(image)
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5)


def _spec(train: str, val: str, tmp_path: Path, **overrides: object) -> object:
    tree: dict = {
        "name": "fam",
        "model": {"name": "test_resnet"},
        "data": {"train": train, "val": val, "image_size": 32, "loader_workers": 0},
        "loop": {"epochs": 2, "precision": "fp32"},
        "scaling": {"batch_size_per_worker": 8},
        "storage": {"uri": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }
    apply_overrides(tree, **overrides)
    return parse_spec(tree)


def test_batch_of_one_on_batchnorm_is_refused_before_ray(fashion_folders: tuple[str, str], tmp_path: Path) -> None:
    spec = _spec(*fashion_folders, tmp_path, scaling__batch_size_per_worker=1)
    with pytest.raises(SpecError, match=r"scaling\.batch_size_per_worker: 1 image per micro-batch.*BatchNorm"):
        build_plan(spec)
    # With every BatchNorm group frozen (feature extraction) one image per step is fine.
    build_plan(_spec(*fashion_folders, tmp_path, scaling__batch_size_per_worker=1, strategy__freeze_depth="all"))


def test_a_size_the_architecture_cannot_take_is_refused_naming_the_field(
    fashion_folders: tuple[str, str], tmp_path: Path
) -> None:
    spec = _spec(*fashion_folders, tmp_path, model__name="torchvision:vit_b_16", data__image_size=50)
    with pytest.raises(SpecError, match=r"data\.image_size: torchvision:vit_b_16 cannot be built for 50x50 \(.*patch"):
        build_plan(spec)


def test_validate_prints_the_groups_and_what_is_frozen(
    fashion_folders: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from tltrain.cli import main

    path = tmp_path / "spec.yaml"
    spec = _spec(*fashion_folders, tmp_path, strategy__freeze_depth=2, strategy__unfreeze={1: 0})
    path.write_text(yaml.safe_dump(spec.to_dict()))  # type: ignore[attr-defined]
    assert main(["validate", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [ln for ln in lines if "params" in ln]
    assert "stem" in rows[0] and "frozen (unfrozen from epoch 1)" in rows[0]
    assert "frozen (unfrozen from epoch 1)" in rows[1] and rows[2].rstrip().endswith("trained")
    assert "head" in rows[-1] and "new head" in rows[-1]


# ---- resume is exact --------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _run(spec, plan, out: Path, checkpoint_dir: Path | None = None, stop_after: int | None = None):  # noqa: ANN001, ANN202
    torch.manual_seed(spec.loop.seed)
    model = build_model(spec.model, len(plan.class_names), image_size=spec.data.image_size)
    resume = None
    if checkpoint_dir is not None:
        model.load_state_dict(load_model_state(checkpoint_dir))
        resume = Resume(train_state=load_train_state(checkpoint_dir), meta=load_meta(checkpoint_dir))
    config = plan.data_config
    train_loader = build_train_loader(plan.train, build_transform(config, True, spec.data), 8, 0, 1, spec.loop.seed, 0)
    val_loader = build_eval_loader(plan.val, build_transform(config, False), 8, 0, 1, 0)
    saved: dict[int, Path] = {}
    lrs: list[dict[str, float]] = []

    def report(metrics: dict, ckpt: str | None) -> None:
        lrs.append({k: v for k, v in metrics.items() if k.startswith("lr/")})
        if ckpt is not None:
            saved[metrics["epoch"]] = Path(shutil.copytree(ckpt, out / f"e{metrics['epoch']}"))
        if stop_after is not None and metrics["epoch"] == stop_after:
            raise _Stop  # the run dies right after its checkpoint is written

    groups = layer_groups(model)
    try:
        train(spec, model, groups, train_loader, val_loader, device=torch.device("cpu"),
              num_classes=len(plan.class_names), report=report, resume=resume)  # fmt: skip
    except _Stop:
        pass
    return model, saved, lrs


def test_kill_and_resume_equals_the_uninterrupted_run_bit_for_bit(
    fashion_folders: tuple[str, str], tmp_path: Path
) -> None:
    spec = _spec(
        *fashion_folders, tmp_path, model__drop_rate=0.5, data__augment="light", data__max_images_per_class=6,
        loop__epochs=3, loop__seed=3, strategy__freeze_depth=1,
    )  # fmt: skip
    plan = build_plan(spec)
    whole, _, _ = _run(spec, plan, tmp_path / "whole")
    _, saved, _ = _run(spec, plan, tmp_path / "killed", stop_after=1)
    resumed, _, _ = _run(spec, plan, tmp_path / "resumed", checkpoint_dir=saved[1])
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_extending_a_cosine_run_is_refused_with_the_command_to_continue(
    fashion_folders: tuple[str, str], tmp_path: Path
) -> None:
    spec = _spec(*fashion_folders, tmp_path, schedule__kind="cosine", loop__epochs=2)
    run = Path(spec.storage.uri) / spec.name / "checkpoint_2026-01-01_00-00-00.000000"  # type: ignore[attr-defined]
    save_checkpoint(run, {"w": torch.zeros(1)}, None, CheckpointMeta(spec=spec.to_dict(), epoch=2))  # type: ignore[attr-defined]
    build_plan(spec)  # same epochs: resumes (nothing to train)
    longer = spec.model_copy(update={"loop": spec.loop.model_copy(update={"epochs": 4})})  # type: ignore[attr-defined]
    with pytest.raises(
        SpecError,
        match=r"loop\.epochs: fam exists .*cosine.*--set name=fam-more --set model\.weights=\S+/model\.safetensors",
    ):
        build_plan(longer)


def test_extending_a_constant_run_keeps_the_lr(fashion_folders: tuple[str, str], tmp_path: Path) -> None:
    spec = _spec(*fashion_folders, tmp_path, schedule__kind="constant", loop__epochs=1, data__max_images_per_class=4)
    plan = build_plan(spec)
    _, saved, first = _run(spec, plan, tmp_path / "first")
    longer = spec.model_copy(update={"loop": spec.loop.model_copy(update={"epochs": 2})})
    _, _, resumed = _run(longer, plan, tmp_path / "longer", checkpoint_dir=saved[1])
    assert len(resumed) == 1 and resumed[0] == first[0]  # the resumed epoch's LRs are the first epoch's
    assert max(first[0].values()) == pytest.approx(spec.optim.lr)  # the head (top group) at the base LR


# ---- optimizer defaults, the validation split -------------------------------------------------


def test_per_optimizer_weight_decay_defaults_and_explicit_nesterov() -> None:
    model = build_model(ModelSpec(name="test_resnet"), 2)
    groups = layer_groups(model)
    for name, wd in (("adamw", 0.05), ("sgd", 1e-4)):
        opt = build_optimizer(model, groups, StrategySpec(), OptimSpec(name=name), torch.device("cpu"))
        assert max(g["weight_decay"] for g in opt.param_groups) == wd
    assert not build_optimizer(model, groups, StrategySpec(), OptimSpec(name="sgd"), torch.device("cpu")).defaults[
        "nesterov"
    ]
    sgd = OptimSpec(name="sgd", nesterov=True)
    assert build_optimizer(model, groups, StrategySpec(), sgd, torch.device("cpu")).defaults["nesterov"]
    with pytest.raises(ValueError, match="optim.nesterov"):
        OptimSpec(name="adamw", nesterov=True)


def test_the_val_split_follows_split_seed_not_loop_seed(fashion_folders: tuple[str, str], tmp_path: Path) -> None:
    base = _spec(fashion_folders[0], None, tmp_path, data__val_fraction=0.2)  # type: ignore[arg-type]
    reseeded = dataclasses.replace(
        build_plan(base.model_copy(update={"loop": base.loop.model_copy(update={"seed": 7})}))
    )  # type: ignore[attr-defined]
    assert build_plan(base).val == reseeded.val
    other = base.model_copy(update={"data": base.data.model_copy(update={"split_seed": 1})})  # type: ignore[attr-defined]
    assert build_plan(other).val != reseeded.val
    tuned = parse_spec({**base.to_dict(), "tune": {"space": {"data.split_seed": {"choice": [0, 1]}}}})  # type: ignore[attr-defined]
    with pytest.raises(SpecError, match=r"tune\.space\.data\.split_seed: cannot be searched.*val set"):
        validate_space(tuned, 5)
