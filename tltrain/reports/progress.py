"""What `tltrain train` prints: the plan before the run, one line per epoch, the closing summary."""

from __future__ import annotations

import time
from typing import Any, TextIO

from tltrain.core.plan import TrainPlan
from tltrain.spec.metrics import EXPORTED, IMG_PER_S, TRAIN_LOSS, VAL_COUNT, VAL_LOSS, Split, split_metric
from tltrain.spec.schema import JobSpec


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


class Progress:
    """One line per epoch on the driver: loss, the ranked metric, throughput and ETA."""

    def __init__(self, spec: JobSpec, out: TextIO) -> None:
        self.spec = spec
        self.out = out
        self.started = time.monotonic()
        self.first_epoch: int | None = None

    def line(self, metrics: dict[str, Any]) -> None:
        epoch = int(metrics["epoch"])
        total = self.spec.loop.epochs
        if self.first_epoch is None:
            self.first_epoch = epoch - 1
        done_here = epoch - self.first_epoch
        per_epoch = (time.monotonic() - self.started) / max(done_here, 1)
        eta = 0.0 if metrics.get("stopped_early") else per_epoch * (total - epoch)
        key = self.spec.storage.metric
        best = metrics["best_metric"]
        parts = [
            f"epoch {epoch}/{total}",
            f"train/loss {metrics[TRAIN_LOSS]:.4f}",
            f"val/loss {metrics[VAL_LOSS]:.4f}",
            f"{key} {metrics[key]:.4f} (best {'-' if best is None else f'{best:.4f}'})",
            f"{metrics[IMG_PER_S]:.0f} img/s",
            f"ETA {_fmt_duration(eta)}",
        ]
        if metrics.get(EXPORTED) is not None:  # loop.ema_decay on: which twin this checkpoint exports
            parts.append(f"exports {metrics[EXPORTED]}")
        if metrics.get("diverged"):
            parts.append("stopped: the loss diverged (NaN/inf); lower optim.lr or set loop.clip_grad_norm")
        elif metrics.get("stopped_early"):
            parts.append("early stop")
        print("  ".join(parts), file=self.out, flush=True)


def describe_plan(spec: JobSpec, plan: TrainPlan, out: TextIO) -> None:
    freeze = spec.strategy.freeze_depth
    print(
        f"{spec.name}: {spec.model.name} ({plan.num_layer_groups} layer groups + head; freeze_depth {freeze}), "
        f"{len(plan.class_names)} classes, {len(plan.train)} train / {len(plan.val)} val"
        f"{f' / {len(plan.test)} held-out test' if plan.test else ''} images, "
        f"{spec.scaling.num_workers} worker(s) x batch {spec.scaling.batch_size_per_worker}"
        f"{' x accum ' + str(spec.loop.grad_accum) if spec.loop.grad_accum > 1 else ''}, "
        f"{spec.loop.precision}, {'GPU' if spec.scaling.use_gpu else 'CPU'}",
        file=out,
        flush=True,
    )
    if plan.skipped:
        print(
            f"warning: {len(plan.skipped)} file(s) skipped (data.on_bad_image=skip or not images), "
            f"e.g. {plan.skipped[0][0]}: {plan.skipped[0][1]}",
            file=out,
            flush=True,
        )


def print_summary(summary: dict[str, Any], out: TextIO) -> None:
    best = summary["best_metric"]
    print(
        f"done: {summary['run_name']} — {summary['epochs_completed']} epoch(s), best {summary['metric']} {best:.4f}"
        if isinstance(best, float)
        else f"done: {summary['run_name']}",
        file=out,
    )
    print(f"best checkpoint: {summary['best_checkpoint']}", file=out, flush=True)
    test = summary.get("test_metrics")
    if test:
        shown = "  ".join(f"{k} {v:.4f}" for k, v in test.items() if not k.endswith("/count"))
        print(
            f"held-out test ({int(test.get(split_metric(Split.TEST, VAL_COUNT), 0))} images): {shown}",
            file=out,
            flush=True,
        )


def describe_groups(spec: JobSpec, plan: TrainPlan, out: TextIO) -> None:
    """The layer groups, stem first: what `strategy.freeze_depth: N` means for this model."""
    n = plan.num_layer_groups

    def depth(d: int | str) -> int:
        return n if d == "all" else int(d)

    start = depth(spec.strategy.freeze_depth)
    print(f"layer groups of {spec.model.name} ({spec.strategy.group_granularity}), freeze_depth {start}:", file=out)
    for i, (name, params) in enumerate(zip(plan.layer_group_names, plan.layer_group_params)):
        is_head = i == len(plan.layer_group_names) - 1
        state = "trained (new head)" if is_head else "frozen" if i < start else "trained"
        later = [e for e, d in spec.strategy.unfreeze.items() if not is_head and (i < depth(d)) != (i < start)]
        if later:
            state += f" ({'frozen' if state == 'trained' else 'unfrozen'} from epoch {later[0]})"
        print(f"  {i:>3}  {name:<40} {params:>12,} params  {state}", file=out)
