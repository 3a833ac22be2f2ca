"""`tltrain train` on the driver: preflight, the Ray run, live progress, tracking, the summary."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tltrain.config import JobSpec
from tltrain.preflight import TrainPlan, build_plan


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


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
            f"train/loss {metrics['train/loss']:.4f}",
            f"val/loss {metrics['val/loss']:.4f}",
            f"{key} {metrics[key]:.4f} (best {'-' if best is None else f'{best:.4f}'})",
            f"{metrics['img_per_s']:.0f} img/s",
            f"ETA {_fmt_duration(eta)}",
        ]
        if metrics.get("diverged"):
            parts.append("stopped: the loss diverged (NaN/inf); lower optim.lr or set loop.clip_grad_norm")
        elif metrics.get("stopped_early"):
            parts.append("early stop")
        print("  ".join(parts), file=self.out, flush=True)


def describe_plan(spec: JobSpec, plan: TrainPlan, out: TextIO) -> None:
    freeze = spec.strategy.freeze_depth
    print(
        f"{spec.name}: {spec.model.name} ({plan.num_layer_groups} layer groups + head; freeze_depth {freeze}), "
        f"{len(plan.class_names)} classes, {len(plan.train)} train / {len(plan.val)} val images, "
        f"{spec.scaling.num_workers} worker(s) x batch {spec.scaling.batch_size_per_worker}"
        f"{' x accum ' + str(spec.loop.grad_accum) if spec.loop.grad_accum > 1 else ''}, "
        f"{spec.loop.precision}, {'GPU' if spec.scaling.use_gpu else 'CPU'}",
        file=out,
        flush=True,
    )
    if plan.skipped:
        print(f"warning: {len(plan.skipped)} file(s) skipped (data.on_bad_image=skip or not images), "
              f"e.g. {plan.skipped[0][0]}: {plan.skipped[0][1]}", file=out, flush=True)


def run_train(spec: JobSpec, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Train one job end to end and return the summary (the `--json` object)."""
    from tltrain.ray_train import fit

    plan = build_plan(spec)
    describe_plan(spec, plan, out)
    progress = Progress(spec, out)
    history: list[dict[str, Any]] = []
    with _open_tracker(spec) as tracker:
        tracker.log_spec(spec.to_dict())
        if spec.tracking.enabled:
            from tltrain.tracking import lineage_tags

            tracker.set_tags(lineage_tags(
                spec.to_dict(), plan.fingerprint, source_weights_uri=str(plan.weights_uri),
                source_weights_sha256=plan.weights_sha256, ray_run=spec.name,
            ))

        def on_report(metrics: dict[str, Any], checkpoint_uri: str | None) -> None:
            progress.line(metrics)
            history.append(metrics)
            tracker.log_epoch(metrics, step=int(metrics["epoch"]))

        result = fit(spec, plan, on_report)
        if result.error is not None:
            tracker.end("FAILED")
            raise result.error
        summary = _summary(spec, result, history)
        summary["mlflow_run_id"] = tracker.run_id
        tracker.log_final(result.best_checkpoint_uri, history)
        if spec.tracking.registry_name and not spec.tracking.enabled:
            print("note: tracking.registry_name is set but tracking.enabled is false: not registered "
                  "(run `tltrain register CHECKPOINT --name NAME` later)", file=out)
        if spec.tracking.enabled and spec.tracking.registry_name and result.best_checkpoint_uri:
            from tltrain.registry import register_checkpoint

            version = register_checkpoint(
                result.best_checkpoint_uri, spec.tracking.registry_name,
                tracking_uri=spec.tracking.uri, run_id=tracker.run_id,
            )
            summary["registered_model"] = f"models:/{version.name}/{version.version}"
    _print_summary(summary, out)
    return summary


def _open_tracker(spec: JobSpec) -> Any:
    if not spec.tracking.enabled:
        from tltrain.tracking_base import NullTracker

        return NullTracker()
    from tltrain.tracking import open_tracker

    return open_tracker(spec, run_name=spec.name)


def _summary(spec: JobSpec, result: Any, history: list[dict[str, Any]]) -> dict[str, Any]:
    last = history[-1] if history else (result.latest_metrics or {})
    best = result.best_metrics or {}
    return {
        "run_name": spec.name,
        "metric": spec.storage.metric,
        "best_metric": best.get(spec.storage.metric, last.get("best_metric")),
        "best_checkpoint": result.best_checkpoint_uri,
        "epochs_completed": int(last.get("epoch", 0)),
        "epochs_this_invocation": len(history),
        "stopped_early": bool(last.get("stopped_early", False)),
        "diverged": bool(last.get("diverged", False)),
        "img_per_s": (sum(h["img_per_s"] for h in history) / len(history)) if history else None,
        "storage_uri": f"{spec.storage.uri.rstrip('/')}/{spec.name}",
    }


def _print_summary(summary: dict[str, Any], out: TextIO) -> None:
    best = summary["best_metric"]
    print(
        f"done: {summary['run_name']} — {summary['epochs_completed']} epoch(s), best {summary['metric']} "
        f"{best:.4f}" if isinstance(best, float) else f"done: {summary['run_name']}",
        file=out,
    )
    print(f"best checkpoint: {summary['best_checkpoint']}", file=out, flush=True)
