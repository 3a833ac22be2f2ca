"""The `data.decode: nvjpeg` loaders: JPEGs of the ImageFolder decoded on the worker's GPU.

Loader workers only read file bytes; `torchvision.io.decode_jpeg(device="cuda")` decodes a batch at
once, then `DeviceAugment.images` crops/resizes/normalizes each image there. Non-JPEG files and
EXIF-rotated photos decode on the CPU worker as before. It is apart from device.py (which owns
what both device paths share: DeviceAugment, DeviceLoader, the samplers, plus the shard path)
because it is the only path with a raw-bytes dataset, its own collate and decode fallbacks, and
neither `tltrain prepare` nor the shard path needs any of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tltrain.data.decode import load_rgb
from tltrain.data.device import (
    Batch,
    DeviceAugment,
    DeviceLoader,
    build_augment,
    eval_sampler,
    host_loader,
    train_sampler,
)
from tltrain.data.folder import DataError, Sample
from tltrain.spec.schema import JobSpec

JPEG_MAGIC = b"\xff\xd8\xff"


def _exif_rotated(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.getexif().get(0x0112, 1) not in (1, None)  # Orientation; reads the header only
    except Exception:
        return True  # let the CPU decoder report it


class FileBytes(Dataset):
    """(encoded bytes, label) for baseline JPEGs the GPU can decode as they are; anything else
    (PNG, CMYK, EXIF-rotated) decoded here on the CPU to uint8 [3, H, W]."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, int]:
        path, label = self.samples[i]
        with open(path, "rb") as f:
            data = f.read()
        if data[:3] == JPEG_MAGIC and not _exif_rotated(path):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, label
        rgb = np.asarray(load_rgb(path), dtype=np.uint8)
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous(), False, label


def _collate_bytes(items: list[tuple[torch.Tensor, bool, int]]) -> tuple[list[torch.Tensor], list[bool], torch.Tensor]:
    return [t for t, _, _ in items], [e for _, e, _ in items], torch.tensor([y for _, _, y in items], dtype=torch.int64)


def decode_on_device(tensors: list[torch.Tensor], encoded: list[bool], device: torch.device) -> list[torch.Tensor]:
    """uint8 [3, H, W] images on `device`: nvJPEG for the encoded ones (one batched call)."""
    import torchvision.io as tio

    out: list[torch.Tensor | None] = [None] * len(tensors)
    enc = [i for i, e in enumerate(encoded) if e]
    if enc:
        try:
            decoded = tio.decode_jpeg([tensors[i] for i in enc], mode=tio.ImageReadMode.RGB, device=device)
        except RuntimeError:  # a JPEG nvJPEG refuses (CMYK, lossless...): decode those on CPU
            decoded = [tio.decode_image(tensors[i], mode=tio.ImageReadMode.RGB).to(device) for i in enc]
        for i, im in zip(enc, decoded):
            out[i] = im
    for i, e in enumerate(encoded):
        if not e:
            out[i] = tensors[i].to(device, non_blocking=True)
    return [t for t in out if t is not None]


def build_nvjpeg_loaders(
    spec: JobSpec,
    plan: Any,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    rank: int,
    world_size: int,
    device: torch.device,
    *,
    autocast: torch.dtype | None = None,
) -> tuple[DeviceLoader, DeviceLoader]:
    """ImageFolder loaders whose workers only read bytes (samples: this node's paths)."""
    if device.type != "cuda":
        raise DataError("data.decode nvjpeg needs a GPU worker (scaling.use_gpu: true); use data.decode cpu")
    batch, seed, workers = spec.scaling.batch_size_per_worker, spec.loop.seed, spec.data.loader_workers
    train_ds = FileBytes(train_samples)
    labels = [y for _, y in train_ds.samples] if spec.data.sampler == "balanced" else None
    sampler, batches = train_sampler(len(train_ds), batch, rank, world_size, seed, labels)
    train_aug = build_augment(spec, plan.data_config, True, device, seed * 65537 + rank, autocast)
    val_ds = FileBytes(list(val_samples)[rank::world_size])
    val_aug = build_augment(spec, plan.data_config, False, device, seed, autocast)

    def make(aug: DeviceAugment) -> Callable[[Any], Batch]:
        def to_device(host: Any) -> Batch:
            tensors, encoded, labels = host
            return aug.images(decode_on_device(tensors, encoded, device)), labels.to(device, non_blocking=True)

        return to_device

    train = DeviceLoader(
        host_loader(train_ds, batches, workers, _collate_bytes, device), sampler, make(train_aug), device, train_aug
    )
    val = DeviceLoader(
        host_loader(val_ds, eval_sampler(len(val_ds), batch), workers, _collate_bytes, device),
        None,
        make(val_aug),
        device,
    )
    return train, val
