"""Real datasets that ship inside OS/PyPI packages, written out as ImageFolder trees of PNGs.

They give the demo, the examples and the tests real images without network access:
`<out_dir>/train/<class>/<index>.png` and `<out_dir>/val/<class>/<index>.png` (and, for domain
adaptation, `materialize_fashion_shift`'s source / unlabelled target / target val / target test trees).
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Folder names users can read in a confusion matrix (the upstream labels are 0..9).
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)  # fmt: skip
_MARKER = ".tltrain-complete.json"  # hidden, so the ImageFolder scan ignores it


class PackagedDataError(FileNotFoundError):
    """A packaged dataset is not installed; the message says which package to install."""


def _read_idx(path: Path) -> np.ndarray:
    # IDX format: 2 zero bytes, dtype code, ndim, then ndim big-endian uint32 sizes, then data.
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _pick_per_class(labels: np.ndarray, per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of `per_class` seeded picks from every class (all when None), sorted for stable output."""
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if per_class is not None:
            if per_class > len(idx):
                raise ValueError(f"class {c} has only {len(idx)} images; asked for {per_class}")
            idx = rng.permutation(idx)[:per_class]
        picks.append(np.sort(idx))
    return np.concatenate(picks)


def _write_split(
    images: np.ndarray, labels: np.ndarray, indices: np.ndarray, classes: tuple[str, ...], split_dir: Path
) -> None:
    for name in classes:
        (split_dir / name).mkdir(parents=True, exist_ok=True)
    for i in indices:
        # compress_level=1: these tiny PNGs are written once and read many times; zlib effort is wasted.
        Image.fromarray(images[i]).save(split_dir / classes[labels[i]] / f"{i:05d}.png", compress_level=1)


def _materialize(out_dir: str, params: dict, write) -> tuple[str, str]:
    out = Path(out_dir).expanduser().absolute()
    train_dir, val_dir, marker = out / "train", out / "val", out / _MARKER
    # Idempotent: the marker is written last and records the parameters, so a half-written or
    # differently-sized tree is rebuilt instead of silently reused.
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return str(train_dir), str(val_dir)
    marker.unlink(missing_ok=True)
    for d in (train_dir, val_dir):
        shutil.rmtree(d, ignore_errors=True)
    write(train_dir, val_dir)
    marker.write_text(json.dumps(params))
    return str(train_dir), str(val_dir)


def _fashion_files() -> dict[str, tuple[Path, Path]]:
    """(images, labels) IDX files of the Debian package's train and t10k splits."""
    files = {
        split: (
            FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte.gz",
            FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte.gz",
        )
        for split in ("train", "t10k")
    }
    missing = [str(p) for pair in files.values() for p in pair if not p.is_file()]
    if missing:
        raise PackagedDataError(
            f"Fashion-MNIST files not found ({', '.join(missing)}): install them with "
            "`apt-get install dataset-fashion-mnist`"
        )
    return files


def materialize_fashion_mnist(out_dir: str, train_per_class: int, val_per_class: int, seed: int = 0) -> tuple[str, str]:
    """Fashion-MNIST (Debian `dataset-fashion-mnist`) as ImageFolder PNGs: train picks from the
    train file, val from the t10k file, `*_per_class` seeded picks per class. Returns (train_dir, val_dir)."""
    files = _fashion_files()
    params = {
        "dataset": "fashion-mnist",
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
    }

    def write(train_dir: Path, val_dir: Path) -> None:
        rng = np.random.default_rng(seed)
        for (images_path, labels_path), per_class, split_dir in (
            (files["train"], train_per_class, train_dir),
            (files["t10k"], val_per_class, val_dir),
        ):
            images, labels = _read_idx(images_path), _read_idx(labels_path)
            _write_split(images, labels, _pick_per_class(labels, per_class, rng), FASHION_MNIST_CLASSES, split_dir)

    return _materialize(out_dir, params, write)


def materialize_digits(
    out_dir: str, train_per_class: int | None = None, val_per_class: int = 30, seed: int = 0
) -> tuple[str, str]:
    """scikit-learn's 8x8 digits (~180 per class) as ImageFolder PNGs, split per class with a seed:
    `val_per_class` to val, then `train_per_class` (None = the rest) to train."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise PackagedDataError("the digits dataset needs scikit-learn: `pip install scikit-learn`") from err
    params = {"dataset": "digits", "train_per_class": train_per_class, "val_per_class": val_per_class, "seed": seed}
    classes = tuple(str(d) for d in range(10))

    def write(train_dir: Path, val_dir: Path) -> None:
        digits = load_digits()
        images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # values are 0..16
        labels = digits.target
        rng = np.random.default_rng(seed)
        train_idx, val_idx = [], []
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(labels == c))
            val_idx.append(idx[:val_per_class])
            rest = idx[val_per_class:]
            train_idx.append(rest if train_per_class is None else rest[:train_per_class])
        _write_split(images, labels, np.sort(np.concatenate(train_idx)), classes, train_dir)
        _write_split(images, labels, np.sort(np.concatenate(val_idx)), classes, val_dir)

    return _materialize(out_dir, params, write)


# Shifts of the target domain (the labels do not move): invert = 255 - x, white garments turned
# dark on a light ground; rotate = a quarter turn. Both cost a source-only model most of its
# accuracy while every garment stays as recognisable to a model that saw the shifted domain.
FASHION_SHIFTS = ("invert", "rotate")


def _shift(images: np.ndarray, shift: str) -> np.ndarray:
    if shift == "invert":
        return 255 - images
    if shift == "rotate":
        return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2)))
    raise ValueError(f"unknown shift {shift!r}; use one of {', '.join(FASHION_SHIFTS)}")


def materialize_fashion_shift(
    out_dir: str,
    train_per_class: int,
    target_per_class: int,
    val_per_class: int,
    seed: int = 0,
    shift: str = "invert",
    test_per_class: int = 0,
) -> tuple[str, str, str, str | None]:
    """A domain-shift task from Fashion-MNIST: labelled source images (`source_train/<class>/`),
    unlabelled target images (`target_unlabelled/`, a flat folder: no labels anywhere in it) and
    labelled target images for validation (`target_val/<class>/`), the target ones `shift`ed.
    Source and target train images are disjoint picks of the train file; target val comes from
    the t10k file, and with `test_per_class` a held-out `target_test/<class>/` too (other t10k
    images than val's; the val picks are the same with or without it).
    Returns (source_train_dir, target_unlabelled_dir, target_val_dir, target_test_dir or None)."""
    _shift(np.zeros((1, 2, 2), np.uint8), shift)  # refuse an unknown shift before writing anything
    files = _fashion_files()
    out = Path(out_dir).expanduser().absolute()
    dirs = out / "source_train", out / "target_unlabelled", out / "target_val"
    test_dir = out / "target_test"
    params = {"dataset": "fashion-mnist-shift", "shift": shift, "train_per_class": train_per_class,
              "target_per_class": target_per_class, "val_per_class": val_per_class, "seed": seed}  # fmt: skip
    if test_per_class:
        params["test_per_class"] = test_per_class
    marker = out / _MARKER
    made = (str(dirs[0]), str(dirs[1]), str(dirs[2]), str(test_dir) if test_per_class else None)
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return made
    marker.unlink(missing_ok=True)
    for d in (*dirs, test_dir):
        shutil.rmtree(d, ignore_errors=True)
    rng = np.random.default_rng(seed)
    images, labels = _read_idx(files["train"][0]), _read_idx(files["train"][1])
    picks = _pick_per_class(labels, train_per_class + target_per_class, rng)
    by_class = [rng.permutation(picks[labels[picks] == c]) for c in np.unique(labels)]
    source = np.sort(np.concatenate([idx[:train_per_class] for idx in by_class]))
    target = np.sort(np.concatenate([idx[train_per_class:] for idx in by_class]))
    _write_split(images, labels, source, FASHION_MNIST_CLASSES, dirs[0])
    dirs[1].mkdir(parents=True)
    shifted = _shift(images[target], shift)
    for i, image in zip(target, shifted):
        Image.fromarray(image).save(dirs[1] / f"{i:05d}.png", compress_level=1)
    val_images, val_labels = _read_idx(files["t10k"][0]), _read_idx(files["t10k"][1])
    val = _pick_per_class(val_labels, val_per_class, rng)
    if test_per_class:  # drawn after val, from the t10k images val did not take
        rest = np.setdiff1d(np.arange(len(val_labels)), val)
        test = np.sort(rest[_pick_per_class(val_labels[rest], test_per_class, rng)])
    val_images = val_images.copy()
    val_images[val] = _shift(val_images[val], shift)
    _write_split(val_images, val_labels, val, FASHION_MNIST_CLASSES, dirs[2])
    if test_per_class:
        val_images[test] = _shift(val_images[test], shift)
        _write_split(val_images, val_labels, test, FASHION_MNIST_CLASSES, test_dir)
    marker.write_text(json.dumps(params))
    return made
