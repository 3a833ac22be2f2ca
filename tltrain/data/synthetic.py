"""Synthetic JPEG ImageFolders: photo-sized images whose decode costs what a real photo's does.

The GPU benchmark needs a data set large enough to keep a loader busy for thousands of steps, on a
machine that cannot download one; `python -m tltrain.data.synthetic make-jpegs OUT_DIR` writes it
there. It is separate from bench.py because it runs before any benchmark (on its own, with PIL and
numpy only) and because tests build small image folders with it too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np


def _synthetic_jpeg(args: tuple[str, int, int, int, tuple[int, int], int]) -> None:
    from PIL import Image, ImageDraw

    path, index, label, classes, size, seed = args
    rng = np.random.default_rng([seed, index])
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    freq = rng.uniform(0.005, 0.05, 3)
    phase = rng.uniform(0, 2 * math.pi)
    img = np.stack([127 + 100 * np.sin(xx * freq[c] + yy * freq[(c + 1) % 3] + phase) for c in range(3)], -1)
    img += rng.normal(0, 10, img.shape)
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    # The class decides the shapes' hue and kind, so a model can learn it; the rest is noise.
    hue = np.array([np.cos(2 * math.pi * label / classes), np.sin(2 * math.pi * label / classes), 0.5])
    for _ in range(int(rng.integers(4, 10))):
        color = tuple(int(v) for v in np.clip(128 + 120 * hue + rng.normal(0, 25, 3), 0, 255))
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        (draw.ellipse if (label + index) % 3 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    im.save(path, format="JPEG", quality=90)


def make_synthetic_jpeg_folder(
    out_dir: str, n: int, classes: int, size: tuple[int, int] = (500, 375), *, seed: int = 0, workers: int | None = None
) -> str:
    """An ImageFolder of `n` JPEGs (width x height `size`, ~100 KB each at quality 90) in `classes`
    class folders: noise, gradients and shapes, so decoding costs what a photo's does. Returns out_dir."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    root = Path(out_dir)
    jobs = []
    for i in range(n):
        label = i % classes
        folder = root / f"class_{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"img_{i:06d}.jpg"), i, label, classes, (size[0], size[1]), seed))
    workers = min(os.cpu_count() or 1, 16) if workers is None else workers
    if workers <= 1:
        for job in jobs:
            _synthetic_jpeg(job)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
            list(pool.map(_synthetic_jpeg, jobs, chunksize=32))
    return str(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tltrain.data.synthetic", description="synthetic images for benchmarks"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-jpegs", help="write an ImageFolder of synthetic ~500x375 JPEGs")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    root = make_synthetic_jpeg_folder(args.out_dir, args.n, args.classes, tuple(args.size), workers=args.workers)
    print(f"{args.n} JPEGs in {root} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
