"""ImageFolder datasets: scan and check a tree, split test/train/val, fingerprint: the exact sample
lists every worker will use (and the held-out test split scored once at the end).

`plan_dataset` runs on the driver before any Ray worker starts, so a bad folder fails the job in
seconds with a message naming the file and the fix. Remote roots (s3://) are read through a
`localize` function the caller passes (storage.localizer): this package never talks to storage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from tltrain.spec.schema import DataSpec

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
    # The held-out test split (data.test or data.test_fraction; empty without either): never in
    # train or val. test_root is the folder its paths start with ("" without a test split).
    test: list[Sample] = field(default_factory=list)
    test_root: str = ""


def local_root(uri: str) -> str:
    """The default `localize`: a local folder as an absolute path; a URI needs the caller's."""
    if "://" in uri:
        raise DataError(f"{uri} is a URI: reading it needs a localize function (storage.localizer)")
    return str(Path(uri).expanduser().absolute())


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


def _walk_images(top: Path, skipped: list[tuple[str, str]]) -> list[str]:
    """Image files under `top` in sorted walk order, hidden entries left out; other files are
    appended to `skipped` with the reason."""
    images: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for fname in sorted(filenames):
            if _is_hidden(fname):
                continue
            path = os.path.join(dirpath, fname)
            if os.path.splitext(fname)[1].lower() in IMAGE_EXTENSIONS:
                images.append(path)
            else:
                skipped.append((path, "not an image file extension"))
    return images


def _readable(
    paths: list[str], on_bad_image: Literal["error", "skip"], field_name: str, skipped: list[tuple[str, str]]
) -> list[bool]:
    """Whether each file decodes: a bad one raises DataError under "error", else joins `skipped`."""
    # Threads overlap file I/O (network filesystems, cold caches); PIL's parsing holds the GIL.
    # Chunks, because a future per file costs as much as the check itself.
    chunks = [paths[i : i + 512] for i in range(0, len(paths), 512)]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        reasons = [r for chunk in pool.map(lambda ps: [_check_image(p) for p in ps], chunks) for r in chunk]
    for path, reason in zip(paths, reasons):
        if reason is not None and on_bad_image == "error":
            raise DataError(
                f"{field_name}: {path}: {reason}; delete or replace the file, or set data.on_bad_image: skip"
            )
        if reason is not None:
            skipped.append((path, reason))
    return [reason is None for reason in reasons]


def scan_image_folder(
    root: str,
    on_bad_image: Literal["error", "skip"] = "error",
    *,
    field_name: str = "data.train",
    localize: Callable[[str], str] = local_root,
) -> FolderIndex:
    """Index an ImageFolder tree `<root>/<class>/<image>` (class folders may nest subfolders).

    `field_name` is the spec field the root came from, so errors point at what to edit;
    `localize(root)` gives the local directory to scan (a cache copy for remote roots).
    """
    try:
        local = Path(localize(root))
    except FileNotFoundError as err:
        raise DataError(f"{field_name}: {err}") from None
    if not local.is_dir():
        raise DataError(
            f"{field_name}: folder {root} does not exist; point {field_name} at an ImageFolder root (<class>/<image>)"
        )

    class_dirs = sorted(e.name for e in os.scandir(local) if e.is_dir() and not _is_hidden(e.name))
    if not class_dirs:
        raise DataError(f"{field_name}: {root} has no class subfolders; expected the layout {root}/<class>/<image>")
    skipped: list[tuple[str, str]] = [
        (e.path, "file outside a class folder") for e in os.scandir(local) if e.is_file() and not _is_hidden(e.name)
    ]
    candidates: list[Sample] = []
    for label, name in enumerate(class_dirs):
        images = _walk_images(local / name, skipped)
        if not images:
            raise DataError(f"{field_name}: class folder {local / name} has no images; remove it or add images")
        candidates += [(path, label) for path in images]
    readable = _readable([p for p, _ in candidates], on_bad_image, field_name, skipped)
    samples = [s for s, ok in zip(candidates, readable) if ok]
    for label, name in enumerate(class_dirs):
        if not any(lbl == label for _, lbl in samples):
            raise DataError(
                f"{field_name}: class folder {local / name} has no readable images; remove it or add images"
            )
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


def stratified_sample(samples: Sequence[Sample], class_names: list[str], per_class: int, seed: int) -> list[Sample]:
    """Up to `per_class` samples of each class (`tltrain rank`'s forward-only sample), one seeded
    stream per class name as the splits use: the same sample every run, and a class's draw does not
    move when another class is added or changes."""
    out: list[Sample] = []
    for y, items in enumerate(_by_class(samples, len(class_names))):
        out += _rng(seed, "rank", class_names[y]).sample(sorted(items), min(per_class, len(items)))
    return out


def fingerprint(indexes: dict[str, FolderIndex], class_names: list[str]) -> dict[str, Any]:
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


def _scan_like_train(
    data: DataSpec, root: str, field_name: str, classes: list[str], localize: Callable[[str], str]
) -> FolderIndex:
    """A data.val / data.test folder: scanned like data.train, with the same class folders (the
    labels are folder positions, so any difference would silently mislabel images)."""
    idx = scan_image_folder(root, data.on_bad_image, field_name=field_name, localize=localize)
    if idx.class_names != classes:
        missing = sorted(set(classes) - set(idx.class_names))
        extra = sorted(set(idx.class_names) - set(classes))
        raise DataError(
            f"{field_name} ({root}) and data.train ({data.train}) must have the same class folders: "
            f"missing in {field_name}: {missing or 'none'}; extra in {field_name}: {extra or 'none'}"
        )
    return idx


def _hold_out_test(
    data: DataSpec, fraction: float, seed: int, classes: list[str], per_class: list[list[Sample]]
) -> tuple[list[Sample], list[list[Sample]]]:
    """(test samples, what is left of each class): max(1, round(n * fraction)) images per class,
    from its own seeded stream. Drawn before the val split and the cap, so the test split depends
    only on the folder content, split_seed and test_fraction: changing val_fraction,
    max_images_per_class or loop.seed (or searching them) never moves an image into or out of it."""
    # What must stay behind: a train image, plus a val image when val comes out of train too.
    keep = 2 if data.val is None and data.val_fraction is not None else 1
    test: list[Sample] = []
    rest: list[list[Sample]] = []
    for name, items in zip(classes, per_class):
        n_test = max(1, round(len(items) * fraction))
        if len(items) - n_test < keep:
            raise DataError(
                f"data.test_fraction: class {name} of {data.train} has {len(items)} image(s); holding out "
                f"{n_test} for the test split leaves fewer than {keep} for {'train and val' if keep == 2 else 'train'}: "
                "add images, or set data.test to a separate folder"
            )
        shuffled = items[:]
        _rng(seed, "test", name).shuffle(shuffled)
        held = set(shuffled[:n_test])
        test.extend(sorted(held))
        rest.append([s for s in items if s not in held])  # the scan's order, as without a test split
    return test, rest


def plan_dataset(data: DataSpec, seed: int, localize: Callable[[str], str] = local_root) -> DatasetPlan:
    """Scan data.train (and data.val, data.test), check classes, split and cap: the exact sample
    lists every worker will use, and the held-out test split. Deterministic for a given seed and
    folder content. Order: the test split first (data.test, or data.test_fraction of data.train),
    then val from what is left (data.val_fraction), then the train cap."""
    train_idx = scan_image_folder(data.train, data.on_bad_image, field_name="data.train", localize=localize)
    classes = train_idx.class_names
    indexes = {"train": train_idx}
    per_class = _by_class(train_idx.samples, len(classes))
    test: list[Sample] = []
    test_root = ""
    if data.test is not None:
        indexes["test"] = _scan_like_train(data, data.test, "data.test", classes, localize)
        test, test_root = list(indexes["test"].samples), indexes["test"].root
    elif data.test_fraction is not None:
        test, per_class = _hold_out_test(data, data.test_fraction, seed, classes, per_class)
        test_root = train_idx.root
    if data.val is not None:
        val_idx = _scan_like_train(data, data.val, "data.val", classes, localize)
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
        raise DataError(
            f"data.val_fraction: every class of {data.train} has a single image, so nothing is left for validation"
        )

    train: list[Sample] = []
    for name, items in zip(classes, train_by_class):
        if data.max_images_per_class is not None and len(items) > data.max_images_per_class:
            items = sorted(_rng(seed, "cap", name).sample(items, data.max_images_per_class))
        train.extend(items)
    skipped = [s for idx in indexes.values() for s in idx.skipped]  # train, then test, then val
    val_root = indexes["val"].root if "val" in indexes else train_idx.root
    return DatasetPlan(
        classes, train, val, skipped, fingerprint(indexes, classes), train_idx.root, val_root, test, test_root
    )


@dataclass
class UnlabelledIndex:
    """data.target_unlabelled: every readable image under a root, recursively, sorted."""

    root: str  # the local directory scanned (the cache copy for s3:// roots)
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # num_files, sha256 of sorted (relative path, size)


def scan_unlabelled(
    root: str,
    on_bad_image: Literal["error", "skip"] = "error",
    *,
    field_name: str = "data.target_unlabelled",
    localize: Callable[[str], str] = local_root,
) -> UnlabelledIndex:
    """Index a folder of images without labels (any layout, recursively), each file checked as the
    training scan checks it; hidden files and non-image extensions are skipped."""
    try:
        local = Path(localize(root))
    except FileNotFoundError as err:
        raise DataError(f"{field_name}: {err}") from None
    if not local.is_dir():
        raise DataError(f"{field_name}: folder {root} does not exist; point it at a folder of images")
    skipped: list[tuple[str, str]] = []
    candidates = _walk_images(local, skipped)
    if not candidates:
        raise DataError(
            f"{field_name}: {root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}, searched recursively)"
        )
    readable = _readable(candidates, on_bad_image, field_name, skipped)
    paths = [p for p, ok in zip(candidates, readable) if ok]
    if not paths:
        raise DataError(f"{field_name}: none of the {len(candidates)} image files under {root} can be read")
    h = hashlib.sha256()
    for rel, size in sorted((p[len(str(local)) + 1 :].replace(os.sep, "/"), os.path.getsize(p)) for p in paths):
        h.update(f"{rel}\t{size}\n".encode())
    fp = {"num_files": len(paths), "sha256": h.hexdigest()}
    return UnlabelledIndex(root=str(local), paths=paths, skipped=skipped, fingerprint=fp)


def hold_out(samples: Sequence[Sample], class_names: list[str], fraction: float, seed: int, purpose: str
             ) -> tuple[list[Sample], list[Sample]]:  # fmt: skip
    """(held, rest): a seeded per-class share of `samples` (at least one per class, never a class's
    last image), one stream per (purpose, class) as the val split draws."""
    held: list[Sample] = []
    rest: list[Sample] = []
    for name, items in zip(class_names, _by_class(samples, len(class_names))):
        shuffled = sorted(items)
        _rng(seed, purpose, name).shuffle(shuffled)
        n = min(max(1, round(len(items) * fraction)), len(items) - 1)
        held.extend(sorted(shuffled[:n]))
        rest.extend(sorted(shuffled[n:]))
    return held, rest
