"""A sweep's MLflow runs: one parent for the search, a nested child per finished trial."""

from __future__ import annotations

import json
from typing import Any

from tltrain.execution.sweep_store import SweepPaths, trial_spec
from tltrain.spec.metrics import BEST_PREFIX
from tltrain.spec.schema import JobSpec


def track_trial(spec: JobSpec, paths: SweepPaths, parent: Any, record: dict[str, Any]) -> None:
    """A nested MLflow child run for a finished trial: its spec, sampled values, every epoch's
    metrics, cost and best checkpoint report. A failed trial's child ends FAILED (and is resumed,
    not duplicated, when --resume retries it)."""
    if not spec.tracking.enabled or parent.run_id is None:
        return
    from tltrain.tracking.tracker import open_tracker

    tspec = trial_spec(spec, paths, record["trial_id"], record["config"])
    tags = {
        "trial": record["trial_id"],
        "ray_run": paths.run_uri(record["trial_id"]),
        "tltrain.sweep": spec.name,
        "stopped_by": record["stopped_by"],
        **{f"space.{k}": json.dumps(v) for k, v in record["config"].items()},
    }
    with open_tracker(tspec, parent_run_id=parent.run_id, run_name=record["run_name"], tags=tags) as child:
        child.log_spec(tspec.to_dict())
        for row in record["history"]:
            child.log_epoch(row, step=int(row["epoch"]))
        child.log_epoch({"cost_worker_s": record["cost_worker_s"], "epochs": record["epochs"]}, step=record["epochs"])
        child.log_final(record["best_checkpoint"], record["history"])
        child.end("FAILED" if record["status"] == "ERROR" else "FINISHED")


def track_sweep(parent: Any, summary: dict[str, Any], best: dict[str, Any] | None) -> None:
    """The sweep's parent MLflow run: the best trial, the whole search's cost, the best checkpoint's
    report (children were logged per trial as they finished)."""
    parent.set_tags({
        "best_trial": summary["best_trial_id"], "best_checkpoint": summary["best_checkpoint"],
        "best_config": json.dumps(summary["best_config"]),
    })  # fmt: skip
    metrics = {
        "cost_worker_s": summary["cost_worker_s"], "gpu_hours": summary["gpu_hours"],
        "num_trials": summary["num_trials"], "num_stopped_early": summary["num_stopped_early"],
        "num_errored": summary["num_errored"],
    }  # fmt: skip
    if summary["best_metric"] is not None:
        metrics[f"{BEST_PREFIX}{summary['metric']}"] = summary["best_metric"]
    metrics.update(summary.get("test_metrics") or {})  # the best trial's held-out scores
    parent.log_epoch(metrics, step=0)
    if best is not None:
        parent.log_final(summary["best_checkpoint"], best.get("history") or [])
