"""What `tltrain train` prints: the plan before the run, one line per epoch, the closing summary."""

from __future__ import annotations

import time
from typing import Any, TextIO

from tltrain.core.live import tenth
from tltrain.core.plan import TrainPlan
from tltrain.spec.metrics import (
    ALIGN_LOSS,
    DATA_WAIT_FRAC,
    EXPORTED,
    IMG_PER_S,
    TRAIN_LOSS,
    VAL_COUNT,
    VAL_LOSS,
    Split,
    split_metric,
)
from tltrain.spec.schema import JobSpec


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _is_tty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):  # a closed or foreign stream
        return False


class Progress:
    """On the driver: one line per epoch (loss, the ranked metric, throughput, ETA) and, inside an
    epoch, rank 0's step progress: refreshed in place on a terminal, a plain line every tenth of
    the epoch when the output is a file or a submitted job's log."""

    def __init__(self, spec: JobSpec, out: TextIO) -> None:
        self.spec = spec
        self.out = out
        self.started = time.monotonic()
        self.first_epoch: int | None = None
        self.tty = _is_tty(out)
        self._live = False  # a refreshed step line is on screen (no newline yet)
        self._printed: tuple[int, int] = (0, 0)  # (epoch, tenth) of the last plain step line
        self._epoch_s: float | None = None  # the last whole epoch's wall time (train + eval + save)
        self._last_line: float | None = None  # when the last epoch line was printed
        self._reported = 0  # the last epoch whose line is printed
        self._held: list[dict[str, Any]] = []
        self._base: int | None = None

    def step(self, message: dict[str, Any]) -> None:
        """A step message of core.live: steps, img/s, loss, data wait, ETA of the epoch and run.

        Rank 0 sends these straight to the driver while the epoch's report goes through Ray
        Train's controller, which can deliver it after the next epoch's first steps: those wait
        for it, so the lines stay in epoch order."""
        epoch = int(message["epoch"])
        if self._base is None:  # the run's first epoch here (a resumed run starts later)
            self._base = epoch - 1
        if epoch > max(self._reported, self._base) + 1:
            self._held.append(message)
            return
        self._show(message)

    def _show(self, message: dict[str, Any]) -> None:
        epoch, epochs = int(message["epoch"]), int(message["epochs"])
        step, steps = int(message["step"]), int(message["steps"])
        if not self.tty:
            at = (epoch, tenth(step, steps))
            if at[1] == 0 or at <= self._printed:
                return  # between tenths: only a terminal refreshes
            self._printed = at
        per_step = message["elapsed_s"] / max(step, 1)
        epoch_left = per_step * (steps - step)
        per_epoch = self._epoch_s or per_step * steps
        text = (
            f"  epoch {epoch}/{epochs}  step {step}/{steps} ({100 * step // max(steps, 1)}%)  "
            f"{message[IMG_PER_S]:.0f} img/s  loss {message['loss']:.4f}  "
            f"data-wait {100 * message[DATA_WAIT_FRAC]:.0f}%  "
            f"ETA epoch {_fmt_duration(epoch_left)}, run {_fmt_duration(epoch_left + per_epoch * (epochs - epoch))}"
        )
        if self.tty:
            self.out.write(f"\r{text}\x1b[K")
            self.out.flush()
            self._live = True
        else:
            print(text, file=self.out, flush=True)

    def _end_live(self) -> None:
        if self._live:  # the epoch line replaces the refreshed step line
            self.out.write("\r\x1b[K")
            self._live = False

    def line(self, metrics: dict[str, Any]) -> None:
        self._end_live()
        now = time.monotonic()
        if self._last_line is not None:  # between two epoch lines: one whole epoch, set-up excluded
            self._epoch_s = now - self._last_line
        self._last_line = now
        self._epoch_line(metrics)
        self._reported = int(metrics["epoch"])
        held, self._held = self._held, []
        for message in held[-1:] if self.tty else held:  # a terminal needs only the newest
            self.step(message)

    def _epoch_line(self, metrics: dict[str, Any]) -> None:
        epoch = int(metrics["epoch"])
        total = self.spec.loop.epochs
        if self.first_epoch is None:
            self.first_epoch = epoch - 1
        done_here = epoch - self.first_epoch
        per_epoch = (time.monotonic() - self.started) / max(done_here, 1)
        eta = 0.0 if metrics.get("stopped_early") else per_epoch * (total - epoch)
        key = self.spec.storage.metric
        best = metrics["best_metric"]
        # Domain adaptation: the alignment loss, and the source domain's score beside the target's
        # (data.source_val_fraction), so the trade shows; both absent otherwise.
        source_key = split_metric(Split.SOURCE_VAL, key)
        optional = {k: f"{k} {metrics[k]:.4f}" for k in (ALIGN_LOSS, source_key) if k in metrics}
        maybe = [
            f"epoch {epoch}/{total}",
            f"train/loss {metrics[TRAIN_LOSS]:.4f}",
            optional.get(ALIGN_LOSS),
            f"val/loss {metrics[VAL_LOSS]:.4f}",
            f"{key} {metrics[key]:.4f} (best {'-' if best is None else f'{best:.4f}'})",
            optional.get(source_key),
            f"{metrics[IMG_PER_S]:.0f} img/s",
            f"ETA {_fmt_duration(eta)}",
        ]
        parts = [p for p in maybe if p is not None]
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
    if spec.strategy.lora is not None:
        lora = spec.strategy.lora
        print(
            f"LoRA rank {lora.rank} (alpha {lora.alpha:g}) on {plan.lora_modules} layers: {plan.trainable_params:,} of "
            f"{plan.total_params:,} parameters trained ({100 * plan.trainable_params / max(plan.total_params, 1):.2f} %, "
            "adapters + head); checkpoints hold only those",
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
    size = summary.get("checkpoint_mb")
    print(f"best checkpoint: {summary['best_checkpoint']}{f' ({size:.1f} MB)' if size else ''}", file=out, flush=True)
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
        trained = "LoRA adapters (base frozen)" if spec.strategy.lora is not None else "trained"
        state = "trained (new head)" if is_head else "frozen" if i < start else trained
        later = [e for e, d in spec.strategy.unfreeze.items() if not is_head and (i < depth(d)) != (i < start)]
        if later:
            state += f" ({'frozen' if state == 'trained' else 'unfrozen'} from epoch {later[0]})"
        print(f"  {i:>3}  {name:<40} {params:>12,} params  {state}", file=out)
    if spec.strategy.lora is not None:
        print(
            f"LoRA: {plan.lora_modules} layers adapted; {plan.trainable_params:,} of {plan.total_params:,} "
            "parameters trained (adapters + head)",
            file=out,
        )
