"""The fine-tuning loop: one function that reads top to bottom.

It knows torch.distributed (when initialised) but not Ray: its only way out is `report(metrics,
checkpoint_dir)`, which every rank calls once per epoch (Ray's report is a barrier); only rank 0
passes a checkpoint directory.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tltrain.checkpoint import save_checkpoint
from tltrain.config import JobSpec
from tltrain.model import LayerGroup
from tltrain.optim import (
    apply_freeze,
    build_optimizer,
    build_scheduler,
    freeze_depth_at_epoch,
    group_lrs,
    resolve_freeze_depth,
    set_frozen_norms_eval,
)

Report = Callable[[dict[str, Any], "str | None"], None]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class Resume:
    """What a checkpoint restores besides the weights (already loaded into the model)."""

    train_state: dict[str, Any] | None
    meta: dict[str, Any]


@dataclass
class LoopState:
    epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def _wrap(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """DDP registers only params that require grad when it is built, so it is rebuilt whenever
    freezing changes (progressive unfreezing)."""
    if world_size == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def _micro_batches(loader: Iterator, n: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Yield groups of `n` micro-batches (one optimizer step); a short tail is dropped so every
    step has the same effective batch and all ranks take the same number of steps."""
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


def evaluate(
    model: nn.Module, loader: Any, device: torch.device, num_classes: int, precision: str, channels_last: bool
) -> dict[str, Any]:
    """Loss, top-1 and per-class accuracy over the whole val set: each rank evaluates its shard
    (no padding) and the sums are all-reduced."""
    model.eval()
    dtype = AUTOCAST_DTYPES[precision]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    with torch.no_grad():
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(images)
            loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
            preds = logits.argmax(dim=1)
            confusion += torch.bincount(labels * num_classes + preds, minlength=num_classes**2).view(
                num_classes, num_classes
            )
    _all_reduce_sum(loss_sum)
    _all_reduce_sum(confusion)
    total = int(confusion.sum())
    correct = int(confusion.diag().sum())
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double()).tolist()
    return {
        "val/loss": float(loss_sum) / max(total, 1),
        "val/acc": correct / max(total, 1),
        "val/acc_per_class": per_class,
        "val/count": total,
        "confusion_matrix": confusion.cpu().tolist(),
    }


def improved(value: float, best: float | None, mode: str) -> bool:
    """Whether `value` beats `best` under `mode` (anything beats no best yet)."""
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def train(
    spec: JobSpec,
    model: nn.Module,
    groups: list[LayerGroup],
    train_loader: Any,
    val_loader: Any,
    *,
    device: torch.device,
    num_classes: int,
    report: Report,
    meta: dict[str, Any],
    resume: Resume | None = None,
    started_at: float | None = None,
) -> LoopState:
    """Fine-tune `model` (weights already loaded) for spec.loop.epochs, reporting once per epoch.

    `meta` is saved with every checkpoint (class names, data config, lineage) and updated here with
    the epoch, step and metrics. `started_at` (perf_counter) is when the worker began setting up;
    the first epoch's `epoch_wall_s` counts from there.
    """
    rank, world_size = _distributed()
    lp = spec.loop
    torch.manual_seed(lp.seed + rank)
    dtype = AUTOCAST_DTYPES[lp.precision]
    channels_last = lp.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        # Fixed input shapes: cuDNN times its algorithms once and keeps the fastest.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = lp.tf32
        torch.backends.cudnn.allow_tf32 = lp.tf32

    steps_per_epoch = len(train_loader) // lp.grad_accum
    if lp.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, lp.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(
            f"scaling.batch_size_per_worker x loop.grad_accum ({spec.scaling.batch_size_per_worker} x {lp.grad_accum}) "
            "needs more training images per worker than this worker has"
        )

    optimizer = build_optimizer(model, groups, spec.strategy, spec.optim, device)
    scheduler = build_scheduler(optimizer, spec.schedule, steps_per_epoch, lp.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=lp.precision == "fp16")
    state = LoopState()
    if resume is not None:
        if resume.train_state is not None:
            optimizer.load_state_dict(resume.train_state["optimizer"])
            scheduler.load_state_dict(resume.train_state["scheduler"])
            scaler.load_state_dict(resume.train_state["scaler"])
        loop_meta = resume.meta["loop_state"]
        state = LoopState(**loop_meta)
        if state.history and state.history[-1].get("stopped_early"):
            # Early stopping already ended this run: re-running its name finds it finished (like a
            # run at its last epoch) instead of training one more epoch past the patience limit.
            return state

    # Wall time between reports: training, evaluation, checkpoint save and the previous report's
    # upload (the cost of holding the workers; epoch_time_s is the training steps alone).
    since_report = started_at if started_at is not None else time.perf_counter()
    compiled = torch.compile(model) if lp.compile else model
    current_depth: int | None = None
    ddp_model: nn.Module = compiled

    for epoch in range(state.epoch, lp.epochs):
        depth = resolve_freeze_depth(freeze_depth_at_epoch(spec.strategy, epoch), groups)
        if depth != current_depth:
            apply_freeze(model, groups, depth)
            ddp_model = _wrap(compiled, device, world_size)
            current_depth = depth
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)  # a new, seeded shuffle each epoch, the same on every rank

        ddp_model.train()
        set_frozen_norms_eval(model)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        images_seen = 0
        data_wait_s = 0.0
        t_epoch = time.perf_counter()
        t_fetch = time.perf_counter()
        for step_in_epoch, micro in enumerate(_micro_batches(iter(train_loader), lp.grad_accum)):
            if step_in_epoch >= steps_per_epoch:
                break
            data_wait_s += time.perf_counter() - t_fetch
            for i, (images, labels) in enumerate(micro):
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                # Gradients are all-reduced only on the last micro-batch of the step.
                sync = i == len(micro) - 1 or not isinstance(ddp_model, DDP)
                with contextlib.nullcontext() if sync else ddp_model.no_sync():
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        logits = ddp_model(images)
                        loss = nn.functional.cross_entropy(logits, labels, label_smoothing=lp.label_smoothing)
                    scaler.scale(loss / lp.grad_accum).backward()
                loss_sum += loss.detach().double() * images.shape[0]
                images_seen += images.shape[0]
            if lp.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.grad is not None], lp.clip_grad_norm
                )
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            t_fetch = time.perf_counter()

        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = torch.tensor(time.perf_counter() - t_epoch, dtype=torch.float64, device=device)
        totals = torch.tensor([float(loss_sum), images_seen, data_wait_s], dtype=torch.float64, device=device)
        _all_reduce_sum(totals)
        _all_reduce_max(train_time)
        val = evaluate(ddp_model, val_loader, device, num_classes, lp.precision, channels_last)
        state.epoch = epoch + 1

        metrics: dict[str, Any] = {
            "epoch": state.epoch,
            "global_step": state.global_step,
            "train/loss": float(totals[0] / max(float(totals[1]), 1.0)),
            **{k: v for k, v in val.items() if k != "confusion_matrix"},
            "img_per_s": float(totals[1]) / max(float(train_time), 1e-9),
            "epoch_time_s": float(train_time),
            "data_wait_frac": float(totals[2]) / world_size / max(float(train_time), 1e-9),
            "freeze_depth": depth,
            **group_lrs(optimizer),
        }
        value = metrics.get(spec.storage.metric)
        if value is None:
            raise ValueError(f"storage.metric: {spec.storage.metric!r} is not a reported metric ({sorted(metrics)})")
        # A NaN/inf loss does not come back: stop (Ray ranks the NaN checkpoint last) rather than
        # fail, which would restart the workers from the last checkpoint into the same divergence.
        diverged = not (math.isfinite(metrics["train/loss"]) and math.isfinite(value))
        if not diverged and improved(value, state.best_metric, spec.storage.mode):
            state.best_metric = value
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        stop_early = diverged or (
            lp.early_stop_patience is not None and state.evals_without_improvement >= lp.early_stop_patience
        )
        metrics["best_metric"] = state.best_metric
        metrics["stopped_early"] = stop_early
        metrics["diverged"] = diverged
        metrics["epoch_wall_s"] = time.perf_counter() - since_report
        state.history.append({k: v for k, v in metrics.items() if not isinstance(v, list)})

        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="tltrain-ckpt-") as ckpt_dir:
                meta.update(
                    epoch=state.epoch,
                    global_step=state.global_step,
                    metrics={k: v for k, v in metrics.items() if not k.startswith("lr/")},
                    confusion_matrix=val["confusion_matrix"],
                    loop_state=state.__dict__,
                )
                train_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                }
                save_checkpoint(ckpt_dir, model.state_dict(), train_state, meta)
                report(metrics, ckpt_dir)
        else:
            report(metrics, None)
        since_report = time.perf_counter()
        if stop_early:
            break
    return state
