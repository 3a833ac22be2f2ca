"""Messy image folders, as users really have them: every file is converted, skipped with a counted
warning, or rejected up front with a message naming it; nothing reaches a loader worker that it
cannot decode (and a file damaged after the check is replaced, not a crash)."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tltrain.data.decode import load_rgb
from tltrain.data.folder import DataError, plan_dataset, scan_image_folder
from tltrain.data.loaders import ImageListDataset, build_eval_loader, build_train_loader, build_transform
from tltrain.spec.schema import DataSpec

DATA_CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    arr = np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], -1) + rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A structurally valid PNG that claims width x height pixels (no pixel data needed to open it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _good_images(d: Path) -> list[str]:
    """One of every kind of image that must be converted to RGB and trained on."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    _photo(64, 48).save(d / "rgb.jpg")
    _photo(40, 30).convert("L").save(d / "grey.jpg")
    _photo(40, 30).convert("CMYK").save(d / "cmyk.jpg")
    _photo(50, 50).save(d / "UPPER.JPG")
    Image.new("RGBA", (30, 30), (255, 0, 0, 100)).save(d / "rgba.png")
    Image.new("LA", (20, 20), (90, 128)).save(d / "la.png")
    Image.fromarray((rng.random((30, 40)) * 65535).astype(np.uint16)).save(d / "grey16.png")
    Image.new("1", (16, 16), 1).save(d / "bilevel.png")
    Image.new("P", (20, 20), 3).save(d / "palette_transparent.png", transparency=0)
    Image.fromarray(rng.random((30, 40)).astype(np.float32), "F").save(d / "float.tif")
    Image.new("RGBA", (24, 24), (0, 0, 255, 128)).save(d / "alpha.webp")
    frames = [Image.new("P", (20, 20), i) for i in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1), (10, 20, 30)).save(d / "one_pixel.png")
    Image.new("RGB", (3000, 2), (10, 20, 30)).save(d / "very_wide.png")
    Image.new("RGB", (2, 3000), (10, 20, 30)).save(d / "very_tall.bmp")
    _photo(3000, 2000).save(d / "large.jpg")
    (d / "nested" / "deeper").mkdir(parents=True)
    _photo(32, 32, 2).save(d / "nested" / "deeper" / "in_subfolder.png")
    return sorted(str(p) for p in d.rglob("*") if p.is_file())


def _messy_tree(root: Path) -> dict[str, list[str]]:
    """A train folder with good images in every mode and size, broken files, non-images and
    hidden files. Returns the paths by what must happen to them."""
    good = _good_images(root / "cat")
    for name, seed in (("dog", 3), ("owl", 4)):
        (root / name).mkdir(parents=True)
        for i in range(6):
            _photo(48, 40, seed * 10 + i).save(root / name / f"{i}.jpg")
        good += sorted(str(p) for p in (root / name).iterdir())
    full_jpeg = _jpeg_bytes(_photo(120, 90, 5))
    full_png = (root / "cat" / "rgba.png").read_bytes()
    broken = {
        # Cut off mid-upload: PIL's verify() passes it; only decoding notices.
        "dog/truncated.jpg": full_jpeg[: len(full_jpeg) * 2 // 3],
        "dog/truncated.png": full_png[: len(full_png) // 2],
        "dog/empty.png": b"",
        "owl/actually_text.jpg": b"this is not a jpeg\n",
        "owl/error_page.png": b"<html><body>403 Forbidden</body></html>",
        "owl/bomb.png": _png_header_only(100_000, 100_000),  # decompression bomb: 10^10 pixels
    }
    for rel, data in broken.items():
        (root / rel).write_bytes(data)
    not_images = {"cat/notes.txt": b"labels by hand", "dog/labels.csv": b"a,b\n", "owl/photo.heic": b"\0\0\0 ftypheic"}
    for rel, data in not_images.items():
        (root / rel).write_bytes(data)
    (root / "README.md").write_text("my dataset")
    hidden = [
        root / ".DS_Store",
        root / "cat" / ".DS_Store",
        root / "dog" / "._0.jpg",
        root / ".ipynb_checkpoints" / "x.png",
        root / ".trash" / "cat" / "old.jpg",
        root / "owl" / ".hidden_dir" / "y.jpg",
    ]
    for p in hidden:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0\0junk")
    return {
        "good": good,
        "broken": [str(root / rel) for rel in broken],
        "not_images": [str(root / rel) for rel in not_images] + [str(root / "README.md")],
        "hidden": [str(p) for p in hidden],
    }


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("messy") / "train"
    return root, _messy_tree(root)


def test_skip_mode_keeps_every_good_image_and_counts_the_rest(messy: tuple[Path, dict[str, list[str]]]) -> None:
    root, kinds = messy
    idx = scan_image_folder(str(root), "skip")
    assert idx.class_names == ["cat", "dog", "owl"]  # hidden folders are not classes
    assert sorted(p for p, _ in idx.samples) == sorted(kinds["good"])
    reasons = dict(idx.skipped)
    assert sorted(reasons) == sorted(kinds["broken"] + kinds["not_images"])
    for path in kinds["broken"]:
        assert reasons[path].startswith("unreadable image ("), (path, reasons[path])
    assert "DecompressionBombError" in reasons[str(root / "owl" / "bomb.png")]
    assert "truncated" in reasons[str(root / "dog" / "truncated.jpg")]
    for path in kinds["not_images"][:-1]:
        assert reasons[path] == "not an image file extension"
    assert reasons[str(root / "README.md")] == "file outside a class folder"
    assert not set(kinds["hidden"]) & (set(reasons) | {p for p, _ in idx.samples})  # hidden: ignored, not counted


def test_a_truncated_jpeg_passes_pil_verify_but_not_the_scan(messy: tuple[Path, dict[str, list[str]]]) -> None:
    root, _ = messy
    path = root / "dog" / "truncated.jpg"
    with Image.open(path) as im:
        im.verify()  # the check PIL offers does not notice ...
    with pytest.raises(OSError, match="truncated"):
        load_rgb(str(path))  # ... what a loader worker would hit


def test_error_mode_rejects_up_front_naming_the_file_and_the_fix(messy: tuple[Path, dict[str, list[str]]]) -> None:
    root, kinds = messy
    with pytest.raises(DataError) as err:
        scan_image_folder(str(root), "error", field_name="data.train")
    msg = str(err.value)
    assert msg.startswith("data.train: ") and "unreadable image" in msg and "set data.on_bad_image: skip" in msg
    assert any(msg.startswith(f"data.train: {p}: ") for p in kinds["broken"]), msg


def test_every_good_image_goes_through_the_loaders(messy: tuple[Path, dict[str, list[str]]]) -> None:
    root, kinds = messy
    plan = plan_dataset(DataSpec(train=str(root), val_fraction=0.2, on_bad_image="skip"), seed=0)
    assert len(plan.train) + len(plan.val) == len(kinds["good"])
    for augment in ("light", "randaugment"):
        transform = build_transform(DATA_CONFIG, True, DataSpec(train=str(root), augment=augment))
        loader = build_train_loader(plan.train, transform, 4, 0, 1, seed=0, workers=0)
        shapes = {tuple(x.shape) for x, _ in loader}
        assert shapes == {(4, 3, 32, 32)}
    loader = build_eval_loader(plan.train + plan.val, build_transform(DATA_CONFIG, False), 5, 0, 1, workers=0)
    images = torch.cat([x for x, _ in loader])
    assert images.shape == (len(kinds["good"]), 3, 32, 32) and torch.isfinite(images).all()


def test_modes_are_converted_to_rgb(messy: tuple[Path, dict[str, list[str]]]) -> None:
    root, _ = messy
    cat = root / "cat"
    expected = {
        "grey16.png": "I;16",
        "la.png": "LA",
        "rgba.png": "RGBA",
        "bilevel.png": "1",
        "cmyk.jpg": "CMYK",
        "float.tif": "F",
        "palette_transparent.png": "P",
        "grey.jpg": "L",
    }
    for name, mode in expected.items():
        with Image.open(cat / name) as im:
            assert im.mode.startswith(mode[0]), (name, im.mode)
        assert load_rgb(str(cat / name)).mode == "RGB", name
    assert load_rgb(str(cat / "rgba.png")).getpixel((0, 0))[1] > 100  # alpha composited on white, not black


@pytest.mark.parametrize(
    "layout,needle",
    [
        ({"cat": 2, "dog": 0}, "class folder {root}/dog has no images; remove it or add images"),
        ({"cat": 2, "dog": "txt"}, "class folder {root}/dog has no images; remove it or add images"),
        ({"cat": 2, "dog": "broken"}, "class folder {root}/dog has no readable images; remove it or add images"),
        ({}, "has no class subfolders; expected the layout"),
    ],
    ids=["empty class folder", "class of non-images", "class of broken images (skip mode)", "no class folders"],
)
def test_unusable_folders_are_rejected_up_front(tmp_path: Path, layout: dict, needle: str) -> None:
    root = tmp_path / "d"
    root.mkdir()
    (root / "stray.jpg").write_bytes(_jpeg_bytes(_photo(8, 8)))
    for name, content in layout.items():
        (root / name).mkdir()
        if content == "txt":
            (root / name / "readme.txt").write_text("x")
        elif content == "broken":
            (root / name / "a.jpg").write_bytes(b"nope")
        else:
            for i in range(content):
                _photo(8, 8, i).save(root / name / f"{i}.png")
    with pytest.raises(DataError) as err:
        scan_image_folder(str(root), "skip")
    assert needle.format(root=root) in str(err.value)


def test_a_file_damaged_after_the_scan_is_replaced_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "d"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            _photo(16, 16, i).save(root / c / f"{i}.jpg")
    plan = plan_dataset(DataSpec(train=str(root), val_fraction=0.25), seed=0)
    victim = plan.train[0][0]
    data = Path(victim).read_bytes()
    Path(victim).write_bytes(data[: len(data) // 2])  # damaged on disk after the job was checked
    transform = build_transform(DATA_CONFIG, False)
    with caplog.at_level(logging.WARNING, logger="tltrain.data"):
        loader = build_train_loader(plan.train, transform, 2, 0, 1, seed=0, workers=0)
        batches = list(loader)
    assert sum(len(y) for _, y in batches) == len(plan.train) // 2 * 2
    warnings = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert warnings and victim in warnings[0] and "1 unreadable so far" in warnings[0]

    # Only a whole run of unreadable files is an error, and it says what to do.
    dataset = ImageListDataset([(victim, 0)] * 3, transform)
    with pytest.raises(DataError, match=r"cannot be decoded.*tltrain validate"):
        dataset[0]


def test_the_driver_prints_a_counted_warning(messy: tuple[Path, dict[str, list[str]]], tmp_path: Path) -> None:
    from tltrain.execution.preflight import build_plan
    from tltrain.reports.progress import describe_plan
    from tltrain.spec.load import parse_spec

    root, kinds = messy
    spec = parse_spec(
        {
            "name": "messy",
            "model": {"name": "test_resnet"},
            "data": {"train": str(root), "val_fraction": 0.2, "on_bad_image": "skip", "image_size": 32},
            "scaling": {"batch_size_per_worker": 4},
            "storage": {"uri": str(tmp_path / "runs")},
        }
    )
    plan = build_plan(spec)
    out = io.StringIO()
    describe_plan(spec, plan, out)
    skipped = len(kinds["broken"]) + len(kinds["not_images"])
    assert f"warning: {skipped} file(s) skipped" in out.getvalue()


@pytest.mark.integration
def test_training_on_the_messy_tree_runs_end_to_end(messy: tuple[Path, dict[str, list[str]]], tmp_path: Path) -> None:
    """The real CLI on a local Ray (1 worker, 2 loader processes): the messy tree trains."""
    root, kinds = messy
    spec = {
        "name": "messy",
        "model": {"name": "test_resnet"},
        "data": {
            "train": str(root),
            "val_fraction": 0.25,
            "on_bad_image": "skip",
            "image_size": 32,
            "loader_workers": 2,
        },
        "loop": {"epochs": 1, "precision": "fp32"},
        "scaling": {"num_workers": 1, "batch_size_per_worker": 4, "address": "local"},
        "storage": {"uri": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    ray_tmp = tempfile.mkdtemp(prefix="tlm", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", RAY_TMPDIR=ray_tmp)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "tltrain.cli", "train", str(path), "--json"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    skipped = len(kinds["broken"]) + len(kinds["not_images"])
    assert f"warning: {skipped} file(s) skipped" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["epochs_completed"] == 1
