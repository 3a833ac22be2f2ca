"""FLOPs for MFU: the device's dense peak (a table) and the FLOPs one training step really does (counted).

MFU is counted FLOPs per image x img/s / peak. Counting rather than estimating from parameters is
what makes frozen layer groups visible (they run a forward and no backward). Separate from bench.py
because neither half needs Ray or a spec: they are pure functions of a model and a device name, and
tests check them on their own.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense peak FLOP/s per GPU: (name fragment, bf16/fp16, tf32, fp32). First match wins.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12, 378e12, 51e12),
    ("H100", 989e12, 495e12, 67e12),
    ("H200", 989e12, 495e12, 67e12),
    ("H800", 989e12, 495e12, 67e12),
    ("A100", 312e12, 156e12, 19.5e12),
]


def peak_flops(device_name: str, precision: str, tf32: bool) -> float | None:
    """The device's dense peak for the step's math; None where unknown (CPUs, other GPUs)."""
    for fragment, half, tf, fp32 in PEAK_FLOPS:
        if fragment in device_name:
            return half if precision in ("bf16", "fp16") else tf if tf32 else fp32
    return None


def train_flops_per_image(
    model: nn.Module, image_size: int, device: torch.device, dtype: torch.dtype | None, channels_last: bool
) -> float:
    """FLOPs of one forward + backward per image, counted (so frozen groups, which run no backward,
    count only their forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    n = 2
    x = torch.randn(n, 3, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.zeros(n, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / n


def mfu(img_per_s: float, flops_per_img: float, peak_flops_per_s: float | None) -> float | None:
    """Model FLOPs utilization: the share of the device's peak that the counted FLOPs reach."""
    return img_per_s * flops_per_img / peak_flops_per_s if peak_flops_per_s else None
