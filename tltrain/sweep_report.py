"""What a sweep tells its user: progress lines, the result table (best first, cost, pareto), the
`--json` summary, and the MLflow parent/child runs of a sweep.

Apart from tune.py so the table and summary can be built (and tested) from trial records without
Ray; every number here comes from sweep_store's records.
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from tltrain.config import JobSpec
from tltrain.preflight import TrainPlan
from tltrain.search_space import Dist
from tltrain.loop import improved
from tltrain.sweep_store import SweepPaths, sweep_paths, trial_spec


def describe_trial(record: dict[str, Any], spec: JobSpec) -> str:
    assert spec.tune is not None
    if record["status"] == "ERROR":
        return f"failed after {record['epochs']} epoch(s): {record['error']}"
    best = record["best_metric"]
    stop = {
        "asha": ", stopped early by ASHA", "patience": ", stopped early (patience)",
        "diverged": ", stopped: loss diverged (NaN/inf)",
    }.get(record["stopped_by"] or "", "")  # fmt: skip
    return (
        f"done: best {spec.tune.metric} {best:.4f}" if best is not None else "done: no metric"
    ) + f" after {record['epochs']} epoch(s){stop}, {record['cost_worker_s']:.1f} worker-s"


def describe_sweep(spec: JobSpec, plan: TrainPlan, space: dict[str, Dist], concurrent: int, out: TextIO) -> None:
    assert spec.tune is not None
    t = spec.tune
    sched = (
        f"ASHA (grace {t.scheduler.grace_epochs} epoch(s), reduction x{t.scheduler.reduction_factor:g}, "
        f"max {spec.loop.epochs})" if t.scheduler.kind == "asha" else "no early stopping (fifo)"
    )
    dims = ", ".join(
        f"{k} {d.kind}{list(d.args) if d.kind != 'choice' or len(d.args) < 8 else '[...]'}" for k, d in space.items()
    )
    print(
        f"sweep {spec.name}: {t.num_samples} trial(s) of {spec.model.name} ({plan.num_layer_groups} layer groups), "
        f"{t.searcher} search (seed {t.seed}), {sched}, up to {concurrent} at once x {spec.scaling.num_workers} "
        f"worker(s); {t.mode} {t.metric} over: {dims}",
        file=out,
        flush=True,
    )


def _pareto(records: list[dict[str, Any]], mode: str) -> None:
    """Mark trials that no other trial beats on both the metric and the cost."""
    scored = [r for r in records if r["best_metric"] is not None]
    for r in records:
        r["pareto"] = False
    for r in scored:
        r["pareto"] = not any(
            (q["best_metric"] == r["best_metric"] or improved(q["best_metric"], r["best_metric"], mode))
            and q["cost_worker_s"] <= r["cost_worker_s"]
            and (q["best_metric"] != r["best_metric"] or q["cost_worker_s"] < r["cost_worker_s"])
            for q in scored
            if q is not r
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return json.dumps(v) if not isinstance(v, str) else v


def print_table(summary: dict[str, Any], space_keys: list[str], out: TextIO) -> None:
    metric = summary["metric"]
    gpus = bool(summary["gpu_hours"])
    header = ["trial", *space_keys, metric, "epochs", "stop", "worker-s", *(["GPU-h"] if gpus else []), "pareto"]
    rows = []
    for r in summary["trials"]:
        rows.append([
            r["trial_id"], *(_fmt(r["config"].get(k)) for k in space_keys),
            "ERROR" if r["status"] == "ERROR" else ("-" if r["best_metric"] is None else f"{r['best_metric']:.4f}"),
            str(r["epochs"]), r["stopped_by"] or "", f"{r['cost_worker_s']:.1f}",
            *([f"{r['gpu_hours']:.3f}"] if gpus else []), "*" if r["pareto"] else "",
        ])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip(), file=out)
    cost = summary["cost_worker_s"]
    gpu = f", {summary['gpu_hours']:.3f} GPU-hours" if summary["gpu_hours"] else ""
    print(
        f"search cost: {cost:.1f} worker-s ({cost / 3600:.3f} worker-hours{gpu}); "
        f"{summary['num_stopped_early']} of {len(summary['trials'])} trial(s) stopped early; "
        f"* = pareto (no trial is both better and cheaper)",
        file=out,
    )
    if summary["best_checkpoint"]:
        print(
            f"best: trial {summary['best_trial_id']} {metric} {summary['best_metric']:.4f} "
            f"{json.dumps(summary['best_config'])}\nbest checkpoint: {summary['best_checkpoint']}",
            file=out,
            flush=True,
        )
    else:
        print("best: no trial produced a checkpoint", file=out, flush=True)


def summarize(spec: JobSpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The `--json` object: best first; best_* from the best trial's best existing checkpoint."""
    assert spec.tune is not None
    metric, mode = spec.tune.metric, spec.tune.mode
    _pareto(records, mode)
    done = [r for r in records if r["best_metric"] is not None]
    done.sort(key=lambda r: r["best_metric"], reverse=mode == "max")
    ordered = done + [r for r in records if r["best_metric"] is None]
    best = next((r for r in done if r["best_checkpoint"]), None)
    cost = sum(r["cost_worker_s"] for r in records)
    return {
        "sweep_name": spec.name,
        "metric": metric,
        "mode": mode,
        "best_metric": best["best_metric"] if best else None,
        "best_checkpoint": best["best_checkpoint"] if best else None,
        "best_trial_id": best["trial_id"] if best else None,
        "best_config": best["config"] if best else None,
        "cost_worker_s": cost,
        "gpu_hours": sum(r["gpu_hours"] for r in records),
        "num_trials": len(records),
        "num_stopped_early": sum(1 for r in records if r["stopped_early"]),
        "num_errored": sum(1 for r in records if r["status"] == "ERROR"),
        "storage_uri": sweep_paths(spec).uri,
        "trials": [{k: v for k, v in r.items() if k != "history"} for r in ordered],
    }


def track_trial(spec: JobSpec, paths: SweepPaths, parent: Any, record: dict[str, Any]) -> None:
    """A nested MLflow child run for a finished trial: its spec, sampled values, every epoch's
    metrics, cost and best checkpoint report. A failed trial's child ends FAILED (and is resumed,
    not duplicated, when --resume retries it)."""
    if not spec.tracking.enabled or parent.run_id is None:
        return
    from tltrain.tracking import open_tracker

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
        metrics[f"best/{summary['metric']}"] = summary["best_metric"]
    parent.log_epoch(metrics, step=0)
    if best is not None:
        parent.log_final(summary["best_checkpoint"], best.get("history") or [])
