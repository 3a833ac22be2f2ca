"""The device data paths: `tltrain prepare` shards and the loaders that crop on the device.

CPU tests check the shard files, the label order (the CPU path's, batch for batch) and that the eval
images equal the CPU eval transform's; the `gpu` tests repeat that on CUDA in bf16 and cover nvJPEG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tltrain import storage
from tltrain.commands.prepare import add_commands
from tltrain.data.decode import load_rgb
from tltrain.data.device import INDEX_FILE, LIGHT_RATIO, build_shard_loaders, read_index, sample_crop_boxes
from tltrain.data.folder import DataError
from tltrain.data.loaders import build_eval_loader, build_train_loader, build_transform
from tltrain.execution.preflight import build_plan
from tltrain.execution.prepare import prepare
from tltrain.spec.load import parse_spec
from tltrain.spec.schema import JobSpec, SpecError

BATCH = 8


def _spec(train: str, val: str | None, prepared: str, **over: object) -> JobSpec:
    data: dict[str, object] = {
        "train": train,
        "image_size": 32,
        "loader_workers": 0,
        "format": "shards",
        "prepared": prepared,
    }
    if val:
        data["val"] = val
    else:
        data["val_fraction"] = 0.2
    tree: dict[str, object] = {
        "name": "shards",
        "model": {"name": "test_resnet"},
        "data": data,
        "loop": {"precision": "fp32", "epochs": 1},
        "scaling": {"batch_size_per_worker": BATCH},
        "tracking": {"enabled": False},
    }
    for dotted, value in over.items():
        section, key = dotted.split("__")
        tree[section][key] = value  # type: ignore[index]
    return parse_spec(tree)


@pytest.fixture(scope="module")
def prepared(fashion_folders: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[JobSpec, str]:
    train, val = fashion_folders
    out = str(tmp_path_factory.mktemp("prepared") / "fashion-32")
    spec = _spec(train, val, out)
    # Small shards, so batches gather across shard files.
    prepare(spec, out, workers=0, shard_bytes=33 * 33 * 3 * 70, log=lambda m: None)
    return spec, out


def _cpu_eval(plan, samples) -> torch.Tensor:
    tf = build_transform(plan.data_config, False)
    return torch.stack([tf(load_rgb(p)) for p, _ in samples])


def test_prepare_writes_shards_and_index(prepared: tuple[JobSpec, str]) -> None:
    spec, out = prepared
    index = read_index(out)
    plan = build_plan(spec)
    size = index["stored_size"]
    assert size == 33  # floor(32 / crop_pct 0.95): the CPU eval transform's resize
    assert index["class_names"] == plan.class_names
    assert index["fingerprint"] == plan.fingerprint
    for split, n in (("train", 300), ("val", 100)):
        part = index["splits"][split]
        assert part["count"] == n and len(part["paths"]) == n and len(part["labels"]) == n
        assert len(part["shards"]) > 1
        arrays = [np.load(Path(out) / s["file"], mmap_mode="r") for s in part["shards"]]
        assert all(a.dtype == np.uint8 and a.shape[1:] == (size, size, 3) for a in arrays)
        assert sum(a.shape[0] for a in arrays) == n
        assert sorted(part["labels"]) == part["labels"]  # class by class
    # An up-to-date directory is left alone.
    again = prepare(spec, out, workers=0, log=lambda m: None)
    assert again["written"] is False


def test_shard_eval_images_and_labels_equal_the_cpu_eval_path(prepared: tuple[JobSpec, str]) -> None:
    spec, _ = prepared
    plan = build_plan(spec)
    _, val_loader = build_shard_loaders(spec, plan, 0, 1, torch.device("cpu"))
    images, labels = zip(*val_loader)
    got, got_labels = torch.cat(images), torch.cat(labels)
    assert got_labels.tolist() == [y for _, y in plan.val]
    expected = _cpu_eval(plan, plan.val)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # Same resize (timm's own), same crop offsets: pixel for pixel the CPU eval transform.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_shard_train_batches_follow_the_cpu_sampler_and_value_range(prepared: tuple[JobSpec, str]) -> None:
    spec, _ = prepared
    plan = build_plan(spec)
    train_loader, _ = build_shard_loaders(spec, plan, 0, 1, torch.device("cpu"))
    cpu_loader = build_train_loader(plan.train, build_transform(plan.data_config, True), BATCH, 0, 1, 0, 0)
    assert len(train_loader) == len(cpu_loader)
    mean, std = torch.tensor(plan.data_config["mean"]), torch.tensor(plan.data_config["std"])
    lo, hi = ((0 - mean) / std).min().item(), ((1 - mean) / std).max().item()
    for epoch in (0, 1):
        train_loader.sampler.set_epoch(epoch)
        cpu_loader.sampler.set_epoch(epoch)
        gpu_batches, cpu_batches = list(train_loader), list(cpu_loader)
        # Same seeded order as the CPU path: the same images in the same batches, same labels.
        assert [y.tolist() for _, y in gpu_batches] == [y.tolist() for _, y in cpu_batches]
        x = torch.cat([b for b, _ in gpu_batches])
        ref = torch.cat([b for b, _ in cpu_batches])
        assert x.shape == ref.shape and x.dtype == torch.float32
        assert lo - 1e-4 <= x.min().item() and x.max().item() <= hi + 1e-4
        # Random crops differ, their statistics do not.
        assert abs(x.mean().item() - ref.mean().item()) < 0.05
        assert abs(x.std().item() - ref.std().item()) < 0.05


def test_ranks_split_train_and_val_without_overlap(prepared: tuple[JobSpec, str]) -> None:
    spec, _ = prepared
    plan = build_plan(spec)
    cpu = torch.device("cpu")
    (t0, v0), (t1, v1) = (build_shard_loaders(spec, plan, r, 2, cpu) for r in (0, 1))
    val_counts = sum(len(y) for _, y in v0) + sum(len(y) for _, y in v1)
    assert val_counts == len(plan.val)
    cpu_val = build_eval_loader(plan.val, build_transform(plan.data_config, False), BATCH, 1, 2, 0)
    assert [y.tolist() for _, y in v1] == [y.tolist() for _, y in cpu_val]
    assert len(t0) == len(t1) == (len(plan.train) // 2) // BATCH


def test_val_fraction_split_reads_the_train_shards(
    fashion_folders: tuple[str, str], prepared: tuple[JobSpec, str]
) -> None:
    _, out = prepared
    spec = _spec(fashion_folders[0], None, out, data__max_images_per_class=20)
    plan = build_plan(spec)
    train_loader, val_loader = build_shard_loaders(spec, plan, 0, 1, torch.device("cpu"))
    images, labels = zip(*val_loader)
    assert torch.cat(labels).tolist() == [y for _, y in plan.val]
    torch.testing.assert_close(torch.cat(images), _cpu_eval(plan, plan.val), atol=1e-5, rtol=0)
    assert len(train_loader) == len(plan.train) // BATCH


def test_stale_or_mismatched_prepared_data_is_refused(
    fashion_folders: tuple[str, str], prepared: tuple[JobSpec, str], tmp_path: Path
) -> None:
    spec, out = prepared
    plan = build_plan(spec)
    cpu = torch.device("cpu")
    with pytest.raises(DataError, match="fingerprint"):
        build_shard_loaders(spec, plan.__class__(**{**plan.to_dict(), "fingerprint": {"sha256": "x"}}), 0, 1, cpu)
    bigger = _spec(*fashion_folders, out, data__image_size=48)
    with pytest.raises(DataError, match="re-run tltrain prepare"):
        build_shard_loaders(bigger, build_plan(bigger), 0, 1, cpu)
    missing = _spec(*fashion_folders, str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="tltrain prepare"):
        build_shard_loaders(missing, plan, 0, 1, cpu)


def test_spec_fields_for_the_device_paths(fashion_folders: tuple[str, str]) -> None:
    with pytest.raises(SpecError, match="data.prepared"):
        parse_spec(
            {
                "name": "x",
                "model": {"name": "test_resnet"},
                "data": {"train": fashion_folders[0], "val_fraction": 0.2, "format": "shards"},
            }
        )
    with pytest.raises(SpecError, match="randaugment"):
        parse_spec(
            {
                "name": "x",
                "model": {"name": "test_resnet"},
                "data": {
                    "train": fashion_folders[0],
                    "val_fraction": 0.2,
                    "decode": "nvjpeg",
                    "augment": "randaugment",
                },
            }
        )


def test_crop_boxes_stay_inside_and_keep_scale_and_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.tensor([33.0, 375.0, 100.0] * 200)
    w = torch.tensor([33.0, 500.0, 20.0] * 200)  # the last is far outside the ratio range: fallback
    boxes = sample_crop_boxes(h, w, (0.5, 1.0), LIGHT_RATIO, g)
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
    assert (x2 > x1).all() and (y2 > y1).all()
    normal = torch.arange(len(h)) % 3 != 2
    area = ((x2 - x1) * (y2 - y1) / (h * w))[normal]
    ratio = ((x2 - x1) / (y2 - y1))[normal]
    assert area.min() > 0.45 and area.max() <= 1.0
    assert ratio.min() > 0.7 and ratio.max() < 1.4


def test_prepare_command(fashion_folders: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        json.dumps(
            {
                "name": "cli",
                "model": {"name": "test_resnet"},
                "data": {"train": fashion_folders[0], "val_fraction": 0.2, "image_size": 32, "max_images_per_class": 5},
                "tracking": {"enabled": False},
            }
        )
    )
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", str(spec_path), "--out", str(out), "--workers", "0", "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Every image of the folder, whatever the cap: one prepared copy serves any split.
    assert summary["splits"] == {"train": 300} and summary["written"] is True
    assert (out / INDEX_FILE).is_file()


@pytest.mark.integration
def test_prepare_to_object_storage_and_read_back(
    fashion_folders: tuple[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    uri = f"{s3_bucket}/prepared/fashion"
    spec = _spec(*fashion_folders, uri, data__cache_dir=str(tmp_path / "cache"), data__max_images_per_class=4)
    summary = prepare(spec, uri, workers=0, log=lambda m: None)
    assert summary["images"] == 400
    plan = build_plan(spec)
    # The worker reads s3:// shards through its node's local copy (data/ never talks to storage).
    root = storage.localize(uri, spec.data.cache_dir)
    _, val_loader = build_shard_loaders(spec, plan, 0, 1, torch.device("cpu"), root=root)
    assert torch.cat([y for _, y in val_loader]).tolist() == [y for _, y in plan.val]


# --- on CUDA (the lead runs these on the GPU machine) ------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tltrain.data.synthetic import make_synthetic_jpeg_folder

    return make_synthetic_jpeg_folder(str(tmp_path_factory.mktemp("jpegs") / "train"), 48, 4, size=(120, 90), workers=1)


def _gpu_spec(folder: str, prepared: str, **data: object) -> JobSpec:
    return parse_spec(
        {
            "name": "gpu",
            "model": {"name": "resnet18"},
            "data": {
                "train": folder,
                "val_fraction": 0.25,
                "image_size": 64,
                "loader_workers": 2,
                "prepared": prepared,
                **data,
            },
            "loop": {"precision": "bf16"},
            "scaling": {"batch_size_per_worker": 8, "use_gpu": True},
            "tracking": {"enabled": False},
        }
    )


@pytest.mark.gpu
@cuda
def test_gpu_shards_match_the_cpu_path(jpeg_folder: str, tmp_path: Path) -> None:
    out = str(tmp_path / "shards")
    spec = _gpu_spec(jpeg_folder, out, format="shards")
    prepare(spec, out, workers=2, log=lambda m: None)
    plan = build_plan(spec)
    device = torch.device("cuda")
    train_loader, val_loader = build_shard_loaders(spec, plan, 0, 1, device)
    images, labels = zip(*val_loader)
    got = torch.cat(images)
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.cat(labels).tolist() == [y for _, y in plan.val]
    expected = _cpu_eval(plan, plan.val)
    # bf16 keeps 8 bits of mantissa: |x| < 2.7 rounds by < 0.011.
    torch.testing.assert_close(got.float().cpu(), expected, atol=0.02, rtol=0)

    cpu_loader = build_train_loader(plan.train, build_transform(plan.data_config, True), 8, 0, 1, 0, 0)
    train_loader.sampler.set_epoch(0)
    cpu_loader.sampler.set_epoch(0)
    gpu_batches, cpu_batches = list(train_loader), list(cpu_loader)
    assert [y.tolist() for _, y in gpu_batches] == [y.tolist() for _, y in cpu_batches]
    x = torch.cat([b for b, _ in gpu_batches]).float().cpu()
    ref = torch.cat([b for b, _ in cpu_batches])
    assert x.min() >= ref.min() - 0.05 and x.max() <= ref.max() + 0.05
    assert abs(x.mean().item() - ref.mean().item()) < 0.1


@pytest.mark.gpu
@cuda
def test_gpu_nvjpeg_matches_the_cpu_path(jpeg_folder: str, tmp_path: Path) -> None:
    from tltrain.data.nvjpeg import build_nvjpeg_loaders

    spec = _gpu_spec(jpeg_folder, str(tmp_path), decode="nvjpeg")
    plan = build_plan(spec)
    train_loader, val_loader = build_nvjpeg_loaders(spec, plan, plan.train, plan.val, 0, 1, torch.device("cuda"))
    images, labels = zip(*val_loader)
    got = torch.cat(images).float().cpu()
    assert torch.cat(labels).tolist() == [y for _, y in plan.val]
    expected = _cpu_eval(plan, plan.val)
    # Another JPEG decoder (IDCT rounding, chroma upsampling) and resize kernel: close, not equal.
    diff = (got - expected).abs()
    assert diff.mean() < 0.05, (diff.mean().item(), diff.max().item())
    train_loader.sampler.set_epoch(0)
    batch_images, batch_labels = next(iter(train_loader))
    assert batch_images.shape == (8, 3, 64, 64) and batch_images.dtype == torch.bfloat16
    assert batch_labels.device.type == "cuda"
