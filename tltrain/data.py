"""Datasets: ImageFolder scan (local or s3:// via a local cache), the train/val plan, image
decoding to RGB, timm transforms and DataLoaders.

`plan_dataset` runs on the driver before any Ray worker starts, so a bad folder fails the job in
seconds with a message naming the file and the fix. Loaders only take `rank`/`world_size`
integers; this module knows nothing else about distribution.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data import resolve_data_config as _timm_resolve_data_config
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tltrain import storage
from tltrain.config import DEFAULT_STORE_DIR, DataSpec

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
Sample = tuple[str, int]


class DataError(ValueError):
    """The dataset cannot be used as given; the message names the file/folder and the fix."""


@dataclass
class FolderIndex:
    root: str  # local directory that was scanned (the cache copy for s3:// roots)
    class_names: list[str]
    samples: list[Sample]  # (absolute path, label), sorted by class then path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


@dataclass
class DatasetPlan:
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[tuple[str, str]]
    fingerprint: dict[str, Any]  # class_names, num_files, sha256 of sorted (relative path, size)
    train_root: str  # the local directories that were scanned (cache copies for s3:// roots)
    val_root: str


def cache_dir_for(uri: str, cache_dir: str = f"{DEFAULT_STORE_DIR}/cache") -> str:
    """Local mirror folder of an s3:// dataset: readable name + short hash (so a/b and a_b differ)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.split("://", 1)[-1]).strip("_")[:100]
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:10]
    return str(Path(cache_dir).expanduser().absolute() / f"{readable}-{digest}")


def localize(uri: str, cache_dir: str = f"{DEFAULT_STORE_DIR}/cache") -> str:
    """Local directory holding the dataset at uri: the path itself, or the cache mirror of an
    s3:// root (downloaded once; later calls only list the bucket). Workers on other nodes call
    this too, and get the same paths as the driver's plan when cache_dir is the same."""
    if not storage.is_s3(uri):
        return str(Path(uri).expanduser().absolute())
    local = cache_dir_for(uri, cache_dir)
    storage.download_tree(uri, local)
    return local


def _check_image(path: str) -> str | None:
    """None if the file decodes, else the reason.

    PNG: verify() checks every chunk's CRC (the whole file) without inflating pixels. Other formats:
    verify() does not read the pixel data (a JPEG cut off mid-upload passes it and fails only when
    a loader worker decodes it), so they are decoded; JPEGs in draft mode at 1/8 scale, which
    still reads every byte of the stream but skips most of the pixel work (about half the cost of
    a full decode; Pillow releases the GIL while decoding, so the scan's threads run in parallel)."""
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()
            else:
                if im.format == "JPEG":
                    im.draft("RGB", (1, 1))
                im.load()
        return None
    except Exception as err:  # PIL raises many types for broken files
        return f"unreadable image ({type(err).__name__}: {err})"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")  # .DS_Store, macOS ._* resource forks, .ipynb_checkpoints, ...


def scan_image_folder(
    root: str,
    on_bad_image: Literal["error", "skip"] = "error",
    *,
    field_name: str = "data.train",
    cache_dir: str = f"{DEFAULT_STORE_DIR}/cache",
) -> FolderIndex:
    """Index an ImageFolder tree `<root>/<class>/<image>` (class folders may nest subfolders).

    `field_name` is the spec field the root came from, so errors point at what to edit.
    """
    if storage.is_s3(root):
        if not storage.exists(root):
            raise DataError(f"{field_name}: {root} does not exist (no objects under that prefix); check the URI")
    local = Path(localize(root, cache_dir))
    if not local.is_dir():
        raise DataError(f"{field_name}: folder {root} does not exist; point {field_name} at an ImageFolder root (<class>/<image>)")

    class_dirs = sorted(e.name for e in os.scandir(local) if e.is_dir() and not _is_hidden(e.name))
    if not class_dirs:
        raise DataError(f"{field_name}: {root} has no class subfolders; expected the layout {root}/<class>/<image>")
    skipped: list[tuple[str, str]] = [
        (e.path, "file outside a class folder") for e in os.scandir(local) if e.is_file() and not _is_hidden(e.name)
    ]
    candidates: list[Sample] = []
    for label, name in enumerate(class_dirs):
        n_before = len(candidates)
        for dirpath, dirnames, filenames in os.walk(local / name):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for fname in sorted(filenames):
                if _is_hidden(fname):
                    continue
                path = os.path.join(dirpath, fname)
                if os.path.splitext(fname)[1].lower() in IMAGE_EXTENSIONS:
                    candidates.append((path, label))
                else:
                    skipped.append((path, "not an image file extension"))
        if len(candidates) == n_before:
            raise DataError(f"{field_name}: class folder {local / name} has no images; remove it or add images")

    # Threads overlap file I/O (network filesystems, cold caches); PIL's parsing holds the GIL.
    # Chunks, because a future per file costs as much as the check itself.
    paths = [p for p, _ in candidates]
    chunks = [paths[i : i + 512] for i in range(0, len(paths), 512)]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        reasons = [r for chunk in pool.map(lambda ps: [_check_image(p) for p in ps], chunks) for r in chunk]
    samples: list[Sample] = []
    for (path, label), reason in zip(candidates, reasons):
        if reason is None:
            samples.append((path, label))
        elif on_bad_image == "error":
            raise DataError(
                f"{field_name}: {path}: {reason}; delete or replace the file, or set data.on_bad_image: skip"
            )
        else:
            skipped.append((path, reason))
    for label, name in enumerate(class_dirs):
        if not any(lbl == label for _, lbl in samples):
            raise DataError(f"{field_name}: class folder {local / name} has no readable images; remove it or add images")
    return FolderIndex(root=str(local), class_names=class_dirs, samples=samples, skipped=skipped)


def _by_class(samples: Sequence[Sample], num_classes: int) -> list[list[Sample]]:
    out: list[list[Sample]] = [[] for _ in range(num_classes)]
    for s in samples:
        out[s[1]].append(s)
    return out


def _rng(seed: int, purpose: str, class_name: str) -> random.Random:
    # One stream per (purpose, class): adding a class or changing max_images_per_class leaves the
    # other classes' splits unchanged. String seeds are hashed deterministically (not PYTHONHASHSEED).
    return random.Random(f"{seed}:{purpose}:{class_name}")


def _fingerprint(indexes: dict[str, FolderIndex], class_names: list[str]) -> dict[str, Any]:
    # Relative paths (every sample path starts with its root), so a dataset has the same
    # fingerprint whether it was read from a local folder or the cache copy of an s3:// prefix.
    entries = sorted(
        (f"{split}/{path[len(idx.root) + 1 :]}".replace(os.sep, "/"), os.path.getsize(path))
        for split, idx in indexes.items()
        for path, _ in idx.samples
    )
    h = hashlib.sha256()
    for rel, size in entries:
        h.update(f"{rel}\t{size}\n".encode())
    return {"class_names": list(class_names), "num_files": len(entries), "sha256": h.hexdigest()}


def plan_dataset(data: DataSpec, seed: int) -> DatasetPlan:
    """Scan data.train (and data.val), check classes, split and cap: the exact sample lists every
    worker will use. Deterministic for a given seed and folder content."""
    train_idx = scan_image_folder(data.train, data.on_bad_image, field_name="data.train", cache_dir=data.cache_dir)
    classes = train_idx.class_names
    indexes = {"train": train_idx}
    per_class = _by_class(train_idx.samples, len(classes))
    if data.val is not None:
        val_idx = scan_image_folder(data.val, data.on_bad_image, field_name="data.val", cache_dir=data.cache_dir)
        if val_idx.class_names != classes:
            missing = sorted(set(classes) - set(val_idx.class_names))
            extra = sorted(set(val_idx.class_names) - set(classes))
            raise DataError(
                f"data.val ({data.val}) and data.train ({data.train}) must have the same class folders: "
                f"missing in data.val: {missing or 'none'}; extra in data.val: {extra or 'none'}"
            )
        indexes["val"] = val_idx
        val = list(val_idx.samples)
        train_by_class = per_class
    elif data.val_fraction is not None:
        val, train_by_class = [], []
        for name, items in zip(classes, per_class):
            shuffled = items[:]
            _rng(seed, "val", name).shuffle(shuffled)
            # At least one val image per class when possible, and always at least one train image.
            n_val = min(max(1, round(len(items) * data.val_fraction)), len(items) - 1)
            val.extend(sorted(shuffled[:n_val]))
            train_by_class.append(sorted(shuffled[n_val:]))
    else:
        raise DataError("data: set data.val (a folder) or data.val_fraction (e.g. 0.1)")
    if not val:
        raise DataError(f"data.val_fraction: every class of {data.train} has a single image, so nothing is left for validation")

    train: list[Sample] = []
    for name, items in zip(classes, train_by_class):
        if data.max_images_per_class is not None and len(items) > data.max_images_per_class:
            items = sorted(_rng(seed, "cap", name).sample(items, data.max_images_per_class))
        train.extend(items)
    skipped = train_idx.skipped + (indexes["val"].skipped if "val" in indexes else [])
    val_root = indexes["val"].root if "val" in indexes else train_idx.root
    return DatasetPlan(classes, train, val, skipped, _fingerprint(indexes, classes), train_idx.root, val_root)


def _to_uint8(arr: np.ndarray, nominal_max: float | None) -> np.ndarray:
    arr = arr.astype(np.float64)
    if nominal_max is None:  # no nominal range: stretch what the image holds
        lo, hi = float(arr.min()), float(arr.max())
        nominal_max, arr = max(hi - lo, 1e-12), arr - lo
    return np.clip(np.rint(arr * (255.0 / nominal_max)), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white (transparent areas as a viewer shows them),
    16/32-bit grey scaled to 8 bits, palette/CMYK/grey converted."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(im), 65535.0)).convert("RGB")
    if im.mode in ("I", "F"):
        arr = np.asarray(im)
        nominal: float | None = None
        # 16-bit PNGs open as "I" in some Pillow versions: keep the nominal 8/16-bit range so
        # brightness means the same in every image; stretch only what fits neither.
        if im.mode == "I" and arr.size and arr.min() >= 0:
            hi = int(arr.max())
            nominal = 255.0 if hi <= 255 else 65535.0 if hi <= 65535 else None
        return Image.fromarray(_to_uint8(arr, nominal)).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr


def load_rgb(path: str) -> Image.Image:
    """Decode an image file to RGB, honouring EXIF orientation (phone photos are stored rotated)."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im) or im
        return to_rgb(im)


def resolve_data_config(model: torch.nn.Module, image_size: int | None) -> dict[str, Any]:
    """timm's preprocessing for the model (mean/std/interpolation/crop_pct); image_size overrides
    only the resolution. Saved in checkpoints so inference preprocesses identically."""
    args = {"input_size": (3, image_size, image_size)} if image_size else {}
    cfg = _timm_resolve_data_config(args, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def build_transform(
    data_config: dict[str, Any], train: bool, augment: Literal["none", "light", "randaugment"] = "light"
) -> Callable[[Image.Image], torch.Tensor]:
    """timm transform: eval = resize + centre crop by crop_pct; light = random-resized-crop
    (scale 0.5-1, gentler than ImageNet's 0.08 for small fine-tuning sets) + hflip; randaugment
    = timm's rand-m9-mstd0.5 with the ImageNet crop."""
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items()}
    if not train or augment == "none":
        return create_transform(**cfg, is_training=False)
    if augment == "light":
        return create_transform(**cfg, is_training=True, scale=(0.5, 1.0), hflip=0.5, color_jitter=None)
    if augment == "randaugment":
        return create_transform(**cfg, is_training=True, auto_augment="rand-m9-mstd0.5")
    raise ValueError(f"data.augment: unknown value {augment!r}; use none, light or randaugment")


class ImageListDataset(Dataset):
    """(image tensor, label) pairs from (path, label) samples.

    A file that passed the up-front scan can still fail to decode here (replaced or damaged on
    disk since the scan, a decoder error the scan's check does not reach). Rather than failing a
    long run inside a loader worker, such a sample is replaced by the next readable one (with its
    own label) and a counted warning names the file; only a run of `max_substitutes` unreadable
    files in a row is an error."""

    max_substitutes = 16

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any]) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.unreadable = 0  # per process: each loader worker counts its own

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        for k in range(min(len(self.samples), self.max_substitutes)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                image = load_rgb(path)
            except Exception as err:  # PIL raises many types for broken files
                self.unreadable += 1
                log.warning(
                    "skipping unreadable image %s (%s: %s), using the next sample instead "
                    "(%d unreadable so far in this loader process)", path, type(err).__name__, err, self.unreadable,
                )
                continue
            return self.transform(image), label
        raise DataError(
            f"{self.max_substitutes} images in a row from {self.samples[i][0]} on cannot be decoded; "
            "the dataset changed or is damaged since the job was checked: run `tltrain validate` on the spec"
        )


def _loader_kwargs(workers: int) -> dict[str, Any]:
    return {
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available(),
        # Re-forking workers every epoch costs seconds per epoch on small datasets.
        "persistent_workers": workers > 0,
    }


def build_train_loader(
    samples: Sequence[Sample],
    transform: Callable[[Image.Image], Any],
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    workers: int,
) -> DataLoader:
    """Shuffled, drop_last loader over this rank's shard. Call `loader.sampler.set_epoch(e)` each
    epoch for a new order (same on every run with the same seed)."""
    per_rank = len(samples) // world_size
    if per_rank < batch_size:
        raise DataError(
            f"{len(samples)} training images give each of {world_size} worker(s) {per_rank}, fewer than "
            f"scaling.batch_size_per_worker={batch_size}, so no full batch exists: lower the batch size or add images"
        )
    dataset = ImageListDataset(samples, transform)
    # A 1-replica DistributedSampler is a seeded shuffler with set_epoch, so both cases share code
    # and a 1-worker run sees the same order as it would on any machine.
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # Seeds the loader workers' torch/random/numpy (augmentation) differently per rank.
    generator = torch.Generator().manual_seed(seed * 65537 + rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, generator=generator, **_loader_kwargs(workers))


def build_eval_loader(
    samples: Sequence[Sample],
    transform: Callable[[Image.Image], Any],
    batch_size: int,
    rank: int,
    world_size: int,
    workers: int,
) -> DataLoader:
    """Rank r evaluates samples[r::world_size]: no padding or duplicates, so summed counts over
    ranks are exactly the val set (DistributedSampler would pad and skew accuracy)."""
    dataset = ImageListDataset(list(samples)[rank::world_size], transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **_loader_kwargs(workers))
