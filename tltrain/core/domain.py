"""Domain adaptation losses: align the pooled backbone features of a labelled source batch with
those of an unlabelled target batch, added to the classification loss as `ce + weight * align`.

Three methods, chosen by name (`alignment_loss`):
- "dann": a domain classifier behind a gradient reversal layer (Ganin & Lempitsky, ICML 2015,
  "Unsupervised Domain Adaptation by Backpropagation"; Ganin et al., JMLR 2016, "Domain-Adversarial
  Training of Neural Networks").
- "mmd": multi-kernel Gaussian MMD^2 (Long et al., ICML 2015, "Learning Transferable Features with
  Deep Adaptation Networks", DAN; the estimators are Gretton et al., JMLR 2012).
- "coral": the distance of the feature covariances (Sun & Saenko, ECCV 2016 workshops, "Deep CORAL").

Pure torch. Under DDP, MMD and CORAL are set statistics: `gather_features` makes every rank see the
global batch. Scaling rule: the all-gather's backward sums the (identical) gradients of all W ranks,
so each rank's local features receive W x the single-process gradient, and DDP's gradient average
divides by W again: the parameter gradients equal those of the single-process loss on the global
batch with NO extra factor (divide by grad_accum as for the classification loss, nothing else).
Without DDP's average (a hand-made sum all-reduce) divide the loss by W.

The run's side (`DomainAdapter`, `PooledFeatures`, `target_batches`): one forward of the
concatenated source + target batch through the DDP-wrapped model returns (logits, pooled features);
cross-entropy on the source slice, `ce + weight x ramp x align` with the ramp linear over
strategy.domain_adaptation.warmup_epochs (dann: the ramp scales the GRL coefficient instead, so the
discriminator learns from the first step while the features feel it only as it ramps in).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import count
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

METHODS = ("dann", "mmd", "coral")
DISCRIMINATOR_GROUP = "discriminator"  # its optimizer param group's name (lr/<index>_discriminator)


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -lambda (Ganin & Lempitsky 2015).

    The discriminator behind it descends on the domain loss while the features before it ascend on
    it: one backward pass does the min-max game, no alternating optimisers."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        # view_as: a Function that returns its input unchanged would not get a fresh autograd node.
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.neg() * ctx.lambda_, None


def grad_reverse(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    """`x`, with its gradient multiplied by -lambda_ on the way back."""
    out: torch.Tensor = GradientReversal.apply(x, lambda_)
    return out


def grl_lambda(progress: float, gamma: float = 10.0) -> float:
    """The DANN schedule lambda_p = 2 / (1 + exp(-gamma p)) - 1 (gamma = 10 in the papers' image
    experiments): 0 at the start, while the discriminator's signal is noise, rising to ~1. `progress`
    = p in [0, 1] is the fraction of training done (global_step / total optimizer steps); clamped, so
    a resumed or overrun run stays at <= 1."""
    p = min(max(progress, 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class DomainDiscriminator(nn.Module):
    """The paper's domain classifier on pooled features: feature_dim -> hidden -> hidden -> 1 logit,
    ReLU and dropout 0.5 (the papers' x -> 1024 -> 1024 -> 2; one logit with BCE is the same two-way
    softmax). hidden=1024 suits ResNet/ViT-sized features (512-2048); for small features
    (< 256, tiny test models) a hidden width of ~100, the papers' MNIST choice, keeps it from
    dwarfing the backbone it is meant to probe."""

    def __init__(self, feature_dim: int, hidden: int = 1024, dropout: float = 0.5) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) -> (N,) logits of "source"."""
        out: torch.Tensor = self.net(features)
        return out.squeeze(-1)


def dann_loss(
    source_features: torch.Tensor, target_features: torch.Tensor, discriminator: nn.Module, lambda_: float
) -> torch.Tensor:
    """BCE-with-logits of source = 1, target = 0 through the gradient reversal, mean over all n_s + n_t
    samples. Both domains go through the discriminator in one call (one DDP forward if it is wrapped)."""
    features = grad_reverse(torch.cat([source_features, target_features]), lambda_)
    logits = discriminator(features)
    logits = logits.to(_compute_dtype(logits))  # bf16 logits under autocast: the BCE in float32
    labels = torch.cat([logits.new_ones(len(source_features)), logits.new_zeros(len(target_features))])
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Distances, exponentials and covariances lose too much in bf16/fp16; float64 inputs stay float64.
    return torch.promote_types(x.dtype, torch.float32)


def _check_pair(source: torch.Tensor, target: torch.Tensor, min_rows: int) -> None:
    if source.dim() != 2 or target.dim() != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"expected (N, D) features of one D, got {tuple(source.shape)} and {tuple(target.shape)}")
    if len(source) < min_rows or len(target) < min_rows:
        raise ValueError(f"need >= {min_rows} samples per domain, got {len(source)} and {len(target)}")


def _sq_distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances via ||a||^2 + ||b||^2 - 2ab: O(N^2) memory, not O(N^2 D) as
    broadcasting would be, and no sqrt (whose gradient is infinite on the zero diagonal). Centring
    first (distances do not move) keeps the norms small, so the subtraction cancels less; the clamp
    removes the rounding negatives that are left."""
    x = x - x.mean(dim=0, keepdim=True).detach()
    sq = x.pow(2).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)


def mmd_loss(
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    kernel_mul: float = 2.0,
    kernel_num: int = 5,
    unbiased: bool = True,
) -> torch.Tensor:
    """Multi-kernel Gaussian MMD^2 between (n_s, D) and (n_t, D) features (DAN, Long et al. 2015).

    Kernel: the mean of `kernel_num` Gaussians exp(-||a - b||^2 / s_u) with s_u = s * kernel_mul^(u -
    kernel_num // 2), i.e. {1/4, 1/2, 1, 2, 4} x s for the defaults, where s is the mean pairwise
    squared distance of the joint sample. Equal kernel weights beta_u = 1 / kernel_num: DAN learns
    beta by a QP under sum(beta) = 1; the widely used DAN code sums instead (5x this value).
    The bandwidth keeps its gradient: MMD is then invariant to the scale of the features, so the
    network cannot shrink it by shrinking all features towards one point.

    unbiased=True (default) is Gretton et al.'s U-statistic MMD^2_u (the diagonal k(x, x) terms left out):
    its expectation is the population MMD^2, ~0 for one distribution, but one batch can be slightly
    negative. The biased V-statistic (unbiased=False) is >= 0 but adds (1 - mean k) / n per domain,
    a term whose gradient pulls each domain's features together, a collapse pressure that fights the
    classifier. Quadratic in n_s + n_t: cheap for global batches of a few thousand."""
    _check_pair(source, target, 2 if unbiased else 1)
    with torch.autocast(source.device.type, enabled=False):
        dtype = _compute_dtype(source)
        x = torch.cat([source, target]).to(dtype)
        n, n_s = len(x), len(source)
        d2 = _sq_distances(x)
        base = (d2.sum() / (n * n - n)).clamp_min(torch.finfo(dtype).tiny)  # diagonal is 0
        kernels = torch.zeros_like(d2)
        for u in range(kernel_num):
            kernels = kernels + torch.exp(-d2 / (base * kernel_mul ** (u - kernel_num // 2)))
        kernels = kernels / kernel_num
        k_ss, k_tt, k_st = kernels[:n_s, :n_s], kernels[n_s:, n_s:], kernels[:n_s, n_s:]
        if unbiased:
            m, t = n_s, n - n_s
            ss = (k_ss.sum() - k_ss.diagonal().sum()) / (m * (m - 1))
            tt = (k_tt.sum() - k_tt.diagonal().sum()) / (t * (t - 1))
            return ss + tt - 2.0 * k_st.mean()
        return k_ss.mean() + k_tt.mean() - 2.0 * k_st.mean()


def _covariance(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(dim=0, keepdim=True)
    return centred.T @ centred / (len(x) - 1)


def coral_loss(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL (Sun & Saenko 2016): ||C_s - C_t||_F^2 / (4 d^2), C the unbiased (n - 1)
    covariance of (n, d) features. The covariance is formed from centred features (not E[xx^T] -
    mu mu^T, which cancels catastrophically in float32) with autocast off."""
    _check_pair(source, target, 2)
    with torch.autocast(source.device.type, enabled=False):
        dtype = _compute_dtype(source)
        diff = _covariance(source.to(dtype)) - _covariance(target.to(dtype))
        d = source.shape[1]
        return diff.pow(2).sum() / (4.0 * d * d)


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """The global batch (rank order) when torch.distributed runs with world size > 1, `x` otherwise.

    Differentiable: each rank's slice gets the sum of every rank's gradient for it; with DDP's average
    that is exactly the single-process gradient (see the module docstring). A collective: every rank
    must call it the same number of times, in the same order, with the same shape (equal local
    batches: the loaders drop short batches), or the ranks hang or mix up rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    # torch 2.14's differentiable gather (torch.distributed.nn.functional.all_gather is deprecated in
    # its favour); its backward is a sum reduce-scatter.
    from torch.distributed._functional_collectives import all_gather_single

    world = dist.group.WORLD
    assert world is not None  # initialised above
    gathered: torch.Tensor = all_gather_single(x.contiguous(), 0, world)
    return gathered


def alignment_loss(
    method: str,
    source_feats: torch.Tensor,
    target_feats: torch.Tensor,
    discriminator: nn.Module | None = None,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """The `method` ("dann" | "mmd" | "coral") loss between this rank's pooled source and target
    features; `discriminator` and `lambda_` (the GRL coefficient, `grl_lambda(progress)`) are DANN's.

    DANN is not gathered: its loss is a per-sample mean, so with equal local batches DDP's average of
    the local gradients already is the global-batch gradient. MMD and CORAL are not sums over samples
    (the kernel pairs and covariances span the batch): they are computed on the gathered global batch,
    every rank the same value (log it as is; do not sum it over ranks)."""
    if method == "dann":
        if discriminator is None:
            raise ValueError("alignment method 'dann' needs a discriminator")
        return dann_loss(source_feats, target_feats, discriminator, lambda_)
    if method == "mmd":
        return mmd_loss(gather_features(source_feats), gather_features(target_feats))
    if method == "coral":
        return coral_loss(gather_features(source_feats), gather_features(target_feats))
    raise ValueError(f"unknown alignment method {method!r}; expected one of {', '.join(METHODS)}")


class PooledFeatures(nn.Module):
    """A timm classifier whose forward returns (logits, pooled pre-logits features): timm's own
    forward_features -> forward_head(pre_logits=True) -> get_classifier(), i.e. what `model(x)`
    computes, with the features kept. DDP wraps this module, so both outputs' gradients sync."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m: Any = self.model
        features: torch.Tensor = m.forward_head(m.forward_features(x), pre_logits=True)
        logits: torch.Tensor = m.get_classifier()(features)
        return logits, features


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features the classifier reads (its in_features; timm's num_features)."""
    m: Any = model
    head: Any = m.get_classifier() if hasattr(m, "get_classifier") else None
    if isinstance(head, nn.Linear):
        return head.in_features
    return int(m.num_features)


def pooled_features_error(model: nn.Module, image_size: int) -> str | None:
    """Why `PooledFeatures(model)` would not give this model's own logits (None = it does): the
    model must be timm-style (forward_features, forward_head(pre_logits=), one linear classifier)
    and the decomposition must reproduce model(x) (checked on 2 random images at the run's size, in eval mode)."""
    missing = [a for a in ("forward_features", "forward_head", "get_classifier") if not hasattr(model, a)]
    if missing:
        return f"it has no {', '.join(missing)} (a timm model has them)"
    head: Any = model.get_classifier()  # type: ignore[operator]
    if not isinstance(head, nn.Module):
        return "its classifier is not one module (a distilled model with two heads?)"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, image_size, image_size)
            logits, features = PooledFeatures(model)(x)
            plain = model(x)
    except Exception as err:  # any failure to decompose the forward
        return f"forward_head(pre_logits=True) failed ({type(err).__name__}: {err})"
    finally:
        model.train(was_training)
    if features.dim() != 2:
        return f"its pooled features have shape {tuple(features.shape)}, not (N, D)"
    if not (isinstance(plain, torch.Tensor) and torch.allclose(logits, plain, atol=1e-4, rtol=1e-3)):
        return "forward_features -> forward_head(pre_logits=True) -> get_classifier() differs from its forward"
    return None


def alignment_ramp(global_step: int, warmup_steps: int) -> float:
    """Linear 0 -> 1 over the first `warmup_steps` optimizer steps, 1 after (and with no warmup)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, global_step / warmup_steps)


def target_batches(loader: Any, epoch: int) -> Iterator[torch.Tensor]:
    """This epoch's endless stream of target image batches: the loader cycled, each pass a new seeded
    shuffle whose key is (epoch, pass), so an epoch's stream depends on nothing before it (a resumed
    run draws what an uninterrupted one would). The loader drops short batches: equal shapes on
    every rank for the all-gathers."""
    for n in count():
        loader.sampler.set_epoch(epoch * 4096 + n)
        for images, _ in loader:
            yield images


@dataclass
class DomainAdapter:
    """strategy.domain_adaptation inside the step: the target stream, the schedule and the loss."""

    method: str
    weight: float
    warmup_steps: int  # of the ramp
    total_steps: int  # of the run: the GRL schedule's progress = global_step / total_steps
    gamma: float
    target_loader: Any
    discriminator: nn.Module | None = None  # dann: the bare module (checkpoints, clipping)
    ddp_discriminator: nn.Module | None = None  # dann: what the loss calls (DDP-wrapped when W > 1)
    _stream: Iterator[torch.Tensor] | None = None

    def start_epoch(self, epoch: int) -> None:
        self._stream = target_batches(self.target_loader, epoch)

    def next_target(self) -> torch.Tensor:
        assert self._stream is not None, "start_epoch first"
        return next(self._stream)

    def loss(
        self,
        net: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        ce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        n_source: int,
        global_step: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, ce, align) for one micro-batch: `images` is source (first n_source) + target."""
        logits, features = net(images)
        ce_loss = ce(logits[:n_source], labels)
        ramp = alignment_ramp(global_step, self.warmup_steps)
        source, target = features[:n_source], features[n_source:]
        if self.method == "dann":
            lambda_ = grl_lambda(global_step / max(self.total_steps, 1), self.gamma) * ramp
            align = alignment_loss("dann", source, target, self.ddp_discriminator, lambda_)
            return ce_loss + self.weight * align, ce_loss, align
        align = alignment_loss(self.method, source, target)
        return ce_loss + self.weight * ramp * align, ce_loss, align
