"""Test-time augmentation: the prediction averaged over transformed views of each image.

Which views (flips, the dihedral group) is the data layer's (data/orientation.py); the caller
passes them in. Probabilities are averaged, not logits, as is usual for TTA.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

Views = Callable[[torch.Tensor], list[torch.Tensor]]


def tta_log_probs(model: nn.Module, images: torch.Tensor, views: Views | None = None) -> torch.Tensor:
    """log of the mean predicted probability over views(images) (fp32); no views = log_softmax."""
    if views is None:
        return nn.functional.log_softmax(model(images).float(), dim=-1)
    logp = torch.stack([nn.functional.log_softmax(model(v).float(), dim=-1) for v in views(images)])
    return torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])
