"""What a sweep tells its user: progress lines, the result table (best first, cost, pareto) and the
`--json` summary.

Built (and tested) from trial records without Ray or MLflow; every number here comes from
execution/sweep_store.py's records (the MLflow runs are execution/sweep_tracking.py).
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from tltrain.core.plan import TrainPlan
from tltrain.spec.metrics import TEST_ACC, TEST_BALANCED_ACC, TEST_F1_MACRO, better, ranked
from tltrain.spec.schema import JobSpec
from tltrain.spec.space import Dist


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


def standing(records: list[dict[str, Any]], running: int, spec: JobSpec) -> str:
    """The sweep so far, after each trial ends: trials running / done / stopped early / failed,
    and the best so far by the search metric."""
    assert spec.tune is not None
    failed = [r for r in records if r["status"] == "ERROR"]
    done = [r for r in records if r["status"] != "ERROR"]
    stopped = sum(1 for r in done if r.get("stopped_by"))
    best = ranked(done, lambda r: r.get("best_metric"), spec.tune.mode)
    shown = f"best {spec.tune.metric} {best[0]['best_metric']:.4f} ({best[0]['trial_id']})" if best else "no best yet"
    return (
        f"sweep: {running} running, {len(done)} done ({stopped} stopped early), {len(failed)} failed "
        f"of {spec.tune.num_samples}; {shown}"
    )


def describe_sweep(spec: JobSpec, plan: TrainPlan, space: dict[str, Dist], concurrent: int, out: TextIO) -> None:
    assert spec.tune is not None
    t = spec.tune
    sched = (
        f"ASHA (grace {t.scheduler.grace_epochs} epoch(s), reduction x{t.scheduler.reduction_factor:g}, "
        f"max {spec.loop.epochs})"
        if t.scheduler.kind == "asha"
        else "no early stopping (fifo)"
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
            (q["best_metric"] == r["best_metric"] or better(q["best_metric"], r["best_metric"], mode))
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
        test = summary.get("test_metrics")
        if test:  # scored once, on the winner only, after the search chose it
            shown = "  ".join(f"{k} {test[k]:.4f}" for k in (TEST_ACC, TEST_F1_MACRO, TEST_BALANCED_ACC) if k in test)
            print(f"best trial on the held-out test split: {shown}", file=out, flush=True)
    else:
        print("best: no trial produced a checkpoint", file=out, flush=True)


def summarize(spec: JobSpec, storage_uri: str, records: list[dict[str, Any]]) -> dict[str, Any]:
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
        "storage_uri": storage_uri,
        "trials": [{k: v for k, v in r.items() if k != "history"} for r in ordered],
    }
