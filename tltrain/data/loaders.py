"""CPU data path: timm preprocessing for a model, train/eval transforms, and the DataLoaders.

Loaders only take `rank`/`world_size` integers; this module knows nothing else about distribution.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, cast

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data import resolve_data_config as _timm_resolve_data_config
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms as T

from tltrain.data.decode import load_rgb
from tltrain.data.folder import DataError, Sample
from tltrain.data.orientation import dihedral_view
from tltrain.spec.bounds import check_batch
from tltrain.spec.schema import TORCHVISION_PREFIX, DataSpec

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


# The random-resized-crop area range of data.augment light (data.crop_scale null): gentler than
# ImageNet's 0.08-1 (timm's, kept for randaugment / trivialaugment), since a small fine-tuning set
# loses too much of each object at 8%. The device paths use the same constant.
LIGHT_SCALE = (0.5, 1.0)
IMAGENET_SCALE = (0.08, 1.0)
_DEFAULT_DATA = DataSpec(train="")  # DataSpec's defaults: augment light, orientation natural, ...


class RandomDihedral:
    """One of the 8 flips / quarter turns of a CHW tensor, uniformly (`k` forces one view, for
    tests). Draws from torch's RNG, which `_seeded` seeds per sample like timm's own ops, so a
    resumed run draws the same views."""

    def __init__(self, k: int | None = None) -> None:
        self.k = k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k if self.k is not None else int(torch.randint(8, ()).item())
        return dihedral_view(x, k)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k})"


def train_crop_scale(data: DataSpec) -> tuple[float, float]:
    """data.crop_scale, or the augment's default (light 0.5-1; randaugment / trivialaugment 0.08-1)."""
    if data.crop_scale is not None:
        return (float(data.crop_scale[0]), float(data.crop_scale[1]))
    return LIGHT_SCALE if data.augment == "light" else IMAGENET_SCALE


def build_transform(
    data_config: dict[str, Any], train: bool, data: DataSpec | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """timm-based transform for the model's data_config; `data` (None = DataSpec's defaults) picks
    the training augmentation. Eval (train False) is always timm's resize + centre crop by crop_pct,
    whatever `data` says: the val / test scores and the registered model see the same pixels.

    Training, by data.augment: none = the eval transform; light = random-resized-crop + hflip;
    randaugment = that + timm's rand-m9-mstd0.5; trivialaugment = that + torchvision's
    TrivialAugmentWide (timm has no TrivialAugment: timm's pipeline is built in its three stages
    and the op goes where timm puts its own auto-augment, between the crop/flip and ToTensor, on the
    PIL image). The crop's area range is data.crop_scale (`train_crop_scale`). Then, on the
    normalized CHW tensor: random erasing (timm's RandomErasing, per-pixel noise, one box, with
    probability data.random_erasing: what timm's re_prob adds, appended here for every augment so
    `none` gets it too), and with data.orientation dihedral a `RandomDihedral` view last; timm's own
    hflip is off then, since the 8 views already include the mirror (keeping it would make
    mirrored views twice as likely as the others). Dihedral views need a square input size."""
    data = data or _DEFAULT_DATA
    cfg: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items()}
    if not train:
        return create_transform(**cfg, is_training=False)
    dihedral = data.orientation == "dihedral"
    if dihedral and cfg["input_size"][-1] != cfg["input_size"][-2]:
        raise DataError(
            f"data.orientation dihedral needs a square input size (quarter turns), the model's is "
            f"{cfg['input_size'][-2]}x{cfg['input_size'][-1]}: set data.image_size"
        )
    hflip = 0.0 if dihedral else 0.5
    # No colour jitter: timm turns it off under its auto-augment anyway, and handles None (its type
    # hint leaves None out, hence the dict).
    common: dict[str, Any] = {
        "is_training": True,
        "scale": train_crop_scale(data),
        "hflip": hflip,
        "color_jitter": None,
    }
    if data.augment == "none":
        steps = list(cast(T.Compose, create_transform(**cfg, is_training=False)).transforms)
    elif data.augment == "light":
        steps = list(cast(T.Compose, create_transform(**cfg, **common)).transforms)
    elif data.augment == "randaugment":
        steps = list(cast(T.Compose, create_transform(**cfg, **common, auto_augment="rand-m9-mstd0.5")).transforms)
    elif data.augment == "trivialaugment":
        stages = cast(tuple[T.Compose, T.Compose, T.Compose], create_transform(**cfg, **common, separate=True))
        steps = [*stages[0].transforms, T.TrivialAugmentWide(), *stages[1].transforms, *stages[2].transforms]
    else:
        raise ValueError(
            f"data.augment: unknown value {data.augment!r}; use none, light, randaugment or trivialaugment"
        )
    if data.random_erasing > 0:
        steps.append(RandomErasing(data.random_erasing, mode="pixel", max_count=1, device="cpu"))
    if dihedral:
        steps.append(RandomDihedral())
    return T.Compose(steps)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: a function of nothing else, so a resumed
    run (fresh loader workers, any worker count) draws exactly the crops and flips an uninterrupted
    run would. (String seeds hash deterministically, as data/folder.py's split streams do.)
    `index`: the image's index (shuffle sampler, each image once an epoch) or the draw's position
    in the epoch (balanced sampler, where one image can be drawn twice and gets two crops)."""
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


class BalancedEpochSampler(Sampler):
    """data.sampler balanced: every class equally often, whatever its image count.

    Each epoch makes `num_replicas * per_rank` draws (per_rank = len(labels) // num_replicas, the
    shuffle sampler's drop_last count, so an epoch has as many steps as with shuffle); a draw picks
    a class uniformly, then one of its images uniformly, with replacement. The draws come from a
    generator seeded by (seed, epoch) alone, identical on every rank and on a resumed run; rank r
    takes draws[r::num_replicas], so every rank gets the same number of batches (DDP needs that).
    Only classes with a training image are drawn.

    keyed=True (the CPU ImageListDataset) yields (epoch, index, draw position) keys: each draw's
    augmentation is seeded from its position, so an image drawn twice gets two different crops;
    keyed=False (the device paths, which seed augmentation per batch) yields plain indices."""

    def __init__(self, labels: Sequence[int], num_replicas: int, rank: int, seed: int, *, keyed: bool = True) -> None:
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(int(y), []).append(i)
        groups = [by_class[c] for c in sorted(by_class)]
        self._flat = torch.tensor([i for g in groups for i in g], dtype=torch.int64)
        self._sizes = torch.tensor([len(g) for g in groups], dtype=torch.int64)
        self._starts = torch.cumsum(self._sizes, 0) - self._sizes
        self.num_replicas, self.rank, self.seed, self.keyed = num_replicas, rank, seed, keyed
        self.per_rank = len(labels) // num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def draws(self) -> torch.Tensor:
        """This epoch's draws on all ranks: dataset indices, [num_replicas * per_rank]."""
        g = torch.Generator().manual_seed(random.Random(f"balanced:{self.seed}:{self.epoch}").getrandbits(63))
        total = self.num_replicas * self.per_rank
        cls = torch.randint(len(self._sizes), (total,), generator=g)
        offset = (torch.rand(total, generator=g, dtype=torch.float64) * self._sizes[cls]).long()
        return self._flat[self._starts[cls] + torch.minimum(offset, self._sizes[cls] - 1)]

    def __iter__(self) -> Iterator[Any]:  # (epoch, index, position) keys, or ints when not keyed
        mine = self.draws()[self.rank :: self.num_replicas].tolist()
        positions = range(self.rank, self.num_replicas * self.per_rank, self.num_replicas)
        if not self.keyed:
            return iter(mine)
        return ((self.epoch, i, pos) for i, pos in zip(mine, positions))


class ImageListDataset(Dataset):
    """(image tensor, label) pairs from (path, label) samples.

    A file that passed the up-front scan can still fail to decode here (replaced or damaged on
    disk since the scan, a decoder error the scan's check does not reach). Rather than failing a
    long run inside a loader worker, such a sample is replaced by the next readable one (with its
    own label) and a counted warning names the file; only a run of `max_substitutes` unreadable
    files in a row is an error.

    Keys are an index, or (epoch, index) from EpochSampler: then the transform runs under
    `sample_seed(seed, epoch, index)`; or (epoch, index, position) from BalancedEpochSampler: then
    under `sample_seed(seed, epoch, position)`, one seed per draw."""

    max_substitutes = 16

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Any], seed: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.unreadable = 0  # per process: each loader worker counts its own

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, int, int]) -> tuple[Any, int]:
        epoch: int | None = None
        if isinstance(key, tuple):
            epoch, i = key[0], key[1]
            draw = key[2] if len(key) == 3 else i
        else:
            i = draw = key
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
            with _seeded(sample_seed(self.seed, epoch, draw)):
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
    sampler: Literal["shuffle", "balanced"] = "shuffle",
) -> DataLoader:
    """drop_last loader over this rank's share: `sampler` shuffle = each image once an epoch
    (`EpochSampler`), balanced = classes drawn equally often (`BalancedEpochSampler`, as many steps).
    Call `loader.sampler.set_epoch(e)` each epoch for a new order (same on every run with the same
    seed)."""
    check_batch(len(samples), world_size, batch_size)
    dataset = ImageListDataset(samples, transform, seed)
    # A 1-replica DistributedSampler is a seeded shuffler with set_epoch, so both cases share code
    # and a 1-worker run sees the same order as it would on any machine. Its (epoch, index) items
    # seed each sample's augmentation (sample_seed).
    order: Sampler
    if sampler == "balanced":
        order = BalancedEpochSampler([y for _, y in dataset.samples], world_size, rank, seed)
    elif sampler == "shuffle":
        order = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    else:
        raise ValueError(f"data.sampler: unknown value {sampler!r}; use shuffle or balanced")
    # Seeds the loader workers' own RNGs; augmentation does not draw from them (see _seeded).
    generator = torch.Generator().manual_seed(seed * 65537 + rank)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=order, drop_last=True, generator=generator, **_loader_kwargs(workers)
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


def build_target_loader(
    paths: Sequence[str],
    transform: Callable[[Image.Image], Any],
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    workers: int,
) -> DataLoader:
    """data.target_unlabelled's images (label -1) for one rank: the train loader's seeded shuffle
    and per-image augmentation seeds (under its own seed stream, so target crops never repeat the
    source's), drop_last so every rank's batch has the same shape. The caller cycles it
    (core/domain.target_batches) with set_epoch keys of its own."""
    return build_train_loader([(p, -1) for p in paths], transform, batch_size, rank, world_size,
                              seed + 7919, workers)  # fmt: skip
