"""data: folder scan errors a user meets, the train/val plan, decoding, transforms, loaders."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tltrain import storage
from tltrain.data.decode import load_rgb
from tltrain.data.folder import DataError, plan_dataset, scan_image_folder
from tltrain.data.loaders import build_eval_loader, build_train_loader, build_transform, resolve_data_config
from tltrain.data.packaged import FASHION_MNIST_CLASSES, materialize_fashion_mnist
from tltrain.spec.schema import DataSpec, SpecError


def _folder(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (size, size), (i * 10 % 256, 0, 0)).save(root / name / f"{i:03d}.png")
    return root


def test_missing_root_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.train.*nowhere"):
        scan_image_folder(str(tmp_path / "nowhere"), field_name="data.train")
    with pytest.raises(DataError, match=r"data\.val"):
        plan_dataset(DataSpec(train=str(_folder(tmp_path / "t", {"a": 2})), val=str(tmp_path / "v")), seed=0)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"cat": 2})
    (root / "dog").mkdir()
    with pytest.raises(DataError, match=r"dog.*remove it or add images"):
        scan_image_folder(str(root))


def test_corrupt_image_error_or_skip(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"cat": 3, "dog": 3})
    bad = root / "dog" / "broken.png"
    bad.write_bytes((root / "dog" / "000.png").read_bytes()[:40])  # a truncated upload
    with pytest.raises(DataError, match=r"broken\.png.*on_bad_image: skip"):
        scan_image_folder(str(root), "error")
    idx = scan_image_folder(str(root), "skip")
    assert len(idx.samples) == 6
    assert [p for p, _ in idx.skipped] == [str(bad)]


def test_hidden_files_ignored_and_non_images_counted(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"cat": 2, "dog": 2})
    (root / ".DS_Store").write_bytes(b"\0junk")
    (root / "cat" / "._000.png").write_bytes(b"macos resource fork")
    (root / ".hidden_class").mkdir()
    (root / "dog" / "notes.txt").write_text("not an image")
    idx = scan_image_folder(str(root))
    assert idx.class_names == ["cat", "dog"]
    assert len(idx.samples) == 4
    assert [(Path(p).name, reason) for p, reason in idx.skipped] == [("notes.txt", "not an image file extension")]


def test_val_class_mismatch_names_classes(tmp_path: Path) -> None:
    train = _folder(tmp_path / "train", {"cat": 2, "dog": 2, "owl": 2})
    val = _folder(tmp_path / "val", {"cat": 1, "dog": 1, "emu": 1})
    with pytest.raises(DataError) as err:
        plan_dataset(DataSpec(train=str(train), val=str(val)), seed=0)
    msg = str(err.value)
    assert "data.val" in msg and "data.train" in msg and "owl" in msg and "emu" in msg


def test_val_fraction_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 20, "b": 10, "c": 2})
    spec = DataSpec(train=str(root), val_fraction=0.25)
    p1, p2, p3 = plan_dataset(spec, seed=0), plan_dataset(spec, seed=0), plan_dataset(spec, seed=1)
    assert (p1.train, p1.val) == (p2.train, p2.val)
    assert p1.val != p3.val
    assert not set(p1.train) & set(p1.val)
    assert len(p1.train) + len(p1.val) == 32
    per_class_val = np.bincount([lbl for _, lbl in p1.val], minlength=3).tolist()
    assert per_class_val == [5, 2, 1]  # round(n * 0.25), at least 1, and each class keeps a train image
    assert p1.fingerprint == p3.fingerprint and p1.fingerprint["num_files"] == 32


def test_max_images_per_class_caps_train_only(fashion_folders: tuple[str, str]) -> None:
    train, val = fashion_folders
    plan = plan_dataset(DataSpec(train=train, val=val, max_images_per_class=5), seed=0)
    assert plan.class_names == sorted(FASHION_MNIST_CLASSES)
    assert np.bincount([lbl for _, lbl in plan.train]).tolist() == [5] * 10
    assert len(plan.val) == 100


def test_load_rgb_converts_modes(tmp_path: Path) -> None:
    grey = Image.fromarray(np.full((4, 4), 100, np.uint8), "L")
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    i16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))  # full 16-bit scale -> 255
    pal = Image.new("RGB", (4, 4), (0, 128, 255)).convert("P")
    cases = {"l.png": (grey, (100, 100, 100)), "rgba.png": (rgba, (255, 255, 255)), "i16.png": (i16, (255, 255, 255))}
    cases["p.png"] = (pal, pal.convert("RGB").getpixel((0, 0)))
    for name, (im, expected) in cases.items():
        im.save(tmp_path / name)
        out = load_rgb(str(tmp_path / name))
        assert out.mode == "RGB" and out.size == (4, 4), name
        assert out.getpixel((1, 1)) == expected, name
    half = Image.fromarray(np.full((2, 2), 32896, np.uint16))  # 128 * 257
    half.save(tmp_path / "half.png")
    assert load_rgb(str(tmp_path / "half.png")).getpixel((0, 0)) == (128, 128, 128)


def test_train_transform_output_shape(fashion_folders: tuple[str, str]) -> None:
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    cfg = resolve_data_config(model, image_size=64)
    assert cfg["input_size"] == [3, 64, 64] and "crop_pct" in cfg and "mean" in cfg
    img = load_rgb(sorted(Path(fashion_folders[0]).rglob("*.png"))[0])  # 28x28 grey
    for augment in ("none", "light", "randaugment", "trivialaugment"):
        assert build_transform(cfg, train=True, data=DataSpec(train="", augment=augment))(img).shape == (3, 64, 64)
    assert build_transform(cfg, train=False)(img).shape == (3, 64, 64)


def test_eval_loader_shards_cover_val_exactly_once() -> None:
    samples = [(f"img{i}", i) for i in range(11)]
    seen: list[int] = []
    for rank in range(2):
        loader = build_eval_loader(samples, lambda im: 0, batch_size=4, rank=rank, world_size=2, workers=0)
        seen += [s[1] for s in loader.dataset.samples]
        assert len(loader.dataset) == (6 if rank == 0 else 5)
    assert sorted(seen) == list(range(11))


def test_train_loader_seeded_epochs_and_shards(fashion_folders: tuple[str, str]) -> None:
    plan = plan_dataset(DataSpec(train=fashion_folders[0], val=fashion_folders[1]), seed=0)
    tf = build_transform(resolve_data_config(timm.create_model("test_resnet"), 32), train=True)

    def epoch_labels(rank: int, world: int, epoch: int) -> list[int]:
        loader = build_train_loader(plan.train, tf, 16, rank, world, seed=0, workers=0)
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert all(x.shape == (16, 3, 32, 32) for x, _ in batches)  # drop_last: full batches only
        return torch.cat([y for _, y in batches]).tolist()

    assert epoch_labels(0, 1, 0) == epoch_labels(0, 1, 0)  # reproducible
    assert epoch_labels(0, 1, 0) != epoch_labels(0, 1, 1)  # set_epoch reshuffles
    assert len(epoch_labels(0, 2, 0)) == len(epoch_labels(1, 2, 0)) == 144  # 150 per rank -> 9 batches
    with pytest.raises(SpecError, match="batch_size_per_worker"):
        build_train_loader(plan.train[:10], tf, 16, 0, 1, seed=0, workers=0)


def test_s3_dataset_scans_through_cache(s3_bucket: str, tmp_path: Path) -> None:
    train, val = materialize_fashion_mnist(str(tmp_path / "src"), train_per_class=6, val_per_class=2)
    storage.upload_tree(train, f"{s3_bucket}/fashion/train")
    storage.upload_tree(val, f"{s3_bucket}/fashion/val")
    spec = DataSpec(
        train=f"{s3_bucket}/fashion/train", val=f"{s3_bucket}/fashion/val", cache_dir=str(tmp_path / "cache")
    )
    plan = plan_dataset(spec, seed=0, localize=storage.localizer(spec.cache_dir))
    assert len(plan.train) == 60 and len(plan.val) == 20
    assert all(p.startswith(str(tmp_path / "cache")) for p, _ in plan.train + plan.val)
    # the same data gives the same fingerprint wherever it lives
    assert plan.fingerprint == plan_dataset(DataSpec(train=train, val=val), seed=0).fingerprint
    with pytest.raises(DataError, match=r"data\.train.*does not exist"):
        plan_dataset(
            spec.model_copy(update={"train": f"{s3_bucket}/nothing"}),
            seed=0,
            localize=storage.localizer(spec.cache_dir),
        )


def test_packaged_fashion_mnist_is_idempotent(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    train, val = materialize_fashion_mnist(str(tmp_path), train_per_class=3, val_per_class=2)
    assert time.perf_counter() - t0 < 10
    assert sorted(p.name for p in Path(train).iterdir()) == sorted(FASHION_MNIST_CLASSES)
    assert len(list(Path(val).rglob("*.png"))) == 20
    first = sorted(Path(train).rglob("*.png"))
    mtime = first[0].stat().st_mtime_ns
    assert materialize_fashion_mnist(str(tmp_path), train_per_class=3, val_per_class=2) == (train, val)
    assert first[0].stat().st_mtime_ns == mtime  # complete already: not rewritten
    materialize_fashion_mnist(str(tmp_path), train_per_class=4, val_per_class=2)  # other size: rebuilt
    assert len(list(Path(train).rglob("*.png"))) == 40
