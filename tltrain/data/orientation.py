"""The dihedral group of a square image: the 8 flips and 90-degree rotations.

One definition for the three places that use it: training augmentation for images with no
canonical orientation (data.orientation dihedral, CPU and device paths) and test-time augmentation
(data.tta). Works on CHW images and NCHW batches alike (the last two dims are H, W).
"""

from __future__ import annotations

import torch


def dihedral_view(images: torch.Tensor, k: int) -> torch.Tensor:
    """View k (0..7): rotated by (k % 4) x 90 degrees counter-clockwise, then mirrored left-right if
    k >= 4. Rotations need square images (tltrain's crops are)."""
    out = torch.rot90(images, k % 4, dims=(-2, -1)) if k % 4 else images
    return out.flip(-1) if k >= 4 else out


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The test-time views of a batch, identity first: none = 1, flip = 2, dihedral = 8."""
    if mode == "flip":
        return [images, images.flip(-1)]
    if mode == "dihedral":
        return [dihedral_view(images, k) for k in range(8)]
    return [images]


def dihedral_batch(images: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Each image of an NCHW batch in its own view: images[i] -> dihedral_view(images[i], ks[i]).

    The device paths' per-sample orientation, without a host sync or a loop over groups: every
    view k is (transpose if k is odd), then (flip H if k % 4 in {1, 2}), then (flip W if
    (k % 4 >= 2) xor (k >= 4)), three batch-wide selects (tests check each k against
    `dihedral_view`). `ks`: any dtype holding the integers 0..7, on any device."""
    k = ks.to(device=images.device).long().view(-1, *([1] * (images.dim() - 1)))
    r = k % 4
    out = torch.where(r % 2 == 1, images.transpose(-2, -1), images)
    out = torch.where((r == 1) | (r == 2), out.flip(-2), out)
    return torch.where((r >= 2) ^ (k >= 4), out.flip(-1), out)
