"""CPU data path: timm preprocessing for a model, train/eval transforms, and the DataLoaders.

Loaders only take `rank`/`world_size` integers; this module knows nothing else about distribution.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data import resolve_data_config as _timm_resolve_data_config
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tltrain.data.decode import load_rgb
from tltrain.data.folder import DataError, Sample
from tltrain.spec.bounds import check_batch
from tltrain.spec.schema import TORCHVISION_PREFIX

log = logging.getLogger(__name__)


def resolve_data_config(model: torch.nn.Module, image_size: int | None, model_name: str = "") -> dict[str, Any]:
    """The model's eval preprocessing (mean/std/interpolation/crop_pct); image_size overrides only
    the resolution. timm models: timm's pretrained config; torchvision models (model_name
    `torchvision:<name>`): their weights' own transforms. Saved in checkpoints so inference
    preprocesses identically."""
    if model_name.startswith(TORCHVISION_PREFIX):
        config = _torchvision_data_config(model_name[len(TORCHVISION_PREFIX) :], image_size)
        if config is not None:
            return config
    args = {"input_size": (3, image_size, image_size)} if image_size else {}
    cfg = _timm_resolve_data_config(args, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def _torchvision_data_config(name: str, image_size: int | None) -> dict[str, Any] | None:
    """timm's data_config keys for a torchvision model's DEFAULT weights' ImageClassification
    transform: resize the short side to resize_size, centre-crop crop_size (timm's eval transform
    does exactly this with crop_pct = crop / resize)."""
    import torchvision

    try:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):  # an architecture without published weights
        return None
    crop, resize = int(preset.crop_size[0]), int(preset.resize_size[0])
    crop_pct = crop / resize
    while math.floor(crop / crop_pct) < resize:  # timm floors crop / crop_pct: keep it at resize
        crop_pct = math.nextafter(crop_pct, 0.0)
    size = image_size or crop
    return {
        "input_size": [3, size, size],
        "interpolation": str(preset.interpolation.value),
        "mean": [float(v) for v in preset.mean],
        "std": [float(v) for v in preset.std],
        "crop_pct": crop_pct,
        "crop_mode": "center",
    }


def build_transform(
    data_config: dict[str, Any], train: bool, augment: Literal["none", "light", "randaugment"] = "light"
) -> Callable[[Image.Image], torch.Tensor]:
    """timm transform: eval = resize + centre crop by crop_pct; light = random-resized-crop
    (scale 0.5-1, gentler than ImageNet's 0.08 for small fine-tuning sets) + hflip; randaugment
    = timm's rand-m9-mstd0.5 with the ImageNet crop."""
    cfg: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items()}
    if not train or augment == "none":
        return create_transform(**cfg, is_training=False)
    if augment == "light":
        # timm handles color_jitter=None (no jitter), but its type hint leaves None out.
        return create_transform(**cfg, is_training=True, scale=(0.5, 1.0), hflip=0.5, color_jitter=None)  # type: ignore[arg-type]
    if augment == "randaugment":
        return create_transform(**cfg, is_training=True, auto_augment="rand-m9-mstd0.5")
    raise ValueError(f"data.augment: unknown value {augment!r}; use none, light or randaugment")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: a function of nothing else, so a resumed
    run (fresh loader workers, any worker count) draws exactly the crops and flips an uninterrupted
    run would. (String seeds hash deterministically, as data/folder.py's split streams do.)"""
    return random.Random(f"augment:{seed}:{epoch}:{index}").getrandbits(63)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Python, numpy and torch RNGs (what timm/torchvision transforms draw from) seeded for one
    sample, and restored after it: with loader_workers 0 this runs in the training process, whose
    own torch stream (dropout) must not move. A loader worker process has no other use for its RNGs,
    so it skips the save and restore (the per-image cost stays a reseed)."""
    in_process = torch.utils.data.get_worker_info() is None
    if in_process:
        states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        if in_process:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])


class EpochSampler(DistributedSampler):  # items are (epoch, index), not ints
    """DistributedSampler whose items are (epoch, index): the dataset seeds each sample's
    augmentation from them (`sample_seed`). set_epoch reshuffles as usual."""

    def __iter__(self) -> Iterator[Any]:  # yields (epoch, index) keys, not ints
        return ((self.epoch, i) for i in super().__iter__())


class ImageListDataset(Dataset):
    """(image tensor, label) pairs from (path, label) samples.

    A file that passed the up-front scan can still fail to decode here (replaced or damaged on
    disk since the scan, a decoder error the scan's check does not reach). Rather than failing a
    long run inside a loader worker, such a sample is replaced by the next readable one (with its
    own label) and a counted warning names the file; only a run of `max_substitutes` unreadable
    files in a row is an error.

    Keys are an index, or (epoch, index) from EpochSampler: then the transform runs under
    `sample_seed(seed, epoch, index)`."""

    max_substitutes = 16

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any], seed: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.unreadable = 0  # per process: each loader worker counts its own

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        for k in range(min(len(self.samples), self.max_substitutes)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                image = load_rgb(path)
            except Exception as err:  # PIL raises many types for broken files
                self.unreadable += 1
                log.warning(
                    "skipping unreadable image %s (%s: %s), using the next sample instead "
                    "(%d unreadable so far in this loader process)",
                    path,
                    type(err).__name__,
                    err,
                    self.unreadable,
                )
                continue
            if epoch is None:
                return self.transform(image), label
            with _seeded(sample_seed(self.seed, epoch, i)):
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
    check_batch(len(samples), world_size, batch_size)
    dataset = ImageListDataset(samples, transform, seed)
    # A 1-replica DistributedSampler is a seeded shuffler with set_epoch, so both cases share code
    # and a 1-worker run sees the same order as it would on any machine. Its (epoch, index) items
    # seed each sample's augmentation (sample_seed).
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # Seeds the loader workers' own RNGs; augmentation does not draw from them (see _seeded).
    generator = torch.Generator().manual_seed(seed * 65537 + rank)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, generator=generator, **_loader_kwargs(workers)
    )


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
