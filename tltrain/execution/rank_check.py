"""`tltrain rank --fine-tune`: check a ranking against real fine-tunes on the same data.

No score wins everywhere, so a user who is about to trust one for a large search can first check
it on a few candidates: every ranked row (a candidate, or with --depths a freeze depth) is
fine-tuned with the spec's own training settings by `run_train`, and its held-out score (the test
split when the spec has one — no choice is made on it — else the best validation metric) sits
beside the transferability scores. Kendall's tau-b between each score and that accuracy says how
well the ranking orders them; for candidates it is also given among the pretrained ones alone,
because pretrained-vs-random-init is the easy part of any ranking. The ranking's seconds beside the
fine-tunes' seconds is what a prescreen saves per pruned candidate.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from tltrain.core.transferability import kendall_tau
from tltrain.execution.evaluate import test_split_of
from tltrain.execution.preflight import build_plan
from tltrain.reports.rank import format_check_table
from tltrain.spec.load import parse_spec
from tltrain.spec.metrics import TEST_ACC
from tltrain.spec.schema import JobSpec, RankCandidate


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")


def row_spec(spec: JobSpec, *, candidate: RankCandidate | None = None, freeze_depth: int | None = None) -> JobSpec:
    """The spec one row is fine-tuned with: the spec's own training settings, the candidate's model
    (or the freeze depth, progressive unfreezing off so the depth holds), no registration."""
    tree = spec.to_dict()
    tree.pop("tune", None)
    tree["tracking"]["registry_name"] = None
    if candidate is not None:
        tree["name"] = f"{spec.name}-ft-{_slug(candidate.title())}"
        tree["model"].update(name=candidate.name, weights=candidate.weights, weights_remap=candidate.weights_remap)
    else:
        tree["name"] = f"{spec.name}-ft-depth{freeze_depth}"
        tree["strategy"]["freeze_depth"] = freeze_depth
        tree["strategy"]["unfreeze"] = {}
    return parse_spec(tree, f"(rank --fine-tune: {tree['name']})")


def _row_spec(spec: JobSpec, row: dict[str, Any], depths: bool) -> JobSpec:
    if depths:
        return row_spec(spec, freeze_depth=row["freeze_depth"])
    fields = ("name", "weights", "weights_remap")
    return row_spec(
        spec, candidate=RankCandidate(label=row["candidate"], **{k: row[k if k != "name" else "model"] for k in fields})
    )


def check_fine_tunes(spec: JobSpec, candidates: list[RankCandidate], depths: bool) -> None:
    """Before Ray: every fine-tune's spec passes the preflight (data, model, weights, budget), so a
    bad one is not found after the ranking and the first fine-tunes ran."""
    for s in [row_spec(spec, freeze_depth=1)] if depths else [row_spec(spec, candidate=c) for c in candidates]:
        build_plan(s)


def _accuracy(spec: JobSpec, summary: dict[str, Any]) -> tuple[str, float | None]:
    """The row's held-out score: test accuracy when the spec has a test split, else the best val metric."""
    if test_split_of(spec):
        return TEST_ACC, (summary.get("test_metrics") or {}).get(TEST_ACC)
    return str(summary["metric"]), summary["best_metric"]


def correlations(rows: list[dict[str, Any]], scores: Sequence[str], *, depths: bool) -> list[dict[str, Any]]:
    """Kendall tau-b of each score with the fine-tuned accuracy: over all rows, and for candidates
    over the pretrained ones alone (rows whose weights are not a random init)."""
    subsets = [("freeze depths" if depths else "all candidates", rows)]
    if not depths:
        pretrained = [r for r in rows if r["weights"] is not None]
        if 1 < len(pretrained) < len(rows):
            subsets.append(("pretrained only", pretrained))
    out = []
    for title, subset in subsets:
        for score in scores:
            pairs = [(r["scores"].get(score), r["fine_tuned"]) for r in subset]
            pairs = [(s, a) for s, a in pairs if s is not None and a is not None]
            tau = kendall_tau([s for s, _ in pairs], [a for _, a in pairs]) if len(pairs) > 1 else None
            out.append({"among": title, "score": score, "tau": tau, "n": len(pairs)})
    return out


def fine_tune_rows(
    spec: JobSpec,
    rows: list[dict[str, Any]],
    scores: Sequence[str],
    *,
    depths: bool,
    key: str,
    rank_wall_s: float,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Fine-tune every row (ordered best first already), then the table and the correlations.
    rank_wall_s: what the ranking took, start to scores, for the cost line."""
    from tltrain.execution.train import run_train

    out = out or sys.stdout
    specs = [_row_spec(spec, row, depths) for row in rows]
    with _open_parent(spec, depths) as parent:
        for row, row_job in zip(rows, specs):
            print(f"\n== fine-tune {row[key]} ({row_job.name})", file=out, flush=True)
            started = time.monotonic()
            summary = run_train(row_job, out=out, parent_run_id=parent.run_id)
            row["fine_tune_metric"], row["fine_tuned"] = _accuracy(row_job, summary)
            row["fine_tune_s"] = round(time.monotonic() - started, 1)
            row["fine_tune_worker_s"] = float(summary["worker_s"])
        taus = correlations(rows, scores, depths=depths)
        cost = {"rank_s": round(rank_wall_s, 1), "fine_tune_s": round(sum(r["fine_tune_s"] for r in rows), 1)}
        parent.log_epoch(
            {f"kendall_tau/{t['score']}{'' if i < len(scores) else '/pretrained'}": t["tau"]
             for i, t in enumerate(taus) if t["tau"] is not None} | cost,
            step=0,
        )  # fmt: skip
        check = {"correlations": taus, **cost, "metric": rows[0]["fine_tune_metric"], "mlflow_run_id": parent.run_id}
    print("\n" + format_check_table(rows, scores, check, key=key), file=out, flush=True)
    return check


def _open_parent(spec: JobSpec, depths: bool) -> Any:
    if not spec.tracking.enabled:
        from tltrain.tracking.null import NullTracker

        return NullTracker()
    from tltrain.tracking.tracker import open_tracker

    name = f"{spec.name}-rank-check{'-depths' if depths else ''}"
    return open_tracker(spec, run_name=name, tags={"tltrain.kind": "rank-check"}, resume=False)
