"""Image files to RGB PIL images: EXIF orientation, alpha, 16-bit and palette modes handled once.

(tracking/pyfunc_model.py keeps its own copy of `to_rgb` on purpose: registered models load
without tltrain installed.)
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


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
        upright = ImageOps.exif_transpose(im) or im
        return to_rgb(upright)
