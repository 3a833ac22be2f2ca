"""`tltrain compare`: what did transfer (and the recipe) buy on my data?

setup (check every rung's spec against the data and model before any trains) -> train each rung
with `run_train` under one MLflow parent run -> the table of held-out test scores and cost.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tltrain.execution.evaluate import test_split_of
from tltrain.execution.preflight import build_plan
from tltrain.reports.compare import print_comparison
from tltrain.spec.metrics import TEST_ACC, TEST_BALANCED_ACC, TEST_F1_MACRO
from tltrain.spec.rungs import RUNGS, describe, rung_specs
from tltrain.spec.schema import JobSpec, SpecError


def run_compare(
    spec: JobSpec, rungs: tuple[str, ...] = RUNGS, out: TextIO | None = None, *, force_unlock: bool = False
) -> dict[str, Any]:
    """Train each rung of the spec and return {"rungs": [row per rung], ...} (the `--json` object)."""
    from tltrain.execution.train import run_train

    out = out or sys.stdout

    if not test_split_of(spec):
        raise SpecError(
            "data.test / data.test_fraction: compare reports scores on a held-out test split that no run "
            "chose anything on; set data.test (a folder) or data.test_fraction (e.g. 0.2)"
        )
    if spec.model.weights is None:
        raise SpecError("model.weights: compare measures what source weights buy; set them (a file, s3:// or hub)")
    specs = rung_specs(spec, rungs)
    for rung_spec in specs.values():  # every rung is checked before the first one trains
        build_plan(rung_spec)
    print(f"compare {spec.name}: {len(specs)} rungs, same data, model, epochs and workers", file=out, flush=True)
    rows: list[dict[str, Any]] = []
    with _open_parent(spec) as parent:
        parent.log_spec(spec.to_dict())
        for rung, rung_spec in specs.items():
            print(f"\n== {describe(rung)}", file=out, flush=True)
            started = time.monotonic()
            summary = run_train(rung_spec, out=out, parent_run_id=parent.run_id, force_unlock=force_unlock)
            rows.append(_row(rung, summary, time.monotonic() - started))
        parent.log_epoch(
            {f"{row['rung']}.{k}": v for row in rows for k, v in row.items() if isinstance(v, float)}, step=0
        )
        result = {"name": spec.name, "rungs": rows, "mlflow_run_id": parent.run_id}
    print_comparison(result, out)
    return result


def _row(rung: str, summary: dict[str, Any], wall_s: float) -> dict[str, Any]:
    test = summary.get("test_metrics") or {}
    return {
        "rung": rung,
        "run_name": summary["run_name"],
        TEST_ACC: test.get(TEST_ACC),
        TEST_F1_MACRO: test.get(TEST_F1_MACRO),
        TEST_BALANCED_ACC: test.get(TEST_BALANCED_ACC),
        "best_val": summary["best_metric"],
        "val_metric": summary["metric"],
        "epochs": summary["epochs_completed"],
        "worker_s": float(summary["worker_s"]),
        "wall_s": round(wall_s, 1),
        "best_checkpoint": summary["best_checkpoint"],
        "registered_model": summary.get("registered_model"),
    }


def _open_parent(spec: JobSpec) -> Any:
    if not spec.tracking.enabled:
        from tltrain.tracking.null import NullTracker

        return NullTracker()
    from tltrain.tracking.tracker import open_tracker

    return open_tracker(spec, run_name=f"{spec.name}-compare", tags={"tltrain.kind": "compare"})
