"""The pieces `loop.train` is made of: backend set-up, one training epoch, evaluation, the stop rule,
and saving + reporting an epoch. Each reads top to bottom; the loop calls them in order.

Everything here knows torch.distributed (when initialised) but not Ray.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tltrain.core.checkpoint import CheckpointMeta, LoopState, save_checkpoint
from tltrain.core.domain import DomainAdapter
from tltrain.core.live import LiveSteps
from tltrain.core.scores import summary_scores
from tltrain.core.tta import Views, tta_log_probs
from tltrain.spec.metrics import (
    ALIGN_LOSS,
    DATA_WAIT_FRAC,
    EPOCH_TIME_S,
    EPOCH_WALL_S,
    EXPORTED,
    IMG_PER_S,
    LR_PREFIX,
    TOP5_MIN_CLASSES,
    TRAIN_LOSS,
    VAL_ACC,
    VAL_ACC_PER_CLASS,
    VAL_BALANCED_ACC,
    VAL_COUNT,
    VAL_F1_MACRO,
    VAL_LOSS,
    VAL_TOP5,
    Split,
    Twin,
    better,
    split_metric,
    twin_split,
)
from tltrain.spec.schema import JobSpec, LoopSpec

# report(metrics, checkpoint_dir): every rank calls it once per epoch (Ray's report is a barrier);
# only rank 0 passes a checkpoint directory.
Report = Callable[[dict[str, Any], "str | None"], None]

DISCRIMINATOR_STATE = "discriminator"  # train_state.pt's key of the DANN discriminator's weights
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype `loop.precision` computes in under autocast; None = fp32 (autocast off)."""
    return _AUTOCAST_DTYPES[precision]


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of a rank's model noise (dropout, drop-path) in one epoch: reseeding from it at every
    epoch start makes a resumed run draw what an uninterrupted one would."""
    return random.Random(f"model:{seed}:{rank}:{epoch}").getrandbits(63)


def sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: DDP broadcasts them at each
    training forward, but each rank updates its copy after that, and evaluation runs the unwrapped
    module. Every rank calls this (a collective), whatever its share of the val set."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def set_backend_flags(lp: LoopSpec, device: torch.device) -> None:
    if device.type == "cuda":
        # Fixed input shapes: cuDNN times its algorithms once and keeps the fastest.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = lp.tf32
        torch.backends.cudnn.allow_tf32 = lp.tf32


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """DDP registers only params that require grad when it is built, so it is rebuilt whenever
    freezing changes (progressive unfreezing)."""
    if world_size == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def _micro_batches(loader: Iterable[Any], n: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Yield groups of `n` micro-batches (one optimizer step); a short tail is dropped so every
    step has the same effective batch and all ranks take the same number of steps."""
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_loss(lp: LoopSpec, class_weights: list[float] | None, device: torch.device) -> Loss:
    """loss(logits, target): target is class indices, or (with mixup/cutmix) soft targets that
    already carry the label smoothing. Class weights weigh each image's loss by its class, as
    cross_entropy(weight=...) does: a weighted mean, so the loss scale does not move with them."""
    from timm.loss import SoftTargetCrossEntropy

    weight = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights else None
    soft = SoftTargetCrossEntropy()

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 1:
            return nn.functional.cross_entropy(logits, target, weight=weight, label_smoothing=lp.label_smoothing)
        if weight is None:
            return soft(logits.float(), target)
        # timm has no class-weighted soft-target loss: the weighted mean cross_entropy(weight=) uses.
        w = target * weight
        return torch.sum(-w * nn.functional.log_softmax(logits.float(), dim=-1)) / w.sum()

    return loss


def build_mixup(lp: LoopSpec, num_classes: int) -> Callable[..., Any] | None:
    """timm's Mixup (batch mode: one lambda per batch, each image mixed with the batch reversed),
    or None when loop.mixup_alpha and loop.cutmix_alpha are 0. It draws from numpy's global RNG,
    which the loop reseeds every epoch."""
    if not lp.mixes:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=lp.mixup_alpha,
        cutmix_alpha=lp.cutmix_alpha,
        prob=lp.mix_prob,
        switch_prob=lp.mix_switch_prob,
        mode="batch",
        label_smoothing=lp.label_smoothing,
        num_classes=num_classes,
    )


@dataclass
class Trainer:
    """What one optimizer step needs; built once per run (the DDP wrapper is rebuilt on unfreezing)."""

    model: nn.Module  # the bare module (checkpoints, freezing, clipping)
    ddp_model: nn.Module  # what the forward runs through (DDP and/or compiled)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    lp: LoopSpec
    channels_last: bool
    loss: Loss
    mixup: Callable[..., Any] | None = None
    ema: Any = None  # timm ModelEmaV3 of `model`, updated after every optimizer step; None = off
    live: LiveSteps | None = None  # rank 0's in-epoch progress to the driver; None elsewhere
    # strategy.lora: the state_dict entries a checkpoint keeps (adapters and head: what trains);
    # None = the whole state_dict.
    saved_keys: frozenset[str] | None = None
    # strategy.domain_adaptation: the target stream and alignment loss; ddp_model then returns
    # (logits, pooled features). None = off (the step is exactly the plain one).
    domain: DomainAdapter | None = None

    def _no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """DDP's no_sync of the model and (dann) of the discriminator's own DDP wrapper."""
        if self.domain is None or not isinstance(self.domain.ddp_discriminator, DDP):
            return cast(DDP, self.ddp_model).no_sync()
        stack = contextlib.ExitStack()
        stack.enter_context(cast(DDP, self.ddp_model).no_sync())
        stack.enter_context(self.domain.ddp_discriminator.no_sync())
        return stack

    def _clipped_params(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.domain is not None and self.domain.discriminator is not None:
            params += [p for p in self.domain.discriminator.parameters() if p.grad is not None]
        return params

    def saved(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state if self.saved_keys is None else {k: state[k] for k in sorted(self.saved_keys)}

    def train_epoch(self, loader: Any, steps: int, state: LoopState) -> dict[str, float]:
        """`steps` optimizer steps of grad_accum micro-batches; returns this rank's sums."""
        lp, device = self.lp, self.device
        dtype = autocast_dtype(lp.precision)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        align_sum = torch.zeros((), dtype=torch.float64, device=device)  # domain adaptation only
        images_seen, data_wait_s = 0, 0.0
        t_epoch = t_fetch = time.perf_counter()
        for step_in_epoch, micro in enumerate(_micro_batches(loader, lp.grad_accum)):
            if step_in_epoch >= steps:
                break
            data_wait_s += time.perf_counter() - t_fetch
            for i, (images, labels) in enumerate(micro):
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if self.mixup is not None:  # blends images and turns labels into soft targets
                    images, labels = self.mixup(images, labels)
                n_source = images.shape[0]
                if self.domain is not None:  # one forward of source + target (mixup on source only)
                    target = self.domain.next_target().to(device, non_blocking=True)
                    images = torch.cat([images, target])
                if self.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                # Gradients are all-reduced only on the last micro-batch of the step.
                sync = i == len(micro) - 1 or not isinstance(self.ddp_model, DDP)
                with contextlib.nullcontext() if sync else self._no_sync():
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        if self.domain is None:
                            logits = self.ddp_model(images)
                            loss = self.loss(logits, labels)
                            total = loss
                        else:
                            total, loss, align = self.domain.loss(
                                self.ddp_model, images, labels, self.loss, n_source, state.global_step
                            )
                            align_sum += align.detach().double() * n_source
                    # Divided by the accumulation steps: the summed gradient is the mean over the step.
                    self.scaler.scale(total / lp.grad_accum).backward()
                # Domain adaptation: the labelled (source) images are the epoch's images.
                loss_sum += loss.detach().double() * n_source
                images_seen += n_source
            if lp.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self._clipped_params(), lp.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:  # every rank holds the same weights after the step: no collective
                self.ema.update(self.model)
            state.global_step += 1
            if self.live is not None:
                self.live.step(step_in_epoch + 1, images_seen, loss_sum, data_wait_s)
            t_fetch = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sums = {"loss_sum": float(loss_sum), "images": images_seen, "data_wait_s": data_wait_s,
                "seconds": time.perf_counter() - t_epoch}  # fmt: skip
        if self.domain is not None:
            sums["align_sum"] = float(align_sum)
        return sums


def epoch_metrics(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Training loss, throughput and data wait over all ranks (sums all-reduced, time the slowest)."""
    _, world_size = distributed()
    totals = torch.tensor([sums["loss_sum"], sums["images"], sums["data_wait_s"]], dtype=torch.float64, device=device)
    seconds = torch.tensor(sums["seconds"], dtype=torch.float64, device=device)
    _all_reduce(totals)
    _all_reduce(seconds, dist.ReduceOp.MAX if dist.is_available() else None)
    train_time = max(float(seconds), 1e-9)
    out = {
        TRAIN_LOSS: float(totals[0] / max(float(totals[1]), 1.0)),
        IMG_PER_S: float(totals[1]) / train_time,
        EPOCH_TIME_S: float(seconds),
        DATA_WAIT_FRAC: float(totals[2]) / world_size / train_time,
    }
    if "align_sum" in sums:  # domain adaptation: every rank has the key, so every rank joins
        # MMD / CORAL are global-batch values (the same on every rank): the mean over ranks is that value.
        align = _all_reduce(torch.tensor(sums["align_sum"], dtype=torch.float64, device=device))
        out[ALIGN_LOSS] = float(align) / max(float(totals[1]), 1.0)
    return out


def evaluate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    num_classes: int,
    precision: str,
    channels_last: bool,
    *,
    split: str = Split.VAL,
    views: Views | None = None,
) -> dict[str, Any]:
    """Loss, top-1, macro-F1, balanced accuracy, top-5 (with >= 5 classes) and per-class accuracy
    over the whole split, named <split>/<key>: each rank evaluates its shard (no padding) and the
    confusion matrix and sums are all-reduced. `views` (test-time augmentation) averages the
    predicted probabilities over views of each batch (core/tta.py)."""
    model.eval()
    dtype = autocast_dtype(precision)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, top-5 hits
    confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    k = min(5, num_classes)
    with torch.no_grad():
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logp = tta_log_probs(model, images, views)
            sums[0] += nn.functional.nll_loss(logp, labels, reduction="sum").double()
            sums[1] += (logp.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum().double()
            preds = logp.argmax(dim=1)
            confusion += torch.bincount(labels * num_classes + preds, minlength=num_classes**2).view(
                num_classes, num_classes
            )
    _all_reduce(sums)
    _all_reduce(confusion)
    total = int(confusion.sum())
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double()).tolist()
    scores = summary_scores(confusion.cpu().tolist())
    out: dict[str, Any] = {
        split_metric(split, VAL_LOSS): float(sums[0]) / max(total, 1),
        split_metric(split, VAL_ACC): scores["acc"],
        split_metric(split, VAL_F1_MACRO): scores["f1_macro"],
        split_metric(split, VAL_BALANCED_ACC): scores["balanced_acc"],
        split_metric(split, VAL_ACC_PER_CLASS): per_class,
        split_metric(split, VAL_COUNT): total,
        "confusion_matrix": confusion.cpu().tolist(),
    }
    if num_classes >= TOP5_MIN_CLASSES:
        out[split_metric(split, VAL_TOP5)] = float(sums[1]) / max(total, 1)
    return out


def selection_metric(spec: JobSpec) -> tuple[str, str]:
    """(val metric, mode) that picks the exported twin when EMA is on: storage.metric when it is a
    val/ metric, else val/acc (a throughput or train-loss metric says nothing about which weights
    generalise)."""
    if spec.storage.metric.startswith(f"{Split.VAL}/"):
        return spec.storage.metric, spec.storage.mode
    return VAL_ACC, "max"


def pick_twin(raw: dict[str, Any], ema: dict[str, Any], spec: JobSpec) -> tuple[str, dict[str, Any]]:
    """Which of the raw and EMA weights this checkpoint exports (EMA only if strictly better by the
    selection metric), and the epoch's val metrics: val/* are the exported twin's, val_raw/* and
    val_ema/* both twins' (the selected one's confusion matrix stays under "confusion_matrix")."""
    metric, mode = selection_metric(spec)
    exported = Twin.EMA if better(ema[metric], raw[metric], mode) and ema[metric] != raw[metric] else Twin.RAW
    chosen = ema if exported == Twin.EMA else raw
    out: dict[str, Any] = dict(chosen)
    for twin, values in ((Twin.RAW, raw), (Twin.EMA, ema)):
        for key, value in values.items():
            if key.startswith(f"{Split.VAL}/") and not isinstance(value, list):
                out[split_metric(twin_split(Split.VAL, twin), key)] = value
    out[EXPORTED] = exported
    return exported, out


def apply_stop_rule(metrics: dict[str, Any], state: LoopState, spec: JobSpec) -> bool:
    """Update the best value and patience count from this epoch's metrics; True = stop now.

    A NaN/inf loss does not come back: stop (Ray ranks the NaN checkpoint last) rather than fail,
    which would restart the workers from the last checkpoint into the same divergence."""
    value = metrics[spec.storage.metric]  # the schema checked it is a reported metric
    diverged = not (math.isfinite(metrics[TRAIN_LOSS]) and math.isfinite(value))
    if not diverged and better(value, state.best_metric, spec.storage.mode):
        state.best_metric = value
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    patience = spec.loop.early_stop_patience
    stop = diverged or (patience is not None and state.evals_without_improvement >= patience)
    metrics.update(best_metric=state.best_metric, stopped_early=stop, diverged=diverged)
    return stop


def save_and_report(
    trainer: Trainer,
    metrics: dict[str, Any],
    confusion: list[list[int]],
    state: LoopState,
    meta: CheckpointMeta,
    report: Report,
    since_report: float,
) -> None:
    """Every rank reports once; rank 0 first writes the checkpoint that goes with the report."""
    metrics[EPOCH_WALL_S] = time.perf_counter() - since_report
    state.history.append({k: v for k, v in metrics.items() if not isinstance(v, list)})
    rank, _ = distributed()
    if rank != 0:
        report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="tltrain-ckpt-") as ckpt_dir:
        meta.epoch, meta.global_step = state.epoch, state.global_step
        meta.metrics = {k: v for k, v in metrics.items() if not k.startswith(LR_PREFIX)}
        meta.confusion_matrix = confusion
        meta.loop_state = state
        meta.exported_weights = str(metrics.get(EXPORTED, Twin.RAW))
        train_state = {
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(),
        }
        if trainer.domain is not None and trainer.domain.discriminator is not None:
            train_state[DISCRIMINATOR_STATE] = trainer.domain.discriminator.state_dict()
        raw = trainer.saved(trainer.model.state_dict())
        if trainer.ema is None:
            save_checkpoint(ckpt_dir, raw, train_state, meta)
        else:
            # model.safetensors holds the exported twin (what registry, serving and, for full-weight
            # runs, --set model.weights read); the other twin goes beside it, so a resume restores both.
            ema = trainer.saved(trainer.ema.module.state_dict())
            exported, twin = (ema, (Twin.RAW, raw)) if meta.exported_weights == Twin.EMA else (raw, (Twin.EMA, ema))
            save_checkpoint(ckpt_dir, exported, train_state, meta, twin=twin)
        report(metrics, ckpt_dir)
