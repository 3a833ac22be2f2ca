"""The image-classifier MLflow pyfunc, logged as "models from code".

This file is copied into every logged model and executed by `mlflow.pyfunc.load_model` in the
downstream team's process, which has mlflow, torch, timm, PIL, numpy and safetensors, but NOT
tltrain. So it must stay self-contained: import nothing from tltrain, only those libraries.
Logging it from code (instead of a cloudpickled PythonModel) means the model package holds no
pickle: the weights are safetensors and the rest is JSON.

Artifacts (set by tltrain.registry): "weights" -> model.safetensors, "meta" -> meta.json
(class_names, model_name, data_config: see docs/ARCHITECTURE.md).

Input: one image per item of a list, a 1-D array, a Series or a DataFrame's first column. An item
is encoded image bytes, a base64 string (with or without a "data:image/...;base64," prefix), a uint8
HxW / HxWxC array or a PIL image. Over HTTP (`mlflow models serve`, `tltrain serve`) that means
`{"inputs": ["data:image/png;base64,..."]}`. Local file paths are read only when the loading
process asks for it: `load_model(uri, model_config={"allow_local_paths": True})`; a served model
never opens a file a caller names. An item that is refused or cannot be decoded raises
`ImageInputError`, one line naming the item's index and what is accepted (over HTTP: a 400 with
that message and no stack trace). Decoded images are capped at `max_pixels` (model_config,
default `MAX_PIXELS`) so a small file cannot expand into gigabytes (a decompression bomb).
Output: a DataFrame with `label`, `probability` (of that label) and one `prob_<class>` column per
class, in class_names order.

MLflow's column signature (tltrain logs one string column) turns every input into a DataFrame
before `predict` sees it, and cannot build one from a plain list of arrays: pass arrays and PIL
images as a Series (`pd.Series([a, b])`) or a DataFrame column.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import timm
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image, ImageOps
from safetensors.torch import load_file
from timm.data import create_transform

TORCHVISION_PREFIX = "torchvision:"
# The keys of timm.data.create_transform that tltrain stores in meta["data_config"].
_TRANSFORM_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
_BATCH = 64  # bounds memory for long inputs; inference cost per image is unchanged
_TTA_VIEWS = {"none": 1, "flip": 2, "dihedral": 8}
# The most pixels a decoded image may have unless model_config max_pixels says otherwise: 8000 x
# 8000, above any camera photo a classifier is fed, far below what fills a server's memory.
MAX_PIXELS = 64_000_000
ACCEPTED = "send encoded image bytes, a base64 or data:image/...;base64, string, a uint8 HxW/HxWxC array or a PIL image"
# Suffixes that make a string that is not base64 read as a file name (the refusal says so).
_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _torchvision_model(name: str, num_classes: int, image_size: int | None = None) -> torch.nn.Module:
    # Must mirror tltrain.model._replace_torchvision_head, so the state-dict keys match the
    # checkpoint (a Linear `fc`/`classifier`/`heads`/`head` becomes Sequential(Dropout, Linear);
    # a Sequential head gets its last Linear replaced). tests/test_registry.py checks the keys agree.
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    if isinstance(getattr(model, "image_size", None), int) and image_size and image_size != model.image_size:
        model = torchvision.models.get_model(name, weights=None, image_size=image_size)  # ViT: its grid
    for attr in ("fc", "classifier", "heads", "head"):
        parent = getattr(model, attr, None)
        if isinstance(parent, torch.nn.Linear):
            setattr(
                model,
                attr,
                torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Linear(parent.in_features, num_classes)),
            )
            return model
        if isinstance(parent, torch.nn.Sequential):
            for i in range(len(parent) - 1, -1, -1):
                layer = parent[i]
                if isinstance(layer, torch.nn.Linear):
                    parent[i] = torch.nn.Linear(layer.in_features, num_classes)
                    return model
    raise ValueError(f"cannot find the classification head of torchvision model {name!r}")


def build_network(model_name: str, num_classes: int, image_size: int | None = None) -> torch.nn.Module:
    """The architecture named in meta.json with a num_classes head, no pretrained download; ViT-like
    models built for `image_size` (the trained resolution, meta.json data_config.input_size)."""
    if model_name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(model_name[len(TORCHVISION_PREFIX) :], num_classes, image_size)
    if image_size:
        try:
            return timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=image_size)
        except TypeError as err:  # CNNs take any size and have no img_size argument
            if "img_size" not in str(err):
                raise
    return timm.create_model(model_name, pretrained=False, num_classes=num_classes)


def _to_uint8(arr: np.ndarray, nominal_max: float | None) -> np.ndarray:
    arr = arr.astype(np.float64)
    if nominal_max is None:  # no nominal range: stretch what the image holds
        lo, hi = float(arr.min()), float(arr.max())
        nominal_max, arr = max(hi - lo, 1e-12), arr - lo
    return np.clip(np.rint(arr * (255.0 / nominal_max)), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Decode exactly like training did (mirrors tltrain.data.load_rgb/to_rgb): EXIF orientation
    applied, transparency composited on white, 16/32-bit grey scaled to 8 bits, rest to RGB."""
    im = ImageOps.exif_transpose(im) or im
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(im), 65535.0)).convert("RGB")
    if im.mode in ("I", "F"):
        arr = np.asarray(im)
        nominal: float | None = None
        if im.mode == "I" and arr.size and arr.min() >= 0:
            hi = int(arr.max())
            nominal = 255.0 if hi <= 255 else 65535.0 if hi <= 65535 else None
        return Image.fromarray(_to_uint8(arr, nominal)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


class ImageInputError(MlflowException, ValueError):
    """An input item that is refused or cannot be decoded: one line, naming the item's index.

    An MlflowException with INVALID_PARAMETER_VALUE so MLflow's scoring server answers 400 with
    this message and no stack trace (any other exception from predict becomes a 400 carrying the
    server's traceback); a ValueError for in-process callers."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(f"input {index}: {problem}; {ACCEPTED}", error_code=INVALID_PARAMETER_VALUE)
        self.problem = problem  # what is wrong with this item alone (batch scoring's summary shows it)

    # MLflow's scoring server rewrites the message of an exception raised by predict into
    # "Failed to predict data '<the whole request as a DataFrame>'. \nError: ...": several lines
    # echoing the caller's payload. Ours already says which item and why, so it keeps its own.
    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


def _looks_like_path(text: str) -> bool:
    # Judged from the string alone: whether such a file exists on this machine is never looked up
    # (the answer would tell a remote caller what the server holds).
    return text.startswith(("/", "~", ".", "file:")) or "\\" in text or text.lower().endswith(_FILE_SUFFIXES)


def _b64decode(text: str) -> bytes | None:
    compact = "".join(text.split())  # base64.encodebytes and some clients wrap lines
    try:
        if "-" in compact or "_" in compact:
            return base64.b64decode(compact, altchars=b"-_", validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _decode_bytes(data: bytes, index: int, max_pixels: int) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageInputError(index, "image has more pixels than PIL decodes safely (a decompression bomb)") from None
    except Exception:  # PIL raises UnidentifiedImageError, but also SyntaxError/ValueError from plugins
        raise ImageInputError(index, f"{len(data)} bytes that are not an image PIL can decode") from None
    return _load_capped(im, index, max_pixels)


def _load_capped(im: Image.Image, index: int, max_pixels: int) -> Image.Image:
    # Image.open reads the header only: refuse on the declared size, before decoding any pixels.
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageInputError(
                index, f"image is {width}x{height}, more than {max_pixels:,} pixels (model_config max_pixels)"
            )
        try:
            im.load()
        except Exception as err:
            reason = " ".join(str(err).split())  # one line, whatever the decoder wrote
            raise ImageInputError(index, f"corrupt or truncated {im.format or 'image'} data ({reason})") from None
        return to_rgb(im)


def _decode_string(text: str, index: int, allow_paths: bool, max_pixels: int) -> Image.Image:
    if text.startswith("data:"):
        head, sep, payload = text.partition(",")
        data = _b64decode(payload) if sep and head.startswith("data:image/") and head.endswith(";base64") else None
        if data is None:
            raise ImageInputError(index, f"a data URI must be data:image/<type>;base64,<data>, got {head[:40]!r}")
        return _decode_bytes(data, index, max_pixels)
    if allow_paths and os.path.isfile(os.path.expanduser(text)):  # the only filesystem access
        try:
            im = Image.open(os.path.expanduser(text))
        except Exception as err:
            raise ImageInputError(index, f"{text}: not an image PIL can decode ({type(err).__name__})") from None
        return _load_capped(im, index, max_pixels)
    data = _b64decode(text)
    if data is not None:  # valid base64 (a JPEG's starts with "/9j/"): judged as the bytes it holds
        return _decode_bytes(data, index, max_pixels)
    if _looks_like_path(text):
        if allow_paths:
            raise ImageInputError(index, f"no file {text!r}")
        raise ImageInputError(
            index,
            "looks like a file path; this model reads no files (a process that loads it can allow "
            'local paths with model_config {"allow_local_paths": true})',
        )
    raise ImageInputError(index, f"not base64 image data ({len(text)} characters)")


def _decode(item: Any, index: int, allow_paths: bool, max_pixels: int) -> Image.Image:
    """One input item -> an RGB image decoded like training did, or ImageInputError."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
            raise ImageInputError(
                index, f"an array must be uint8 HxW or HxWxC (C 1, 3 or 4), got {item.dtype} {item.shape}"
            )
        return to_rgb(Image.fromarray(item[:, :, 0] if item.ndim == 3 and item.shape[2] == 1 else item))
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(item), index, max_pixels)
    if isinstance(item, str):
        return _decode_string(item, index, allow_paths, max_pixels)
    if item is None or (isinstance(item, float) and np.isnan(item)):
        raise ImageInputError(index, "empty")
    raise ImageInputError(index, f"unsupported type {type(item).__name__}")


def _items(model_input: Any) -> list[Any]:
    """Normalise the accepted input shapes to a flat list of images."""
    if isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
        # One HxW(xC) image, or a stacked NxHxWxC batch.
        return (
            [model_input]
            if model_input.ndim == 2 or (model_input.ndim == 3 and model_input.shape[2] in (1, 3, 4))
            else list(model_input)
        )
    if isinstance(model_input, (str, bytes, Image.Image)):
        return [model_input]
    return list(model_input)


def _config_flag(config: dict[str, Any], key: str) -> bool:
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):  # the string "false" is truthy: never let it open files
        raise ValueError(f"model_config {key}: use true or false, got {value!r}")
    return value


class ImageClassifier(PythonModel):
    allow_local_paths = False  # the safe defaults, also for an instance built without load_context
    max_pixels = MAX_PIXELS

    def load_context(self, context) -> None:  # noqa: ANN001
        with open(context.artifacts["meta"]) as f:
            meta = json.load(f)
        self.class_names: list[str] = list(meta["class_names"])
        config = dict(context.model_config or {})
        self.device = torch.device(config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        size = int(meta["data_config"]["input_size"][-1])
        model = build_network(meta["model_name"], len(self.class_names), size)
        # strict: a key mismatch means this file and the training code disagree on the
        # architecture, and silently random weights would be far worse than an error.
        model.load_state_dict(load_file(context.artifacts["weights"]), strict=True)
        self.model = model.eval().to(self.device)
        cfg: dict[str, Any] = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["data_config"].items() if k in _TRANSFORM_KEYS
        }
        self.transform = create_transform(**cfg, is_training=False)
        # Test-time augmentation as the run scored its test split (data.tta), unless model_config
        # overrides it ("none", "flip" or "dihedral").
        trained = str(((meta.get("spec") or {}).get("data") or {}).get("tta", "none"))
        self.tta = str(config.get("tta") or trained)
        if self.tta not in _TTA_VIEWS:
            raise ValueError(f"model_config tta: {self.tta!r}; use one of {', '.join(_TTA_VIEWS)}")
        # Reading files named in the input is for the caller's own process only (tltrain predict,
        # a notebook): `mlflow models serve` must never open a path a remote caller chose.
        self.allow_local_paths = _config_flag(config, "allow_local_paths")
        max_pixels = config.get("max_pixels")
        max_pixels = MAX_PIXELS if max_pixels is None else max_pixels  # None (as logged): this file's cap
        if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels <= 0:
            raise ValueError(f"model_config max_pixels: a positive whole number, got {max_pixels!r}")
        self.max_pixels = max_pixels

    def _probs(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax averaged over the TTA views (the same views as tltrain's data/orientation.py:
        a served model depends on mlflow, torch and timm only): k % 4 quarter turns, then a mirror for k >= 4."""
        views = [batch]
        if self.tta == "flip":
            views.append(batch.flip(-1))
        elif self.tta == "dihedral":
            turned = [torch.rot90(batch, k, dims=(-2, -1)) for k in range(4)]
            views = turned + [t.flip(-1) for t in turned]
        return torch.stack([torch.softmax(self.model(v).float(), dim=1) for v in views]).mean(0)

    # `model_input: pd.DataFrame` is what MLflow hands over after enforcing the column signature
    # (and, as a type MLflow infers no schema from, it keeps MLflow from asking for type hints at
    # every load); called directly, predict takes any of the shapes `_items` accepts.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:  # noqa: ANN001
        items = _items(model_input)
        probs: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(items), _BATCH):
                batch = torch.stack(
                    [
                        self.transform(_decode(x, start + i, self.allow_local_paths, self.max_pixels))
                        for i, x in enumerate(items[start : start + _BATCH])
                    ]
                )
                probs.append(self._probs(batch.to(self.device)).cpu().numpy())
        p = np.concatenate(probs) if probs else np.zeros((0, len(self.class_names)), dtype=np.float32)
        top = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=int)
        out = pd.DataFrame(
            {
                "label": [self.class_names[i] for i in top],
                "probability": p[np.arange(len(p)), top].astype(float) if len(p) else np.zeros(0),
            }
        )
        for i, name in enumerate(self.class_names):
            out[f"prob_{name}"] = p[:, i].astype(float)
        return out


mlflow.models.set_model(ImageClassifier())
