"""Write an ImageFolder of photo-like JPEGs (smooth colour fields + grain, 500x375 by default) for
GPU throughput checks on machines with no real dataset. Usage:
    python tools/make_jpeg_folder.py OUT_DIR [NUM_IMAGES] [NUM_CLASSES]"""

import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image


def _one(args: tuple[str, int, int]) -> None:
    out, i, classes = args
    label = i % classes
    rng = np.random.default_rng(i)
    # Low-frequency colour field upsampled (compresses like a photo) plus grain; the class shifts
    # the mean colour so a model can learn something.
    base = (rng.random((12, 16, 3)) * 120 + label * (120 / classes)).astype(np.uint8)
    img = Image.fromarray(base).resize((500, 375), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (375, 500, 3))
    folder = os.path.join(out, f"class{label:02d}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


if __name__ == "__main__":
    out, n, classes = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4096, int(sys.argv[3]) if len(sys.argv) > 3 else 10
    with ProcessPoolExecutor() as pool:
        list(pool.map(_one, [(out, i, classes) for i in range(n)], chunksize=64))
    print(f"wrote {n} JPEGs in {classes} classes under {out}")
