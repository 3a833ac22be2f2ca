"""`tltrain train` on the driver: preflight, the Ray run, live progress, tracking, the summary."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tltrain import storage
from tltrain.core.plan import TrainPlan
from tltrain.execution.preflight import build_plan, run_folder
from tltrain.execution.resource_watch import ResourceWatch
from tltrain.reports.progress import Progress, describe_plan, print_summary
from tltrain.spec.metrics import IMG_PER_S, worker_seconds
from tltrain.spec.schema import JobSpec


def run_train(
    spec: JobSpec, out: TextIO | None = None, *, parent_run_id: str | None = None, force_unlock: bool = False
) -> dict[str, Any]:
    """Train one job end to end and return the summary (the `--json` object). `parent_run_id`
    nests its MLflow run under another (`tltrain compare` logs each rung under one parent).
    The run's lease is held from after the preflight to the end: a second start of the same name
    meanwhile is refused (storage.LeaseHeld) before Ray reserves anything. `out`: where progress
    goes (None = sys.stdout as it is at the call, not at import)."""
    plan = build_plan(spec)
    with storage.acquire_lease(run_folder(spec), spec.name, "run", force=force_unlock) as lease:
        return _train(spec, plan, out or sys.stdout, parent_run_id, lease)


def _train(
    spec: JobSpec, plan: TrainPlan, out: TextIO, parent_run_id: str | None, lease: storage.Lease
) -> dict[str, Any]:
    from tltrain.execution.evaluate import score_checkpoint, test_split_of
    from tltrain.execution.trainer import fit, ray_job_id

    describe_plan(spec, plan, out)
    progress = Progress(spec, out)
    history: list[dict[str, Any]] = []
    with _open_tracker(spec, parent_run_id) as tracker:
        tracker.log_spec(spec.to_dict())
        if spec.tracking.enabled:
            from tltrain.tracking.tracker import lineage_tags

            tracker.set_tags(
                lineage_tags(
                    spec.to_dict(),
                    plan.fingerprint,
                    source_weights_uri=str(plan.weights_uri),
                    source_weights_sha256=plan.weights_sha256,
                    ray_run=spec.name,
                )
            )

        def on_report(metrics: dict[str, Any], checkpoint_uri: str | None) -> None:
            if not lease.info.ray_job_id:  # Ray is up by the first report: the lease names its job
                lease.refresh(ray_job_id=ray_job_id())
            if lease.lost:
                print(f"error: lost the lease of {lease.folder} to another process; stop this run", file=out)
            progress.line(metrics)
            history.append(metrics)
            tracker.log_epoch(metrics, step=int(metrics["epoch"]))

        with ResourceWatch(out):  # a worker group Ray cannot place gets a line, not silence
            result = fit(spec, plan, on_report, on_step=progress.step)
        if result.error is not None:
            tracker.end("FAILED")
            raise result.error
        summary = _summary(spec, plan, result, history)
        summary["mlflow_run_id"] = tracker.run_id
        if result.best_checkpoint_uri and test_split_of(spec):
            # After every choice is made (epoch, EMA twin): the held-out split is only reported.
            print(f"scoring the held-out test split ({len(plan.test)} images) on the best checkpoint", file=out)
            summary["test_metrics"] = score_checkpoint(spec, plan, result.best_checkpoint_uri)
            tracker.log_epoch(summary["test_metrics"], step=summary["epochs_completed"])
        tracker.log_final(result.best_checkpoint_uri, history)
        if spec.tracking.registry_name and not spec.tracking.enabled:
            print(
                "note: tracking.registry_name is set but tracking.enabled is false: not registered "
                "(run `tltrain register CHECKPOINT --name NAME` later)",
                file=out,
            )
        if spec.tracking.enabled and spec.tracking.registry_name and result.best_checkpoint_uri:
            from tltrain.tracking.registry import register_checkpoint

            version = register_checkpoint(
                result.best_checkpoint_uri,
                spec.tracking.registry_name,
                tracking_uri=spec.tracking.uri,
                run_id=tracker.run_id,
                tags=summary.get("test_metrics"),
            )
            summary["registered_model"] = f"models:/{version.name}/{version.version}"
    print_summary(summary, out)
    return summary


def _open_tracker(spec: JobSpec, parent_run_id: str | None = None) -> Any:
    if not spec.tracking.enabled:
        from tltrain.tracking.null import NullTracker

        return NullTracker()
    from tltrain.tracking.tracker import open_tracker

    return open_tracker(spec, run_name=spec.name, parent_run_id=parent_run_id)


def _summary(spec: JobSpec, plan: TrainPlan, result: Any, history: list[dict[str, Any]]) -> dict[str, Any]:
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
        IMG_PER_S: (sum(h[IMG_PER_S] for h in history) / len(history)) if history else None,
        "worker_s": worker_seconds(history, spec.scaling.num_workers),
        "storage_uri": run_folder(spec),
        "trainable_params": plan.trainable_params,
        "total_params": plan.total_params,
        "checkpoint_mb": _checkpoint_mb(result.best_checkpoint_uri),
    }


def _checkpoint_mb(uri: str | None) -> float | None:
    """The best checkpoint's size in storage (weights, optimizer state, meta): LoRA's saving."""
    if not uri:
        return None
    return round(sum(storage.file_sizes(uri, retry_s=storage.OUTAGE_RETRY_S).values()) / 1e6, 3)
