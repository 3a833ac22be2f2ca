"""Images in, batches out: everything between a dataset folder and the step.

Owns the ImageFolder scan, split and fingerprint (`folder`), decoding to RGB (`decode`), the CPU
transforms and loaders (`loaders`), the device-side augment and shard loaders (`device`), nvJPEG
decoding on the GPU (`nvjpeg`), and datasets made from packages (`packaged`, `synthetic`).
Imports torch, timm, torchvision, PIL and numpy; never Ray, MLflow or storage clients (remote roots
come in through a `localize` function the caller passes).
"""

from tltrain.data.decode import load_rgb, to_rgb
from tltrain.data.folder import (
    DataError,
    DatasetPlan,
    FolderIndex,
    Sample,
    UnlabelledIndex,
    fingerprint,
    hold_out,
    plan_dataset,
    scan_image_folder,
    scan_unlabelled,
    stratified_sample,
)
from tltrain.data.loaders import (
    build_eval_loader,
    build_target_loader,
    build_train_loader,
    build_transform,
    resolve_data_config,
)

__all__ = [
    "DataError",
    "DatasetPlan",
    "FolderIndex",
    "Sample",
    "UnlabelledIndex",
    "build_eval_loader",
    "build_target_loader",
    "build_train_loader",
    "build_transform",
    "fingerprint",
    "hold_out",
    "load_rgb",
    "plan_dataset",
    "resolve_data_config",
    "scan_image_folder",
    "scan_unlabelled",
    "stratified_sample",
    "to_rgb",
]
