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

import hashlib
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from tltrain.core.plan import count_layer_groups
from tltrain.core.transferability import kendall_tau
from tltrain.execution.evaluate import test_split_of
from tltrain.execution.preflight import build_plan
from tltrain.reports.rank import format_check_table
from tltrain.spec.load import parse_spec
from tltrain.spec.metrics import TEST_ACC
from tltrain.spec.schema import JobSpec, RankCandidate, SpecError


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-")


def row_spec(spec: JobSpec, candidate: RankCandidate, freeze_depth: int | None = None) -> JobSpec:
    """The spec one row is fine-tuned with: the spec's own training settings on the candidate's
    model (with --depths, at that freeze depth, progressive unfreezing off so the depth holds), no
    registration. The run name ends in a hash of those settings: re-running the check with the
    same settings reuses a finished fine-tune, with changed ones trains a new one."""
    tree = spec.to_dict()
    tree.pop("tune", None)
    tree.pop("rank", None)
    tree["tracking"]["registry_name"] = None
    tree["model"].update(name=candidate.name, weights=candidate.weights, weights_remap=candidate.weights_remap)
    if freeze_depth is not None:
        tree["strategy"]["freeze_depth"] = freeze_depth
        tree["strategy"]["unfreeze"] = {}
    settings = hashlib.sha256(json.dumps({**tree, "name": None}, sort_keys=True, default=str).encode()).hexdigest()
    row = f"depth{freeze_depth}" if freeze_depth is not None else _slug(candidate.title())
    tree["name"] = f"{spec.name}-ft-{row}-{settings[:6]}"
    return parse_spec(tree, f"(rank --fine-tune: {tree['name']})")


def _row_spec(spec: JobSpec, row: dict[str, Any], candidate: RankCandidate | None) -> JobSpec:
    if candidate is not None:  # --depths: one candidate, a row per depth
        return row_spec(spec, candidate, row["freeze_depth"])
    fields = {"name": row["model"], "weights": row["weights"], "weights_remap": row["weights_remap"]}
    return row_spec(spec, RankCandidate(label=row["candidate"], **fields))


def check_fine_tunes(spec: JobSpec, candidates: list[RankCandidate], depths: bool, num_classes: int) -> None:
    """Before Ray: --fine-tune needs a held-out accuracy to correlate with, and every fine-tune's
    spec passes the preflight (data, model, weights, budget; with --depths the shallowest and the
    deepest row), so a bad one is not found after the ranking and the first fine-tunes ran."""
    if not test_split_of(spec) and spec.storage.mode != "max":
        raise SpecError(
            f"--fine-tune: correlates the scores with an accuracy; without data.test / data.test_fraction it uses "
            f"storage.metric, and {spec.storage.metric} is a min-mode metric: set a test split (preferred: no choice "
            "is made on it) or storage.metric: val/acc"
        )
    rows: list[tuple[str, JobSpec]] = []
    if depths:
        deepest = count_layer_groups(row_spec(spec, candidates[0]), num_classes)
        rows = [(f"--depths row {d}", row_spec(spec, candidates[0], d)) for d in sorted({1, max(deepest, 1)})]
    else:
        rows = [(f"rank.candidates ({c.title()})", row_spec(spec, c)) for c in candidates]
    names = [row.name for _, row in rows]
    if len(set(names)) < len(names):
        raise SpecError("rank.candidates: two labels give the same fine-tune run name; make the labels differ")
    for label, row in rows:
        try:
            build_plan(row)
        except SpecError as err:
            raise SpecError(f"--fine-tune, {label}: {err}") from None


def _accuracy(spec: JobSpec, summary: dict[str, Any]) -> tuple[str, float | None]:
    """The row's held-out score: test accuracy when the spec has a test split, else the best
    storage.metric (a max-mode one: check_fine_tunes refused the others)."""
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
            pairs = [(s, a) for s, a in pairs if s is not None and a is not None and math.isfinite(s)]
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
    candidate: RankCandidate | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Fine-tune every row (ordered best first already), then the table and the correlations.
    rank_wall_s: what the ranking took, scores only, for the cost line; candidate: the one model
    whose depths the rows are (--depths)."""
    from tltrain.execution.train import run_train

    out = out or sys.stdout
    specs = [_row_spec(spec, row, candidate if depths else None) for row in rows]
    with _open_parent(spec, depths) as parent:
        for row, row_job in zip(rows, specs):
            print(f"\n== fine-tune {row[key]} ({row_job.name})", file=out, flush=True)
            started = time.monotonic()
            summary = run_train(row_job, out=out, parent_run_id=parent.run_id)
            row["fine_tune_metric"], row["fine_tuned"] = _accuracy(row_job, summary)
            row["fine_tune_s"] = round(time.monotonic() - started, 1)
            row["fine_tune_worker_s"] = float(summary["worker_s"])
            row["reused"] = summary["epochs_this_invocation"] == 0  # finished by an earlier check
        taus = correlations(rows, scores, depths=depths)
        fresh = [r for r in rows if not r["reused"]]
        cost = {"rank_s": round(rank_wall_s, 1), "fine_tune_s": round(sum(r["fine_tune_s"] for r in fresh), 1),
                "fine_tunes": len(fresh), "reused": len(rows) - len(fresh)}  # fmt: skip
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
