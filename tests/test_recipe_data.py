"""The recipe's data side on CPU: the held-out test split never moves and never overlaps, the
orientation, crop and erasing knobs change the pixels as documented on both data paths, and the
balanced sampler draws classes equally often with the same batch count on every DDP rank."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tltrain.data import plan_dataset, resolve_data_config
from tltrain.data.device import build_augment, train_sampler
from tltrain.data.folder import DataError
from tltrain.data.loaders import BalancedEpochSampler, ImageListDataset, build_train_loader, build_transform
from tltrain.data.orientation import dihedral_batch, dihedral_view
from tltrain.spec import SpecError, parse_spec
from tltrain.spec.schema import DataSpec


def _folder(root: Path, counts: dict[str, int], size: int = 32) -> str:
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] += 160
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _folder(tmp_path_factory.mktemp("recipe-data"), {"a": 40, "b": 20, "c": 10})


def _names(samples: list) -> set[str]:
    return {Path(p).parent.name + "/" + Path(p).name for p, _ in samples}


# ---- the held-out test split ----------------------------------------------------------------------


def test_test_fraction_is_stratified_disjoint_and_moves_only_with_split_seed(folder: str) -> None:
    base = DataSpec(train=folder, val_fraction=0.2, test_fraction=0.2)
    plan = plan_dataset(base, seed=0)
    test, train, val = _names(plan.test), _names(plan.train), _names(plan.val)
    assert not test & train and not test & val and not train & val
    assert len(test) + len(train) + len(val) == 70  # every image in exactly one split
    assert Counter(y for _, y in plan.test) == {0: 8, 1: 4, 2: 2}  # round(n * 0.2) per class
    assert plan.test_root == plan.train_root
    # What a user changes or a sweep searches (val share, cap) never moves an image into or out of test.
    for other in (
        DataSpec(train=folder, val_fraction=0.35, test_fraction=0.2),
        DataSpec(train=folder, val_fraction=0.2, test_fraction=0.2, max_images_per_class=5),
    ):
        assert _names(plan_dataset(other, seed=0).test) == test
    assert _names(plan_dataset(base, seed=1).test) != test  # data.split_seed draws a new one
    assert _names(plan_dataset(base, seed=0).test) == test  # ...and the same seed the same one


def test_a_test_folder_must_have_the_train_classes_and_too_small_classes_are_refused(
    folder: str, tmp_path: Path
) -> None:
    other = _folder(tmp_path / "test", {"a": 2, "b": 2, "z": 2})
    with pytest.raises(DataError, match=r"data\.test .* missing in data\.test: \['c'\]; extra in data\.test: \['z'\]"):
        plan_dataset(DataSpec(train=folder, val_fraction=0.2, test=other), seed=0)
    good = _folder(tmp_path / "good", {"a": 2, "b": 3, "c": 1})
    plan = plan_dataset(DataSpec(train=folder, val_fraction=0.2, test=good), seed=0)
    assert len(plan.test) == 6 and plan.test_root == good and len(plan.train) + len(plan.val) == 70
    tiny = _folder(tmp_path / "tiny", {"a": 2, "b": 5})
    with pytest.raises(DataError, match=r"data\.test_fraction: class a .* 2 image"):
        plan_dataset(DataSpec(train=tiny, val_fraction=0.2, test_fraction=0.5), seed=0)
    with pytest.raises(SpecError, match=r"data\.test .* is also data\.train"):
        parse_spec({"name": "x", "model": {"name": "test_resnet"}, "data": {"train": folder, "test": folder}})


# ---- orientation, crops and erasing take effect ----------------------------------------------------


def test_the_dihedral_views_are_the_eight_distinct_symmetries_and_the_batch_form_agrees() -> None:
    image = torch.arange(3 * 5 * 5, dtype=torch.float32).view(3, 5, 5)  # no symmetry at all
    views = [dihedral_view(image, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    assert torch.equal(views[1], torch.rot90(image, 1, dims=(1, 2))) and torch.equal(views[4], image.flip(-1))
    batch = image.expand(16, 3, 5, 5).clone()
    ks = torch.tensor([k % 8 for k in range(16)])
    out = dihedral_batch(batch, ks)
    for i, k in enumerate(ks.tolist()):
        assert torch.equal(out[i], views[k])


def _asymmetric(size: int = 32) -> Image.Image:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[: size // 4, : size // 2] = 255  # a bar in the top-left: every symmetry moves it
    pixels[size // 2 :, size - 4 :, 1] = 200
    return Image.fromarray(pixels)


def test_orientation_dihedral_trains_on_all_eight_views_on_both_data_paths() -> None:
    config = resolve_data_config(timm.create_model("test_resnet"), 32)
    image = _asymmetric()
    centred = build_transform(config, False)(image)
    expected = [dihedral_view(centred, k) for k in range(8)]
    tf = build_transform(config, True, DataSpec(train="", augment="none", orientation="dihedral"))
    torch.manual_seed(0)
    draws = [tf(image) for _ in range(80)]
    seen = Counter(next(k for k, e in enumerate(expected) if torch.allclose(x, e)) for x in draws)
    assert set(seen) == set(range(8))
    natural = build_transform(config, True, DataSpec(train="", augment="none"))
    assert all(torch.equal(natural(image), centred) for _ in range(5))  # natural + none: no flips at all
    # The device path (shards): the same views of the same centre crop, one k per image.
    spec = parse_spec({
        "name": "d", "model": {"name": "test_resnet"},
        "data": {"train": "x", "val_fraction": 0.1, "format": "shards", "prepared": "x", "augment": "none",
                 "orientation": "dihedral"},
    })  # fmt: skip
    augment = build_augment(spec, config, True, torch.device("cpu"), seed=0, autocast=None)
    u8 = torch.from_numpy(np.asarray(image)).expand(64, 32, 32, 3).contiguous()
    out = augment.squares(u8)
    eval_out = build_augment(spec, config, False, torch.device("cpu"), seed=0, autocast=None).squares(u8)
    assert all(torch.equal(x, eval_out[0]) for x in eval_out)  # eval is never turned
    kinds = {next(k for k in range(8) if torch.allclose(x, dihedral_view(eval_out[0], k), atol=1e-5)) for x in out}
    assert kinds == set(range(8))


def test_crop_scale_bounds_the_crop_area_and_random_erasing_erases() -> None:
    config = resolve_data_config(timm.create_model("test_resnet"), 32)
    half = np.zeros((64, 64, 3), dtype=np.uint8)
    half[:, 32:] = 255  # left half black, right half white
    image = Image.fromarray(half)

    def white_shares(data: DataSpec) -> list[float]:
        tf = build_transform(config, True, data)
        torch.manual_seed(0)
        return [float((tf(image)[0] > 0).float().mean()) for _ in range(40)]

    whole = white_shares(DataSpec(train="", crop_scale=(1.0, 1.0)))
    assert all(0.35 < s < 0.65 for s in whole)  # always both halves (mirrored or not)
    small = white_shares(DataSpec(train="", crop_scale=(0.02, 0.05)))
    assert sum(s in (0.0, 1.0) for s in small) >= 20  # a tiny crop mostly sees one half only
    plain = build_transform(config, True, DataSpec(train="", crop_scale=(1.0, 1.0)))
    erasing = build_transform(config, True, DataSpec(train="", crop_scale=(1.0, 1.0), random_erasing=1.0))
    for seed in range(8):  # the same seed gives the same crop, then erasing draws its box
        torch.manual_seed(seed)
        a = plain(image)
        torch.manual_seed(seed)
        touched = float((a != erasing(image)).any(dim=0).float().mean())
        assert 0.01 < touched < 0.5, touched  # a box (timm: 2-33 % of the area), not the whole image


def test_trivialaugment_changes_pixels_beyond_the_light_crops() -> None:
    config = resolve_data_config(timm.create_model("test_resnet"), 32)
    image = _asymmetric(64)
    light = build_transform(config, True, DataSpec(train=""))
    trivial = build_transform(config, True, DataSpec(train="", augment="trivialaugment", crop_scale=(0.5, 1.0)))
    # Same crops (same seed, the op draws after the crop), different pixels for most images.
    differ = 0
    for seed in range(20):
        torch.manual_seed(seed)
        a = light(image)
        torch.manual_seed(seed)
        differ += int(not torch.allclose(a, trivial(image)))
    assert differ >= 10


# ---- the balanced sampler ------------------------------------------------------------------------


def test_balanced_sampler_draws_classes_equally_with_equal_batches_per_rank() -> None:
    labels = [0] * 180 + [1] * 15 + [2] * 5
    ranks = [BalancedEpochSampler(labels, 2, r, seed=3) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    keys = [list(s) for s in ranks]
    assert [len(k) for k in keys] == [100, 100] == [len(s) for s in ranks]  # shuffle's per-rank count
    drawn = [labels[i] for k in keys for _, i, _ in k]
    counts = Counter(drawn)
    assert all(50 <= counts[c] <= 85 for c in range(3)), counts  # ~ 200/3 each, not 180/15/5
    positions = [pos for k in keys for _, _, pos in k]
    assert sorted(positions) == list(range(200))  # every draw its own augmentation seed
    again = BalancedEpochSampler(labels, 2, 0, seed=3)
    again.set_epoch(1)
    assert list(again) == keys[0]  # a resumed run draws the same
    again.set_epoch(2)
    assert list(again) != keys[0]
    # The device paths get plain indices with the same rule and the same batch count.
    sampler, batches = train_sampler(len(labels), 8, 1, 2, 3, balanced_labels=labels)
    sampler.set_epoch(1)  # type: ignore[attr-defined]
    assert [i for _, i, _ in keys[1]] == list(sampler) and len(batches) == 100 // 8


def test_balanced_loader_feeds_the_rare_class_as_often_as_the_common_one(tmp_path: Path) -> None:
    root = _folder(tmp_path / "skewed", {"common": 30, "rare": 3}, size=16)
    plan = plan_dataset(DataSpec(train=root, val_fraction=0.1), seed=0)
    tf = build_transform(resolve_data_config(timm.create_model("test_resnet"), 16), True, DataSpec(train=root))
    loader = build_train_loader(plan.train, tf, 4, 0, 1, seed=0, workers=0, sampler="balanced")
    counts: Counter[int] = Counter()
    for epoch in range(4):
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        for _, y in loader:
            counts.update(y.tolist())
    assert counts[1] >= 0.35 * sum(counts.values())  # 3 of 30 images, about half the draws
    # An image drawn twice in one epoch gets two different crops (one seed per draw).
    dataset = ImageListDataset(plan.train, tf, seed=0)
    assert not torch.equal(dataset[(0, 0, 0)][0], dataset[(0, 0, 1)][0])
