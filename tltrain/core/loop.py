"""The fine-tuning loop: one function that reads top to bottom (the steps are in steps.py).

It knows torch.distributed (when initialised) but not Ray: its only way out is `report(metrics,
checkpoint_dir)`, which every rank calls once per epoch (Ray's report is a barrier); only rank 0
passes a checkpoint directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from tltrain.core.checkpoint import CheckpointMeta, LoopState
from tltrain.core.domain import (
    DISCRIMINATOR_GROUP,
    DomainAdapter,
    DomainDiscriminator,
    PooledFeatures,
    feature_dim,
)
from tltrain.core.live import LiveSteps
from tltrain.core.model import LayerGroup
from tltrain.core.optim import (
    apply_freeze,
    build_optimizer,
    build_scheduler,
    freeze_depth_at_epoch,
    group_lrs,
    resolve_freeze_depth,
    set_frozen_norms_eval,
)
from tltrain.core.steps import (
    DISCRIMINATOR_STATE,
    Report,
    Trainer,
    apply_stop_rule,
    build_loss,
    build_mixup,
    distributed,
    epoch_metrics,
    epoch_seed,
    evaluate,
    pick_twin,
    save_and_report,
    set_backend_flags,
    sync_buffers,
    wrap_ddp,
)
from tltrain.spec.bounds import check_spec_batch
from tltrain.spec.metrics import Split, Twin
from tltrain.spec.schema import JobSpec

__all__ = ["LoopState", "Resume", "evaluate", "train"]


@dataclass
class Resume:
    """What a checkpoint restores besides the weights (already loaded into the model)."""

    train_state: dict[str, Any] | None  # optimizer, scheduler, scaler
    meta: CheckpointMeta
    ema_state: dict[str, torch.Tensor] | None = None  # the EMA weights (loop.ema_decay on)


def _steps_per_epoch(spec: JobSpec, train_loader: Any) -> int:
    _, world_size = distributed()
    # The loader drops short batches: its length x batch is what this worker really holds.
    check_spec_batch(len(train_loader) * spec.scaling.batch_size_per_worker * world_size, spec)
    steps = len(train_loader) // spec.loop.grad_accum
    return min(steps, spec.loop.max_steps_per_epoch or steps)


def _set_epoch(loader: Any, epoch: int) -> None:
    # DeviceLoader has its own set_epoch (shuffle + augmentation); a DataLoader's sampler has one.
    target = loader if hasattr(loader, "set_epoch") else getattr(loader, "sampler", None)
    if target is not None and hasattr(target, "set_epoch"):
        target.set_epoch(epoch)


def _build_ema(model: nn.Module, lp: Any, resume: Resume | None, saved_keys: frozenset[str] | None) -> Any:
    """timm's ModelEmaV3 of the model at a constant decay (None when loop.ema_decay is off), its
    weights restored from the checkpoint on resume. saved_keys (LoRA): the checkpoint holds only
    these; the rest of the copy is the frozen source weights the restored model already has."""
    if lp.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=lp.ema_decay)
    if resume is not None and resume.ema_state is not None:
        if saved_keys is not None and set(resume.ema_state) != saved_keys:
            raise RuntimeError("the checkpoint's EMA twin holds other tensors than this LoRA model trains")
        ema.module.load_state_dict(resume.ema_state, strict=saved_keys is None)
    return ema


def _lora_saved_keys(spec: JobSpec, model: nn.Module) -> frozenset[str] | None:
    if spec.strategy.lora is None:
        return None
    from tltrain.core.lora import adapter_state  # peft is imported only by LoRA runs

    return frozenset(adapter_state(model))


def _build_domain(
    spec: JobSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    num_groups: int,
    target_loader: Any,
    steps_per_epoch: int,
    device: torch.device,
) -> DomainAdapter | None:
    """strategy.domain_adaptation's step state; for dann the discriminator too, seeded from
    loop.seed (DDP broadcasts rank 0's copy anyway), with its own optimizer param group at
    optim.lr x head_lr_mult x discriminator_lr_mult on the run's schedule (added before the
    scheduler is built, so the schedule covers it)."""
    da = spec.strategy.domain_adaptation
    if da is None:
        return None
    if target_loader is None:
        raise ValueError("strategy.domain_adaptation needs the target images' loader")
    _, world_size = distributed()
    adapter = DomainAdapter(method=da.method, weight=da.weight, warmup_steps=round(da.warmup_epochs * steps_per_epoch),
                            total_steps=steps_per_epoch * spec.loop.epochs, gamma=da.grl_gamma,
                            target_loader=target_loader)  # fmt: skip
    if da.method == "dann":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.loop.seed)
            discriminator = DomainDiscriminator(feature_dim(model), hidden=da.discriminator_hidden).to(device)
        scale = spec.strategy.head_lr_mult * da.discriminator_lr_mult
        decay = [p for p in discriminator.parameters() if p.ndim > 1]
        no_decay = [p for p in discriminator.parameters() if p.ndim <= 1]
        for params, wd in ((decay, spec.optim.effective_weight_decay), (no_decay, 0.0)):
            optimizer.add_param_group({"params": params, "lr": spec.optim.lr * scale, "weight_decay": wd,
                                       "lr_scale": scale, "layer_group": num_groups,
                                       "group_name": DISCRIMINATOR_GROUP})  # fmt: skip
        adapter.discriminator = discriminator
        adapter.ddp_discriminator = wrap_ddp(discriminator, device, world_size)
    return adapter


def _default_meta(spec: JobSpec, num_classes: int) -> CheckpointMeta:
    return CheckpointMeta(spec=spec.to_dict(), class_names=[str(i) for i in range(num_classes)],
                          model_name=spec.model.name, data_config={})  # fmt: skip


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
    meta: CheckpointMeta | None = None,
    resume: Resume | None = None,
    started_at: float | None = None,
    class_weights: list[float] | None = None,
    live: LiveSteps | None = None,
    target_loader: Any = None,
    source_val_loader: Any = None,
) -> LoopState:
    """Fine-tune `model` (weights already loaded) for spec.loop.epochs, reporting once per epoch.

    `meta` (class names, data config, lineage) is saved with every checkpoint, its epoch, step and
    metrics filled in here. `started_at` (perf_counter) is when the worker began setting up; the
    first epoch's `epoch_wall_s` counts from there. `class_weights` (per label) weigh the loss.
    `live` (rank 0 only) hears of the steps inside each epoch, for the driver's progress line.
    `target_loader` (strategy.domain_adaptation): this rank's unlabelled target images, cycled
    beside the labelled batches; `source_val_loader` (data.source_val_fraction): scored every
    epoch as val_source/*.
    """
    rank, world_size = distributed()
    lp = spec.loop
    meta = meta or _default_meta(spec, num_classes)
    set_backend_flags(lp, device)
    channels_last = lp.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    steps_per_epoch = _steps_per_epoch(spec, train_loader)
    optimizer = build_optimizer(model, groups, spec.strategy, spec.optim, device)
    domain = _build_domain(spec, model, optimizer, len(groups), target_loader, steps_per_epoch, device)
    scheduler = build_scheduler(optimizer, spec.schedule, steps_per_epoch, lp.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=lp.precision == "fp16")
    state = LoopState()
    if resume is not None:
        if resume.train_state is not None:
            if domain is not None and domain.discriminator is not None:
                if DISCRIMINATOR_STATE not in resume.train_state:  # preflight's _check_dann_resume refuses this first
                    raise RuntimeError(f"{spec.name}'s checkpoint holds no DANN discriminator")
                domain.discriminator.load_state_dict(resume.train_state[DISCRIMINATOR_STATE])
            optimizer.load_state_dict(resume.train_state["optimizer"])
            scheduler.load_state_dict(resume.train_state["scheduler"])
            scaler.load_state_dict(resume.train_state["scaler"])
        state = resume.meta.loop_state
        if state.history and state.history[-1].get("stopped_early"):
            # Early stopping already ended this run: re-running its name finds it finished (like a
            # run at its last epoch) instead of training one more epoch past the patience limit.
            return state

    # torch.compile of a Module returns an OptimizedModule (a Module); its hint says only Callable.
    compiled = cast(nn.Module, torch.compile(model)) if lp.compile else model
    # Domain adaptation trains through a wrapper returning (logits, pooled features); evaluation,
    # checkpoints and the EMA keep the plain model.
    train_net = compiled
    if domain is not None:
        features = PooledFeatures(model)
        train_net = cast(nn.Module, torch.compile(features)) if lp.compile else features
    loss = build_loss(lp, class_weights, device)
    saved_keys = _lora_saved_keys(spec, model)
    trainer = Trainer(model, compiled, optimizer, scheduler, scaler, device, lp, channels_last, loss,
                      mixup=build_mixup(lp, num_classes), ema=_build_ema(model, lp, resume, saved_keys), live=live,
                      saved_keys=saved_keys, domain=domain)  # fmt: skip
    # Wall time between reports: training, evaluation, checkpoint save and the previous report's
    # upload (the cost of holding the workers; epoch_time_s is the training steps alone).
    since_report = started_at if started_at is not None else time.perf_counter()
    current_depth: int | None = None

    for epoch in range(state.epoch, lp.epochs):
        depth = resolve_freeze_depth(freeze_depth_at_epoch(spec.strategy, epoch), groups)
        if depth != current_depth:
            if spec.strategy.lora is None:  # a LoRA model came frozen around its adapters (core/lora)
                apply_freeze(model, groups, depth)
            trainer.ddp_model = wrap_ddp(train_net, device, world_size)
            current_depth = depth
        # A new seeded shuffle (the same on every rank) and this epoch's augmentation and model-noise
        # streams: all functions of (seed, epoch), so resuming at any epoch continues exactly.
        _set_epoch(train_loader, epoch)
        torch.manual_seed(epoch_seed(lp.seed, rank, epoch))
        np.random.seed(epoch_seed(lp.seed, rank, epoch) % 2**32)  # timm's Mixup draws from numpy

        trainer.ddp_model.train()
        set_frozen_norms_eval(model)
        if domain is not None:
            domain.start_epoch(epoch)
        if live is not None:
            live.start_epoch(epoch + 1, lp.epochs, steps_per_epoch)
        sums = trainer.train_epoch(train_loader, steps_per_epoch, state)
        train_metrics = epoch_metrics(sums, device)
        # The unwrapped module: a DDP forward in eval is a collective (buffer broadcast) that a rank
        # with no val images would never join. Rank 0's buffers first, so every rank scores one model.
        sync_buffers(model)
        val = evaluate(compiled, val_loader, device, num_classes, lp.precision, channels_last)
        exported = Twin.RAW
        if trainer.ema is not None:  # scored beside the raw weights; the better one is exported
            sync_buffers(trainer.ema.module)
            ema_val = evaluate(trainer.ema.module, val_loader, device, num_classes, lp.precision, channels_last)
            exported, val = pick_twin(val, ema_val, spec)
        confusion = val.pop("confusion_matrix")
        if source_val_loader is not None:  # the exported twin on the source domain
            scored = trainer.ema.module if trainer.ema is not None and exported == Twin.EMA else compiled
            source_val = evaluate(scored, source_val_loader, device, num_classes, lp.precision, channels_last,
                                  split=Split.SOURCE_VAL)  # fmt: skip
            source_val.pop("confusion_matrix")
            val.update(source_val)
        state.epoch = epoch + 1

        metrics: dict[str, Any] = {
            "epoch": state.epoch,
            "global_step": state.global_step,
            **train_metrics,
            **val,
            "freeze_depth": depth,
            **group_lrs(optimizer),
        }
        stop = apply_stop_rule(metrics, state, spec)
        save_and_report(trainer, metrics, confusion, state, meta, report, since_report)
        since_report = time.perf_counter()
        if stop:
            break
    return state
