"""Data paths that keep a GPU fed: the CPU only moves bytes, the worker's device crops and normalizes.

This module owns the pieces both device paths share (the device-side augmentation, `DeviceLoader`,
the samplers) and the shard path, built here for `execution.worker.worker_fn`:

- `data.format: shards` reads the uint8 arrays written once by `tltrain prepare` (each image decoded,
  its shorter side resized to floor(image_size / crop_pct) exactly as the CPU eval transform does,
  the centre square kept). Loader workers memory-map the shards and slice whole batches; on the
  device a random-resized-crop (one `roi_align` over the batch), flip and normalize produce images
  in the autocast dtype, channels_last. Evaluation takes the centre crop, which is pixel for pixel
  the CPU eval transform.
- `data.decode: nvjpeg` (nvjpeg.py) keeps the ImageFolder and decodes JPEGs on the GPU, then
  crops/resizes per image with `DeviceAugment.images`.

Both yield `(images, labels)` already on the device, copied and augmented one batch ahead on a side
CUDA stream, and expose `sampler` (with `set_epoch`) and `len` like a DataLoader, so `loop.train`
takes them unchanged. Sample order, the train/val split and labels are the driver's plan, the same
lists the CPU path uses.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from tltrain.data.folder import DataError, Sample, local_root
from tltrain.data.loaders import LIGHT_SCALE, BalancedEpochSampler, train_crop_scale
from tltrain.data.orientation import dihedral_batch
from tltrain.spec.schema import JobSpec

INDEX_FILE = "index.json"
FORMAT_NAME = "tltrain-shards"
FORMAT_VERSION = 1
# The data_config keys that decide which pixels a shard holds (mean/std are applied at load time).
GEOMETRY_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation")
# The CPU path's "light" augmentation (data.build_transform): random-resized-crop scale (the default
# of data.crop_scale, loaders.LIGHT_SCALE) and ratio, flip.
LIGHT_RATIO = (3.0 / 4.0, 4.0 / 3.0)

Batch = tuple[torch.Tensor, torch.Tensor]


# --- geometry shared with `tltrain prepare` ---------------------------------------------------------


def image_size_of(data_config: dict[str, Any]) -> int:
    _, h, w = data_config["input_size"]
    if h != w:
        raise DataError(f"data.format shards needs a square input size, the model's is {h}x{w}; set data.image_size")
    return int(h)


def stored_size(data_config: dict[str, Any]) -> int:
    """Side of the square each image is stored at: the CPU eval transform's resize target."""
    return math.floor(image_size_of(data_config) / data_config["crop_pct"])


def center_offset(full: int, crop: int) -> int:
    # torchvision's CenterCrop rounding, so the GPU eval crop lands on the CPU path's pixels.
    return int(round((full - crop) / 2.0))


def geometry(data_config: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items() if k in GEOMETRY_KEYS}


# --- augmentation on the device --------------------------------------------------------------------


def sample_crop_boxes(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    tries: int = 10,
) -> torch.Tensor:
    """torchvision RandomResizedCrop.get_params for a whole batch: [n, 4] boxes (x1, y1, x2, y2),
    in pixel-edge coordinates, for images of the given sizes (CPU float tensors)."""
    n = heights.shape[0]
    area = (heights * widths)[:, None]
    target = area * (torch.rand(n, tries, generator=generator) * (scale[1] - scale[0]) + scale[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.rand(n, tries, generator=generator) * (log_hi - log_lo) + log_lo)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    # No try fits: torchvision's fallback, the centre crop at the nearest allowed aspect ratio.
    in_ratio = widths / heights
    fw = torch.where(in_ratio > ratio[1], torch.round(heights * ratio[1]), widths)
    fh = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]), heights)
    found = ok.any(dim=1)
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    top = torch.floor(torch.rand(n, generator=generator) * (heights - h + 1))
    left = torch.floor(torch.rand(n, generator=generator) * (widths - w + 1))
    top = torch.where(found, top, torch.round((heights - h) / 2))
    left = torch.where(found, left, torch.round((widths - w) / 2))
    return torch.stack([left, top, left + w, top + h], dim=1)


@dataclass
class DeviceAugment:
    """uint8 images on the device -> normalized float images for the model (train or eval).

    `dihedral` (data.orientation dihedral, training only): each image in one of the 8 flips /
    quarter turns, k drawn per image from the generator (`orientations`), instead of the coin-flip
    mirror; also after the centre crop of augment none, as on the CPU path. Crops are square, so
    every view has the batch's shape."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool  # random-resized-crop + flip; False = centre crop (the eval transform)
    dtype: torch.dtype
    channels_last: bool
    interpolation: str
    crop_pct: float
    generator: torch.Generator
    seed: int = 0  # set_epoch reseeds the generator from (seed, epoch)
    scale: tuple[float, float] = LIGHT_SCALE  # random-resized-crop area range (data.crop_scale)
    dihedral: bool = False

    def set_epoch(self, epoch: int) -> None:
        """Each epoch's crops and flips from (seed, epoch) alone, so a resumed run draws the same."""
        self.generator.manual_seed(random.Random(f"device-augment:{self.seed}:{epoch}").getrandbits(63))

    def __post_init__(self) -> None:
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        # From pinned memory the copy is queued without blocking the host. A pageable copy would wait
        # for the side stream's earlier work, i.e. stall the training loop (counted as data wait).
        if device.type == "cuda":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std, as torchvision's ToTensor + Normalize compute it, then the model's dtype.
        if x.device not in self._constants:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
            self._constants[x.device] = (mean.to(x.device), std.to(x.device))
        mean, std = self._constants[x.device]
        x = ((x - mean) / std).to(self.dtype)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format)

    def _coin_flips(self, n: int) -> torch.Tensor:
        return (torch.rand(n, generator=self.generator) < 0.5).to(torch.float32)

    def orientations(self, n: int) -> torch.Tensor:
        """The next n per-image views (float 0..7, CPU): the mirror coin (0 or 4) for natural, any
        of the 8 dihedral views for dihedral. One draw per image, from the augment's generator."""
        if self.dihedral:
            return torch.randint(0, 8, (n,), generator=self.generator).to(torch.float32)
        return self._coin_flips(n) * 4.0  # view 4 = mirrored left-right (data/orientation)

    def _orient(self, x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        if self.dihedral:
            return dihedral_batch(x, views)
        return torch.where(views.view(-1, 1, 1, 1) > 0.5, x.flip(3), x)

    def squares(self, u8_nhwc: torch.Tensor) -> torch.Tensor:
        """A batch of stored squares [n, S, S, 3] uint8 (shards)."""
        n, size = u8_nhwc.shape[0], u8_nhwc.shape[1]
        s = self.image_size
        if not self.train:
            o = center_offset(size, s)
            x = u8_nhwc[:, o : o + s, o : o + s, :].permute(0, 3, 1, 2).float()
            if self.dihedral:
                x = dihedral_batch(x, self._to_device(self.orientations(n), u8_nhwc.device))
            return self._normalize(x)
        from torchvision.ops import roi_align

        sizes = torch.full((n,), float(size))
        boxes = sample_crop_boxes(sizes, sizes, self.scale, LIGHT_RATIO, self.generator)
        # Batch index, box, view: one small copy, sent before any heavy work is queued.
        params = self._to_device(
            torch.cat([torch.arange(n, dtype=torch.float32)[:, None], boxes, self.orientations(n)[:, None]], dim=1),
            u8_nhwc.device,
        )
        # One kernel crops and resizes the whole batch (bilinear; `sampling_ratio=-1` averages
        # ceil(crop / out) samples per output pixel, which antialiases the downscaled crops).
        x = roi_align(
            u8_nhwc.permute(0, 3, 1, 2).float(), params[:, :5], output_size=(s, s), sampling_ratio=-1, aligned=True
        )
        return self._normalize(self._orient(x, params[:, 5]))

    def images(self, chw_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Whole decoded images of any size, uint8 [3, H, W] each (nvjpeg)."""
        s = self.image_size
        mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
        out = []
        if self.train:
            hs = torch.tensor([float(im.shape[1]) for im in chw_list])
            ws = torch.tensor([float(im.shape[2]) for im in chw_list])
            boxes = sample_crop_boxes(hs, ws, self.scale, LIGHT_RATIO, self.generator).long().tolist()
            views = self._to_device(self.orientations(len(chw_list)), chw_list[0].device)
            for im, (x1, y1, x2, y2) in zip(chw_list, boxes):
                crop = im[None, :, y1:y2, x1:x2].float()
                out.append(F.interpolate(crop, size=(s, s), mode=mode, antialias=True, align_corners=False))
            return self._normalize(self._orient(torch.cat(out).clamp_(0, 255), views))
        scale = math.floor(s / self.crop_pct)
        for im in chw_list:
            h, w = im.shape[1], im.shape[2]
            # torchvision Resize(int): the shorter side to `scale`, the longer in proportion.
            nh, nw = (int(scale * h / w), scale) if w <= h else (scale, int(scale * w / h))
            r = F.interpolate(im[None].float(), size=(nh, nw), mode=mode, antialias=True, align_corners=False)
            t, left = center_offset(nh, s), center_offset(nw, s)
            out.append(r[:, :, t : t + s, left : left + s])
        x = torch.cat(out).clamp_(0, 255)
        if self.dihedral:
            x = dihedral_batch(x, self._to_device(self.orientations(len(chw_list)), x.device))
        return self._normalize(x)


def build_augment(
    spec: JobSpec,
    data_config: dict[str, Any],
    train: bool,
    device: torch.device,
    seed: int,
    autocast: torch.dtype | None,
) -> DeviceAugment:
    """`autocast`: the dtype the step computes in (None = fp32); on CUDA images leave in it.
    Training: data.augment light crops within data.crop_scale; data.orientation dihedral turns and
    mirrors (with augment none too). Eval: the centre crop only."""
    dtype = autocast if (device.type == "cuda" and autocast is not None) else torch.float32
    return DeviceAugment(
        image_size=image_size_of(data_config),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        train=train and spec.data.augment == "light",
        dtype=dtype,
        channels_last=spec.loop.channels_last and device.type == "cuda",
        interpolation=str(data_config["interpolation"]),
        crop_pct=float(data_config["crop_pct"]),
        generator=torch.Generator().manual_seed(seed),
        seed=seed,
        scale=train_crop_scale(spec.data),
        dihedral=train and spec.data.orientation == "dihedral",
    )


# --- one batch ahead on the device -----------------------------------------------------------------


class DeviceLoader:
    """Wraps a DataLoader of host batches; yields device batches made by `to_device`, the next one
    prepared on a side CUDA stream while the model computes on the current one."""

    def __init__(
        self,
        loader: DataLoader,
        sampler: Any,
        to_device: Callable[[Any], Batch],
        device: torch.device,
        augment: DeviceAugment | None = None,
    ) -> None:
        self.loader = loader
        self.sampler = sampler
        self.to_device = to_device
        self.device = device
        self.augment = augment

    def set_epoch(self, epoch: int) -> None:
        """loop.train calls this each epoch: a new seeded shuffle and that epoch's augmentation stream."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if self.augment is not None:
            self.augment.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        it = iter(self.loader)
        if self.device.type != "cuda":
            for host in it:
                yield self.to_device(host)
            return
        side = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)

        def ahead() -> Batch | None:
            host = next(it, None)
            if host is None:
                return None
            with torch.cuda.stream(side):
                return self.to_device(host)

        nxt = ahead()
        while nxt is not None:
            main.wait_stream(side)
            images, labels = nxt
            # Made on the side stream, used on the main one: keep the allocator from recycling early.
            images.record_stream(main)
            labels.record_stream(main)
            nxt = ahead()
            yield images, labels


# Batches each loader worker keeps ready. Whole batches are large (256 x 235 x 235 x 3 = 42 MB), and
# every one in flight is also pinned, and drained when an epoch stops early (max_steps_per_epoch).
PREFETCH_BATCHES = 2


def host_loader(
    dataset: Dataset, batch_sampler: Any, workers: int, collate: Callable | None, device: torch.device
) -> DataLoader:
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "persistent_workers": workers > 0,
    }
    if workers > 0:
        kwargs["prefetch_factor"] = PREFETCH_BATCHES
    if collate is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate, **kwargs)
    # batch_size=None: the dataset returns whole batches for a list of indices (one gather per batch).
    return DataLoader(dataset, sampler=batch_sampler, batch_size=None, **kwargs)


def train_sampler(
    n: int, batch: int, rank: int, world_size: int, seed: int, balanced_labels: Sequence[int] | None = None
) -> tuple[Sampler, BatchSampler]:
    """(sampler with set_epoch, its batches) for n training images. `balanced_labels` (the images'
    labels, data.sampler balanced): the CPU path's BalancedEpochSampler, yielding plain indices
    (device augmentation is seeded per epoch, not per sample); else the CPU path's shuffle."""
    per_rank = n // world_size
    if per_rank < batch:
        raise DataError(
            f"{n} training images give each of {world_size} worker(s) {per_rank}, fewer than "
            f"scaling.batch_size_per_worker={batch}, so no full batch exists: lower the batch size or add images"
        )
    if balanced_labels is not None:
        balanced = BalancedEpochSampler(balanced_labels, world_size, rank, seed, keyed=False)
        return balanced, BatchSampler(balanced, batch, drop_last=True)
    # The CPU path's sampler (same seed, same set_epoch), so both paths see the same order.
    sampler: DistributedSampler[int] = DistributedSampler(
        range(n),  # type: ignore[arg-type]  # torch: only len() is used; any sized sequence works
        num_replicas=world_size,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
    )
    return sampler, BatchSampler(sampler, batch, drop_last=True)


def eval_sampler(n: int, batch: int) -> BatchSampler:
    return BatchSampler(SequentialSampler(range(n)), batch, drop_last=False)


# --- shards ------------------------------------------------------------------------------------------


def read_index(root: str) -> dict[str, Any]:
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        raise DataError(f"data.prepared: no {INDEX_FILE} in {root}: run `tltrain prepare SPEC.yaml --out <uri>` first")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise DataError(
            f"data.prepared: {root} is not a {FORMAT_NAME} v{FORMAT_VERSION} directory; re-run tltrain prepare"
        )
    return index


def _relative(samples: Sequence[Sample], root: str) -> list[tuple[str, int]]:
    return [(Path(os.path.relpath(p, root)).as_posix(), int(y)) for p, y in samples]


def shard_rows(index: dict[str, Any], split: str, samples: list[tuple[str, int]], field: str) -> np.ndarray:
    """Row in the prepared `split` of each (relative path, label), in the plan's order."""
    part = index["splits"].get(split)
    if part is None:
        raise DataError(f"data.prepared holds no {split!r} images (prepared without data.val?); re-run tltrain prepare")
    where = {p: i for i, p in enumerate(part["paths"])}
    labels = part["labels"]
    rows = np.empty(len(samples), dtype=np.int64)
    for k, (rel, label) in enumerate(samples):
        row = where.get(rel)
        if row is None:
            raise DataError(f"{field}: {rel} is not in data.prepared; re-run tltrain prepare")
        if labels[row] != label:
            raise DataError(
                f"{field}: {rel} has label {label} in the plan, {labels[row]} in data.prepared; re-run tltrain prepare"
            )
        rows[k] = row
    return rows


class ShardBatches(Dataset):
    """Whole batches of stored squares: `ds[list_of_indices]` -> (uint8 [n, S, S, 3], int64 labels).
    The shards are memory-mapped lazily in whichever process reads them (loader workers)."""

    def __init__(self, root: str, part: dict[str, Any], rows: np.ndarray, labels: np.ndarray) -> None:
        self.root = root
        self.files = [s["file"] for s in part["shards"]]
        self.per_shard = int(part["per_shard"])
        self.rows = rows
        self.labels = labels
        self._arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def __getitem__(self, indices: Sequence[int]) -> Batch:
        if self._arrays is None:
            self._arrays = [np.load(os.path.join(self.root, f), mmap_mode="r") for f in self.files]
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.rows[idx]
        shard, local = rows // self.per_shard, rows % self.per_shard
        first = self._arrays[0]
        out = np.empty((len(rows),) + first.shape[1:], dtype=np.uint8)
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self._arrays[s][local[mask]]  # fancy indexing copies just these rows out of the map
        return torch.from_numpy(out), torch.from_numpy(self.labels[idx])


def _check_prepared(index: dict[str, Any], plan: Any, root: str) -> None:
    if index["class_names"] != list(plan.class_names):
        raise DataError(
            f"data.prepared ({root}) has classes {index['class_names'][:5]}..., the data has "
            f"{list(plan.class_names)[:5]}...: re-run tltrain prepare"
        )
    if plan.fingerprint["sha256"] not in index["fingerprints"]:
        raise DataError(
            f"data.prepared ({root}) was made from other files than data.train/data.val hold now "
            "(dataset fingerprint differs): re-run tltrain prepare"
        )
    want = geometry(plan.data_config)
    if index["geometry"] != want:
        raise DataError(
            f"data.prepared ({root}) holds images for {index['geometry']}, this job needs {want} "
            "(image_size or model changed): re-run tltrain prepare with this spec"
        )


def build_shard_loaders(
    spec: JobSpec,
    plan: Any,
    rank: int,
    world_size: int,
    device: torch.device,
    *,
    root: str | None = None,
    autocast: torch.dtype | None = None,
) -> tuple[DeviceLoader, DeviceLoader]:
    """Train and val loaders over data.prepared for this rank (plan: the driver's TrainPlan).
    `root`: this node's local copy of data.prepared (default: data.prepared as a local folder);
    `autocast`: the dtype the step computes in, so images arrive in it on CUDA."""
    root = root or local_root(spec.data.prepared or "")
    index = read_index(root)
    _check_prepared(index, plan, root)
    batch, seed, workers = spec.scaling.batch_size_per_worker, spec.loop.seed, spec.data.loader_workers
    train_rel = _relative(plan.train, plan.train_root)
    train_rows = shard_rows(index, "train", train_rel, "data.train")
    if spec.data.val is not None:
        val_split, val_rel = "val", _relative(plan.val, plan.val_root)
    else:  # val_fraction: the held-out images come from the train folder
        val_split, val_rel = "train", _relative(plan.val, plan.train_root)
    val_rows = shard_rows(index, val_split, val_rel, "data.val")

    train_ds = ShardBatches(
        root, index["splits"]["train"], train_rows, np.array([y for _, y in train_rel], dtype=np.int64)
    )
    labels = [y for _, y in train_rel] if spec.data.sampler == "balanced" else None
    sampler, batches = train_sampler(len(train_ds), batch, rank, world_size, seed, labels)
    train_aug = build_augment(spec, plan.data_config, True, device, seed * 65537 + rank, autocast)

    def train_to_device(host: Batch) -> Batch:
        images, labels = host
        return train_aug.squares(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)

    # Rank r evaluates val[r::world_size], like data.build_eval_loader: no padding, no duplicates.
    val_labels = np.array([y for _, y in val_rel], dtype=np.int64)[rank::world_size]
    val_ds = ShardBatches(root, index["splits"][val_split], val_rows[rank::world_size], val_labels)
    val_aug = build_augment(spec, plan.data_config, False, device, seed, autocast)

    def val_to_device(host: Batch) -> Batch:
        images, labels = host
        return val_aug.squares(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)

    train = DeviceLoader(
        host_loader(train_ds, batches, workers, None, device), sampler, train_to_device, device, train_aug
    )
    val = DeviceLoader(
        host_loader(val_ds, eval_sampler(len(val_ds), batch), workers, None, device), None, val_to_device, device
    )
    return train, val
