"""`tltrain prepare`: decode and resize every image once into a few large uint8 .npy shards.

Training then reads these shards (`data.format: shards`, `data.prepared: <uri>`) and does its
random crops on the GPU, so loader CPUs slice arrays instead of decoding JPEGs every epoch.

Layout of a prepared directory (local or s3://; `index.json` is written last, so a directory
without it is incomplete and never read):

    train-00000.npy ...   uint8 [n, S, S, 3]: each image of data.train, shorter side resized to
                          S = floor(image_size / crop_pct) by the CPU eval transform's own Resize,
                          the centre square kept (see prepare_image)
    val-00000.npy ...     the same for data.val (when the spec has a val folder)
    index.json            format, version, geometry (input_size, crop_pct, crop_mode, interpolation),
                          class_names, the dataset fingerprint, and per split: relative paths,
                          labels, shard files, rows per shard

Every image of each folder is stored (max_images_per_class and val_fraction are applied at training
time by path), so one prepared copy serves any split, cap or seed of the same files; a change to
the files, classes, model preprocessing or image_size is detected and asks for a re-run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np

from tltrain.spec.metrics import IMG_PER_S
from tltrain.spec.schema import JobSpec, SpecError, expand_path

# torch, timm, PIL and boto3 load inside the functions that need them: the CLI imports this module
# for `add_commands`, and `tltrain --help` or `tltrain jobs` should not pay seconds for them.
Sample = tuple[str, int]

DEFAULT_SHARD_BYTES = 1 << 30


def eval_resize(data_config: dict[str, Any]) -> Callable[[Any], Any]:
    """The resize step of the CPU eval transform (timm's own object), applied by `tltrain prepare`."""
    import torchvision.transforms as T

    from tltrain.data.folder import DataError
    from tltrain.data.loaders import build_transform

    steps = cast(T.Compose, build_transform(data_config, False)).transforms  # timm returns a Compose
    if not (isinstance(steps[0], T.Resize) and isinstance(steps[1], T.CenterCrop)):
        raise DataError(
            f"data.format shards supports the centre-crop and squash eval transforms; this model's is {steps[:2]} "
            "(crop_mode border?): use data.format imagefolder"
        )
    return steps[0]


def prepare_image(path: str, resize: Callable[[Any], Any], image_size: int, size: int) -> np.ndarray:
    """Decode one image as the CPU path does, resize like its eval transform, keep the centre square.

    The square's offset is chosen so that its own centre `image_size` crop is exactly the CPU eval
    transform's centre crop of the whole resized image.
    """
    from tltrain.data.decode import load_rgb
    from tltrain.data.device import center_offset
    from tltrain.data.folder import DataError

    im = resize(load_rgb(path))
    w, h = im.size
    top = min(max(center_offset(h, image_size) - center_offset(size, image_size), 0), h - size)
    left = min(max(center_offset(w, image_size) - center_offset(size, image_size), 0), w - size)
    arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise DataError(f"{path}: resized to {w}x{h}, smaller than the stored {size}x{size}")
    return arr


_worker_args: tuple[Callable[[Any], Any], int, int] | None = None


def _init_worker(data_config: dict[str, Any]) -> None:
    from tltrain.data.device import image_size_of, stored_size

    global _worker_args
    _worker_args = (eval_resize(data_config), image_size_of(data_config), stored_size(data_config))


def _prepare_path(path: str) -> np.ndarray:
    assert _worker_args is not None
    return prepare_image(path, *_worker_args)


def _folder_samples(spec: JobSpec) -> tuple[Any, dict[str, tuple[str, list[Sample]]]]:
    """The dataset plan (uncapped) and, per split, (folder root, every image of that folder)."""
    from tltrain import storage
    from tltrain.data.folder import plan_dataset

    data = spec.data.model_copy(update={"max_images_per_class": None})
    plan = plan_dataset(data, spec.data.split_seed, storage.localizer(spec.data.cache_dir))
    train_root = plan.train_root
    splits: dict[str, tuple[str, list[Sample]]] = {}
    if spec.data.val is not None:
        splits["train"] = (train_root, sorted(plan.train, key=lambda s: (s[1], s[0])))
        splits["val"] = (plan.val_root, sorted(plan.val, key=lambda s: (s[1], s[0])))
    else:  # val_fraction: both halves live in the train folder
        splits["train"] = (train_root, sorted(plan.train + plan.val, key=lambda s: (s[1], s[0])))
    return plan, splits


def _fingerprints(plan: Any, splits: dict[str, tuple[str, list[Sample]]]) -> list[str]:
    """Dataset fingerprints (data.fingerprint) this directory serves: the train folder alone (a spec
    with val_fraction) and, when prepared with a val folder, train + val."""
    from tltrain.data.folder import FolderIndex, fingerprint

    root, samples = splits["train"]
    alone = fingerprint({"train": FolderIndex(root, plan.class_names, samples)}, plan.class_names)["sha256"]
    return sorted({alone, plan.fingerprint["sha256"]})


def _data_config(spec: JobSpec, num_classes: int) -> dict[str, Any]:
    from tltrain.core.model import build_model
    from tltrain.data.loaders import resolve_data_config

    # Preprocessing only depends on the architecture, not on the weights.
    model = build_model(spec.model.model_copy(update={"weights": None}), num_classes, image_size=spec.data.image_size)
    return resolve_data_config(model, spec.data.image_size, model_name=spec.model.name)


def _write_split(
    name: str,
    samples: Sequence[Sample],
    data_config: dict[str, Any],
    out_dir: Path,
    shard_bytes: int,
    workers: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    from tltrain.data.device import stored_size

    size = stored_size(data_config)
    per_shard = max(1, shard_bytes // (size * size * 3))
    paths = [p for p, _ in samples]
    shards: list[dict[str, Any]] = []
    for k, start in enumerate(range(0, len(paths), per_shard)):
        count = min(per_shard, len(paths) - start)
        fname = f"{name}-{k:05d}.npy"
        shards.append({"file": fname, "count": count})
        np.lib.format.open_memmap(out_dir / fname, mode="w+", dtype=np.uint8, shape=(count, size, size, 3)).flush()

    def results() -> Any:
        if workers <= 0:
            _init_worker(data_config)
            yield from map(_prepare_path, paths)
            return
        # forkserver: no fork of a process that may hold threads (Ray, loaders). An executor, not a
        # Pool: a worker that dies fails the command instead of being replaced forever.
        ctx = multiprocessing.get_context("forkserver")
        # The server imports torch/timm/PIL once; each worker forks from it instead of importing them.
        ctx.set_forkserver_preload(["tltrain.execution.prepare", "tltrain.data", "tltrain.data.device"])
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(data_config,)) as pool:
            yield from pool.map(_prepare_path, paths, chunksize=16)

    current: np.memmap | None = None
    t0 = time.perf_counter()
    for i, arr in enumerate(results()):
        shard, row = divmod(i, per_shard)
        if row == 0:
            if current is not None:
                current.flush()
                del current
            current = np.load(out_dir / shards[shard]["file"], mmap_mode="r+")
        assert current is not None  # row 0 of every shard comes first and opens it
        current[row] = arr
        if (i + 1) % 5000 == 0:
            log(f"  {name}: {i + 1}/{len(paths)} images ({(i + 1) / (time.perf_counter() - t0):.0f} img/s)")
    if current is not None:
        current.flush()
        del current
    return {"count": len(paths), "per_shard": per_shard, "shards": shards}


def prepare(
    spec: JobSpec,
    out_uri: str,
    *,
    workers: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the shards of spec.data (train, and val when it is a folder) to out_uri. Returns a summary.

    `workers`: decoding processes (None = all CPUs, 0 = in this process). An up-to-date directory
    (same files, classes and geometry) is left alone unless `force`.
    """
    from tltrain import storage
    from tltrain.data.device import FORMAT_NAME, FORMAT_VERSION, INDEX_FILE, geometry, image_size_of, stored_size
    from tltrain.data.folder import DataError

    t_start = time.perf_counter()
    try:
        plan, splits = _folder_samples(spec)
    except DataError as err:
        raise SpecError(str(err)) from None
    data_config = _data_config(spec, len(plan.class_names))
    image_size_of(data_config)
    eval_resize(data_config)  # fails early for eval transforms shards cannot reproduce
    geo = geometry(data_config)
    size = stored_size(data_config)
    if workers is None:
        workers = os.cpu_count() or 1

    is_s3 = storage.is_s3(out_uri)
    out_local = None if is_s3 else Path(expand_path(out_uri))
    if not force:
        existing = _existing_index(out_uri, spec.data.cache_dir)
        if (
            existing
            and plan.fingerprint["sha256"] in existing["fingerprints"]
            and existing["geometry"] == geo
            and existing["class_names"] == plan.class_names
        ):
            log(
                f"{out_uri}: up to date ({existing['stored_size']}px, {sum(s['count'] for s in existing['splits'].values())} images)"
            )
            return _summary(out_uri, existing, time.perf_counter() - t_start, written=False)

    staging = Path(tempfile.mkdtemp(prefix="tltrain-prepare-")) if is_s3 else out_local
    assert staging is not None
    staging.mkdir(parents=True, exist_ok=True)
    (staging / INDEX_FILE).unlink(missing_ok=True)  # incomplete until the new index is written
    log(
        f"preparing {sum(len(s) for _, s in splits.values())} images of {spec.data.train} "
        f"at {size}x{size} (image_size {image_size_of(data_config)}, crop_pct {data_config['crop_pct']}) "
        f"with {workers or 1} process(es) -> {out_uri}"
    )
    index: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "geometry": geo,
        "stored_size": size,
        "data_config": data_config,
        "class_names": plan.class_names,
        "fingerprint": plan.fingerprint,
        "fingerprints": _fingerprints(plan, splits),
        "source": {"train": spec.data.train, "val": spec.data.val, "model": spec.model.name},
        "splits": {},
    }
    try:
        for name, (root, samples) in splits.items():
            part = _write_split(name, samples, data_config, staging, shard_bytes, workers, log)
            part["paths"] = [Path(os.path.relpath(p, root)).as_posix() for p, _ in samples]
            part["labels"] = [int(y) for _, y in samples]
            index["splits"][name] = part
        # Remove shards of an earlier, larger preparation that this index no longer names.
        named = {s["file"] for part in index["splits"].values() for s in part["shards"]}
        for stale in staging.glob("*-[0-9][0-9][0-9][0-9][0-9].npy"):
            if stale.name not in named:
                stale.unlink()
        body = json.dumps(index).encode()
        if is_s3:
            storage.upload_tree(str(staging), out_uri)
            index_tmp = staging.parent / f"{staging.name}-{INDEX_FILE}"
            index_tmp.write_bytes(body)
            storage.upload_file(str(index_tmp), f"{out_uri.rstrip('/')}/{INDEX_FILE}")
            index_tmp.unlink()
        else:
            tmp = staging / f"{INDEX_FILE}.tmp"
            tmp.write_bytes(body)
            os.replace(tmp, staging / INDEX_FILE)
    finally:
        if is_s3:
            shutil.rmtree(staging, ignore_errors=True)
    summary = _summary(out_uri, index, time.perf_counter() - t_start, written=True)
    log(
        f"done: {summary['images']} images, {summary['bytes'] / 2**30:.2f} GiB in {summary['shards']} shard(s), "
        f"{summary['seconds']:.0f}s ({summary[IMG_PER_S]:.0f} img/s)"
    )
    return summary


def _existing_index(out_uri: str, cache_dir: str) -> dict[str, Any] | None:
    from tltrain import storage
    from tltrain.data.device import INDEX_FILE, read_index
    from tltrain.data.folder import DataError

    if storage.is_s3(out_uri):
        uri = f"{out_uri.rstrip('/')}/{INDEX_FILE}"
        if not storage.exists(uri):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            storage.download_file(uri, os.path.join(tmp, INDEX_FILE))
            try:
                return read_index(tmp)
            except DataError:
                return None
    root = expand_path(out_uri)
    if not (Path(root) / INDEX_FILE).is_file():
        return None
    try:
        return read_index(root)
    except (DataError, json.JSONDecodeError):
        return None


def _summary(out_uri: str, index: dict[str, Any], seconds: float, written: bool) -> dict[str, Any]:
    size = index["stored_size"]
    images = sum(p["count"] for p in index["splits"].values())
    return {
        "prepared": out_uri,
        "written": written,
        "stored_size": size,
        "images": images,
        "splits": {k: p["count"] for k, p in index["splits"].items()},
        "shards": sum(len(p["shards"]) for p in index["splits"].values()),
        "bytes": images * size * size * 3,
        "seconds": seconds,
        IMG_PER_S: images / max(seconds, 1e-9) if written else None,
    }


# --- command line --------------------------------------------------------------------------------
