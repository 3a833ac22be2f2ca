"""The image-classifier MLflow pyfunc, logged as "models from code".

This file is copied into every logged model and executed by `mlflow.pyfunc.load_model` in the
downstream team's process, which has mlflow, torch, timm, PIL, numpy and safetensors, but NOT
tltrain. So it must stay self-contained: import nothing from tltrain, only those libraries.
Logging it from code (instead of a cloudpickled PythonModel) means the model package holds no
pickle: the weights are safetensors and the rest is JSON.

Artifacts (set by tltrain.registry): "weights" -> model.safetensors, "meta" -> meta.json
(class_names, model_name, data_config: see docs/ARCHITECTURE.md).

Input: a list (or Series, or one-column DataFrame, first column or "image") whose items are image
file paths, "data:image/...;base64," strings, raw encoded bytes, or uint8 HxW / HxWxC arrays
(PIL images are accepted too). Output: a DataFrame with `label`, `probability` (of that label) and
one `prob_<class>` column per class, in class_names order.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import timm
import torch
from mlflow.pyfunc import PythonModel
from PIL import Image, ImageOps
from safetensors.torch import load_file
from timm.data import create_transform

TORCHVISION_PREFIX = "torchvision:"
# The keys of timm.data.create_transform that tltrain stores in meta["data_config"].
_TRANSFORM_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
_BATCH = 64  # bounds memory for long inputs; inference cost per image is unchanged
_TTA_VIEWS = {"none": 1, "flip": 2, "dihedral": 8}


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


def _open(item: Any) -> Image.Image:
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        arr = item
        if arr.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 HxW or HxWxC, got dtype {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        return to_rgb(Image.fromarray(arr))
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    elif isinstance(item, str):
        if item.startswith("data:") and ";base64," in item:
            data = base64.b64decode(item.split(";base64,", 1)[1])
        else:
            with Image.open(item) as im:
                im.load()
                return to_rgb(im)
    else:
        raise ValueError(f"unsupported image input of type {type(item).__name__}: use a path, bytes or a uint8 array")
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_rgb(im)


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


class ImageClassifier(PythonModel):
    # predict/load_context carry no type hints on purpose: MLflow derives a schema from hints on
    # `predict` and would then coerce our mixed path/bytes/array inputs.
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

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        items = _items(model_input)
        probs: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(items), _BATCH):
                batch = torch.stack([self.transform(_open(x)) for x in items[start : start + _BATCH]])
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
