"""The fine-tuning recipe on CPU without Ray: each knob provably takes effect, the scores equal
scikit-learn's, resume stays exact with EMA and mixup on, and bad combinations are refused up front."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight

from conftest import apply_overrides
from tltrain.core.checkpoint import load_meta, load_train_state, load_twins
from tltrain.core.loop import Resume, train
from tltrain.core.model import build_model, drop_path_rates, layer_groups
from tltrain.core.steps import build_loss, build_mixup, evaluate
from tltrain.core.tta import tta_log_probs
from tltrain.data.loaders import build_eval_loader, build_train_loader, build_transform
from tltrain.data.orientation import tta_views
from tltrain.execution.preflight import build_plan
from tltrain.spec import SpecError, parse_spec
from tltrain.spec.metrics import EXPORTED, Twin
from tltrain.spec.rungs import FINETUNE, PROBE, RECIPE, RUNGS, SCRATCH, rung_specs
from tltrain.spec.search import validate_space
from tltrain.tracking.pyfunc_model import ImageClassifier


def _tree(train: str, tmp_path: Path, **overrides: object) -> dict:
    tree: dict = {
        "name": "recipe",
        "model": {"name": "test_vit"},
        "data": {"train": train, "val_fraction": 0.25, "image_size": 32, "loader_workers": 0, "augment": "none"},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0},
        "schedule": {"kind": "constant"},
        "loop": {"epochs": 1, "precision": "fp32"},
        "scaling": {"batch_size_per_worker": 4},
        "storage": {"uri": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }
    apply_overrides(tree, **overrides)
    return tree


def _spec(train: str, tmp_path: Path, **overrides: object):  # noqa: ANN202
    return parse_spec(_tree(train, tmp_path, **overrides))


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An ImageFolder with 3 classes of 18 / 6 / 4 images, distinguishable by colour."""
    root = tmp_path_factory.mktemp("imbalanced")
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate((("a", 18), ("b", 6), ("c", 4))):
        (root / name).mkdir()
        for i in range(n):
            pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            pixels[..., c] += 160
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return str(root)


# ---- each knob takes effect ---------------------------------------------------------------------


def _batches(n: int, seed: int, classes: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, classes, (4,), generator=g)) for _ in range(n)]


def _fit(spec, batches, val, checkpoints: list | None = None, tmp: Path | None = None):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=3, img_size=32)

    def report(metrics: dict, ckpt: str | None) -> None:
        if ckpt is not None and checkpoints is not None and tmp is not None:
            checkpoints.append((metrics, Path(shutil.copytree(ckpt, tmp / f"ckpt{len(checkpoints)}"))))

    train(spec, model, layer_groups(model), batches, val, device=torch.device("cpu"), num_classes=3, report=report)
    return model


def test_ema_weights_are_the_closed_form_average_and_the_export_follows_the_metric(
    imbalanced: str, tmp_path: Path
) -> None:
    decay, steps = 0.6, 3
    batches, val = _batches(steps, 1), _batches(2, 2)
    # The raw weights after k steps: the same run cut after k steps (constant LR, no EMA in the way).
    torch.manual_seed(0)  # the initial weights, as _fit builds them
    raw = [{k: v.clone() for k, v in timm.create_model("test_vit", num_classes=3, img_size=32).state_dict().items()}]
    for k in range(1, steps + 1):
        cut = _spec(imbalanced, tmp_path, loop__max_steps_per_epoch=k)
        raw.append({n: v.clone() for n, v in _fit(cut, batches[:k], val).state_dict().items()})

    saved: list = []
    spec = _spec(imbalanced, tmp_path, loop__ema_decay=decay)
    _fit(spec, batches, val, saved, tmp_path)
    ((metrics, ckpt),) = saved
    raw_state, ema_state = load_twins(ckpt, load_meta(ckpt))
    assert ema_state is not None
    for name, value in ema_state.items():
        expected = decay**steps * raw[0][name] + sum(
            (1 - decay) * decay ** (steps - k) * raw[k][name] for k in range(1, steps + 1)
        )
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(raw_state[name], raw[steps][name], msg=name)
    # The exported twin is the one val/acc (storage.metric) prefers; ties keep the raw weights.
    ema_better = metrics["val_ema/acc"] > metrics["val_raw/acc"]
    assert metrics[EXPORTED] == load_meta(ckpt).exported_weights == (Twin.EMA if ema_better else Twin.RAW)
    assert metrics["val/acc"] == max(metrics["val_ema/acc"], metrics["val_raw/acc"])


def test_mixed_batches_carry_soft_targets_with_smoothing() -> None:
    lp = parse_spec(_tree("unused", Path("/tmp"), loop__mixup_alpha=0.4, loop__label_smoothing=0.1)).loop
    mixup = build_mixup(lp, num_classes=5)
    assert mixup is not None
    np.random.seed(3)
    x = torch.randn(6, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, target = mixup(x.clone(), y)
    assert target.shape == (6, 5)
    torch.testing.assert_close(target.sum(1), torch.ones(6))
    # Each image is lam x itself + (1 - lam) x its partner in the reversed batch, and so is its target.
    # Image 1 (class 1) pairs with image 4 (class 4): its class-1 target is lam x (0.9 + 0.02) + (1 - lam) x 0.02.
    lam = float(target[1, 1] - 0.1 / 5) / (1 - 0.1)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0), rtol=1e-5, atol=1e-5)
    assert 0 < lam < 1 and int((target[1] > 0.1 / 5 + 1e-6).sum()) == 2


def test_balanced_class_weights_are_sklearns_from_the_train_split(imbalanced: str, tmp_path: Path) -> None:
    plan = build_plan(_spec(imbalanced, tmp_path, loop__class_weights="balanced"))
    labels = np.array([y for _, y in plan.train])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert plan.class_weights == pytest.approx(list(expected))
    named = build_plan(_spec(imbalanced, tmp_path, loop__class_weights={"c": 3.0}))
    assert named.class_weights == [1.0, 1.0, 3.0]
    # The loss weighs each image by its class: a weighted mean, as cross_entropy(weight=) does.
    logits, target = torch.randn(5, 3), torch.tensor([0, 2, 2, 1, 0])
    loss = build_loss(_spec(imbalanced, tmp_path).loop, [1.0, 1.0, 3.0], torch.device("cpu"))
    w = torch.tensor([1.0, 3.0, 3.0, 1.0, 1.0])
    per_image = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(loss(logits, target), (w * per_image).sum() / w.sum())
    # Soft targets (mixup) that are one-hot give the same number.
    torch.testing.assert_close(loss(logits, torch.eye(3)[target]), loss(logits, target))


def test_drop_path_is_set_on_the_blocks_and_refused_where_there_is_none(imbalanced: str, tmp_path: Path) -> None:
    spec = _spec(imbalanced, tmp_path, model__name="resnet18", model__drop_path_rate=0.2)
    rates = drop_path_rates(build_model(spec.model, 3, image_size=32))
    assert rates and max(rates) == pytest.approx(0.2)
    assert not any(drop_path_rates(build_model(_spec(imbalanced, tmp_path, model__name="resnet18").model, 3)))
    with pytest.raises(SpecError, match=r"model\.drop_path_rate: torchvision:resnet18 does not support"):
        build_plan(_spec(imbalanced, tmp_path, model__name="torchvision:resnet18", model__drop_path_rate=0.1))


def test_tta_averages_the_probabilities_of_the_views() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=4, img_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for mode, n in (("flip", 2), ("dihedral", 8)):
            views = tta_views(x, mode)
            assert len(views) == n and torch.equal(views[0], x)
            probs = torch.stack([model(v).softmax(-1) for v in views]).mean(0)
            got = tta_log_probs(model, x, lambda b, m=mode: tta_views(b, m)).exp()
            torch.testing.assert_close(got, probs, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tta_views(x, "flip")[1], torch.flip(x, dims=[3]))
        # The registered pyfunc (which cannot import tltrain) averages over the same views.
        served = ImageClassifier()
        served.model = model
        for mode in ("none", "flip", "dihedral"):
            served.tta = mode
            expected = tta_log_probs(model, x, lambda b, m=mode: tta_views(b, m)).exp()
            torch.testing.assert_close(served._probs(x), expected, rtol=1e-5, atol=1e-6)


def test_scores_equal_sklearn_and_top5_a_direct_count() -> None:
    torch.manual_seed(0)
    classes = 7
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, classes))
    images, labels = torch.randn(50, 3, 4, 4), torch.randint(0, classes, (50,))
    loader = [(images[i : i + 16], labels[i : i + 16]) for i in range(0, 50, 16)]
    out = evaluate(model, loader, torch.device("cpu"), classes, "fp32", False)
    with torch.no_grad():
        logits = model(images)
    preds = logits.argmax(1).numpy()
    assert out["val/f1_macro"] == pytest.approx(f1_score(labels.numpy(), preds, average="macro"))
    assert out["val/balanced_acc"] == pytest.approx(balanced_accuracy_score(labels.numpy(), preds))
    top5 = sum(int(labels[i]) in logits[i].topk(5).indices.tolist() for i in range(50)) / 50
    assert out["val/top5"] == pytest.approx(top5)
    three = evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3)), [(images, labels % 3)],
                     torch.device("cpu"), 3, "fp32", False)  # fmt: skip
    assert "val/top5" not in three  # fewer than 5 classes: no top-5


# ---- resume stays exact with EMA and mixup --------------------------------------------------------


class _Stop(Exception):
    pass


def _run_folder(spec, plan, out: Path, checkpoint_dir: Path | None = None, stop_after: int | None = None):  # noqa: ANN001, ANN202
    torch.manual_seed(spec.loop.seed)
    model = build_model(spec.model, len(plan.class_names), image_size=spec.data.image_size)
    resume = None
    if checkpoint_dir is not None:
        meta = load_meta(checkpoint_dir)
        raw, ema = load_twins(checkpoint_dir, meta)
        model.load_state_dict(raw)
        resume = Resume(train_state=load_train_state(checkpoint_dir), meta=meta, ema_state=ema)
    train_loader = build_train_loader(plan.train, build_transform(plan.data_config, True, spec.data), 4, 0, 1,
                                      spec.loop.seed, 0)  # fmt: skip
    val_loader = build_eval_loader(plan.val, build_transform(plan.data_config, False), 4, 0, 1, 0)
    saved: dict[int, Path] = {}

    def report(metrics: dict, ckpt: str | None) -> None:
        if ckpt is not None:
            saved[metrics["epoch"]] = Path(shutil.copytree(ckpt, out / f"e{metrics['epoch']}"))
        if stop_after is not None and metrics["epoch"] == stop_after:
            raise _Stop

    try:
        train(spec, model, layer_groups(model), train_loader, val_loader, device=torch.device("cpu"),
              num_classes=len(plan.class_names), report=report, resume=resume)  # fmt: skip
    except _Stop:
        pass
    return saved


def test_kill_and_resume_with_ema_and_mixup_equals_the_uninterrupted_run(imbalanced: str, tmp_path: Path) -> None:
    spec = _spec(
        imbalanced, tmp_path, loop__epochs=3, loop__ema_decay=0.7, loop__mixup_alpha=0.4, loop__cutmix_alpha=1.0,
        loop__seed=2, data__augment="light", loop__class_weights="balanced",
    )  # fmt: skip
    plan = build_plan(spec)
    whole = _run_folder(spec, plan, tmp_path / "whole")
    killed = _run_folder(spec, plan, tmp_path / "killed", stop_after=1)
    resumed = _run_folder(spec, plan, tmp_path / "resumed", checkpoint_dir=killed[1])
    for name in ("model.safetensors", "ema.safetensors", "raw.safetensors"):
        a, b = whole[3] / name, resumed[3] / name
        assert a.is_file() == b.is_file()
    ra, ea = load_twins(whole[3], load_meta(whole[3]))
    rb, eb = load_twins(resumed[3], load_meta(resumed[3]))
    assert ea is not None and eb is not None
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


# ---- the test split ranks nothing; compare's rungs ------------------------------------------------


def test_test_split_keys_cannot_be_searched(imbalanced: str, tmp_path: Path) -> None:
    for key, dist in (("data.test_fraction", {"choice": [0.2, 0.3]}), ("data.tta", {"choice": ["none", "flip"]})):
        spec = _spec(imbalanced, tmp_path, data__test_fraction=0.2, tune={"num_samples": 2, "space": {key: dist}})
        with pytest.raises(SpecError, match=rf"tune\.space\.{key}: cannot be searched"):
            validate_space(spec, 3)
    recipe = _spec(imbalanced, tmp_path, tune={"num_samples": 2, "space": {
        "loop.ema_decay": {"choice": [None, 0.9]}, "loop.mixup_alpha": {"uniform": [0.0, 0.4]},
        "data.orientation": {"choice": ["natural", "dihedral"]}, "loop.class_weights": {"choice": [None, "balanced"]},
    }})  # fmt: skip
    assert set(validate_space(recipe, 3)) >= {"loop.ema_decay", "loop.mixup_alpha", "loop.class_weights"}


def test_compare_rungs_share_data_and_budget_and_differ_in_transfer(imbalanced: str, tmp_path: Path) -> None:
    spec = _spec(
        imbalanced, tmp_path, model__weights="hub", data__test_fraction=0.2, loop__ema_decay=0.9,
        strategy__freeze_depth=1, strategy__layer_decay=0.7, tracking__registry_name="m",
    )  # fmt: skip
    rungs = rung_specs(spec)
    assert list(rungs) == list(RUNGS)
    for s in rungs.values():
        assert s.data.train == spec.data.train and s.data.test_fraction == 0.2 and s.loop.epochs == spec.loop.epochs
        assert s.optim == spec.optim and s.scaling == spec.scaling
    assert rungs[SCRATCH].model.weights is None and rungs[SCRATCH].loop.ema_decay is None
    assert rungs[PROBE].strategy.freeze_depth == "all" and rungs[FINETUNE].strategy.freeze_depth == 0
    assert rungs[FINETUNE].strategy.layer_decay is None and rungs[FINETUNE].strategy.head_lr_mult == 10
    assert rungs[RECIPE].loop.ema_decay == 0.9 and rungs[RECIPE].strategy.layer_decay == 0.7
    assert [s.tracking.registry_name for s in rungs.values()] == [None, None, None, "m"]
    assert len({s.name for s in rungs.values()}) == 4


# ---- refused before Ray, naming the field ----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loop__mixup_alpha": 0.2, "scaling__batch_size_per_worker": 3}, r"scaling\.batch_size_per_worker"),
        ({"loop__cutmix_alpha": 1.0, "scaling__batch_size_per_worker": 1}, r"even scaling\.batch_size_per_worker"),
        ({"data__tta": "dihedral"}, r"data\.tta dihedral .* data\.orientation dihedral"),
        ({"data__test": "x", "data__test_fraction": 0.2}, r"data\.test or data\.test_fraction"),
        ({"loop__class_weights": {"nope": 2.0}}, r"loop\.class_weights: \['nope'\] are not classes"),
        ({"storage__metric": "val/top5"}, r"storage\.metric: val/top5 needs at least 5 classes"),
        ({"data__crop_scale": [0.9, 0.5]}, r"data\.crop_scale"),
        ({"data__format": "shards", "data__prepared": "x", "data__random_erasing": 0.25}, r"data\.random_erasing"),
    ],
)
def test_bad_combinations_are_refused_naming_the_field(
    imbalanced: str, tmp_path: Path, overrides: dict, message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        build_plan(_spec(imbalanced, tmp_path, **overrides))
