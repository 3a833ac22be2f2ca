"""`tltrain rank`: transferability scores of candidate source models on the spec's training set.

On the driver, before Ray: the data scan and split of preflight, a seeded class-stratified sample
of the train split, and every candidate built once (its weights must load, its source head found
where LEEP/NCE need one). Then one Ray task per candidate, in parallel (a GPU each with
scaling.use_gpu), forwards the sample once at data.image_size with eval preprocessing and returns
the scores (core/transferability). The table is ordered by rank.sort_by; MLflow gets one run with
a child per candidate. `--depths` scores one model's layer-group outputs instead (a guide to
strategy.freeze_depth).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import ray
import torch

from tltrain import storage
from tltrain.core.features import SourceHead, check_extractable, extract, hub_source_head, source_head
from tltrain.core.model import ModelError, build_model
from tltrain.core.transferability import FEATURE_SCORES, NEEDS_SOURCE_HEAD, TransferabilityError, compute_scores
from tltrain.data import build_eval_loader, build_transform, resolve_data_config, stratified_sample
from tltrain.execution.preflight import check_weights, scan_dataset
from tltrain.execution.trainer import ensure_ray
from tltrain.execution.worker import rebase
from tltrain.reports.rank import format_rank_table
from tltrain.spec.load import parse_spec
from tltrain.spec.schema import JobSpec, ModelSpec, RankCandidate, RankSpec, SpecError
from tltrain.spec.space import Dist, parse_distribution

# MLflow metric names of the scores: rank/<score>.
METRIC_PREFIX = "rank/"


@dataclass
class Checked:
    """A candidate that passed the driver's checks."""

    candidate: RankCandidate
    model: ModelSpec
    head: SourceHead | None


def rank_settings(spec: JobSpec) -> RankSpec:
    return spec.rank if spec.rank is not None else RankSpec()


def candidates_of(spec: JobSpec) -> list[RankCandidate]:
    """rank.candidates, or the spec's own model when there are none."""
    rank = rank_settings(spec)
    if rank.candidates:
        return list(rank.candidates)
    m = spec.model
    return [RankCandidate(name=m.name, weights=m.weights, weights_remap=m.weights_remap)]


def _needs_head(rank: RankSpec) -> set[str]:
    """Head scores the user asked for by name (listed in rank.scores, or sorted by): a candidate
    without a source head is refused for these; the default list skips them with a note."""
    asked = set(rank.scores) if "scores" in rank.model_fields_set else set()
    return {str(s) for s in (asked | {rank.sort_by}) & NEEDS_SOURCE_HEAD}


def check_candidates(spec: JobSpec, num_classes: int, depths: bool) -> list[Checked]:
    """Build every candidate on the driver as its Ray task will: weights that do not load, a
    non-timm model, a missing source head for a score that needs one are refused here."""
    rank = rank_settings(spec)
    candidates = candidates_of(spec)
    if depths and len(candidates) != 1:
        raise SpecError(f"--depths scores one model; rank.candidates lists {len(candidates)}: keep one (or none)")
    if depths and not set(FEATURE_SCORES) & set(rank.scores):
        raise SpecError(
            f"--depths scores each layer group's features: rank.scores {list(rank.scores)} has none of "
            f"{sorted(FEATURE_SCORES)} (the source head sees only the last group); add one"
        )
    titles = [c.title() for c in candidates]
    twice = sorted({t for t in titles if titles.count(t) > 1})
    if twice:
        raise SpecError(f"rank.candidates: {twice[0]!r} names more than one candidate; give each a distinct label")
    checked = []
    for i, cand in enumerate(candidates):
        field = f"rank.candidates[{i}]" if rank.candidates else "model"
        model_spec = ModelSpec.model_validate(
            {**spec.model.model_dump(), "name": cand.name, "weights": cand.weights, "weights_remap": cand.weights_remap}
        )
        try:
            check_weights(spec.model_copy(update={"model": model_spec}))
            local = storage.fetch_weights(cand.weights, spec.data.cache_dir)
            torch.manual_seed(rank.seed)
            model = build_model(model_spec, num_classes, local, spec.data.image_size)
            check_extractable(model, cand.name)
            if cand.weights == "hub":
                head = hub_source_head(cand.name)
            else:
                head = source_head(model, local, cand.weights_remap)
        except (SpecError, ModelError, OSError, RuntimeError) as err:
            raise SpecError(f"{field} ({cand.title()}): {err}") from None
        missing = _needs_head(rank) if head is None else set()
        if missing:
            raise SpecError(
                f"{field} ({cand.title()}): rank.scores asks for {', '.join(sorted(missing))}, which need the source "
                "model's own classifier, and these weights have none (random init or a head-less file): drop "
                f"{'them' if len(missing) > 1 else 'it'} from rank.scores (and rank.sort_by) or use weights with a head"
            )
        checked.append(Checked(cand, model_spec, head))
    return checked


def _check_sample(sample: list[tuple[str, int]], class_names: list[str]) -> None:
    counts = np.bincount([y for _, y in sample], minlength=len(class_names))
    thin = [class_names[y] for y in np.flatnonzero(counts < 2)]
    if thin:
        raise SpecError(
            f"rank.sample_per_class: class {thin[0]!r} has {int(counts[class_names.index(thin[0])])} training "
            f"image(s) ({len(thin)} classes under 2); the scores need at least 2 per class: add images or "
            "lower data.val_fraction"
        )


def _score_task(
    spec_dict: dict[str, Any],
    model_dict: dict[str, Any],
    head: tuple[np.ndarray, np.ndarray | None] | None,
    samples: list[tuple[str, int]],
    driver_root: str,
    num_classes: int,
    depths: bool,
) -> dict[str, Any]:
    """On a Ray worker: build the model, forward the sample once, score. Returns plain types."""
    started = time.monotonic()
    spec, model_spec = JobSpec.model_validate(spec_dict), ModelSpec.model_validate(model_dict)
    rank = rank_settings(spec)
    device = torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    root = storage.localize(spec.data.train, spec.data.cache_dir, retry_s=storage.OUTAGE_RETRY_S)
    local = storage.fetch_weights(model_spec.weights, spec.data.cache_dir)
    torch.manual_seed(rank.seed)  # random-init candidates: the same init on every run
    model = build_model(model_spec, num_classes, local, spec.data.image_size)
    data_config = resolve_data_config(model, spec.data.image_size, model_name=model_spec.name)
    loader = build_eval_loader(
        rebase(samples, driver_root, root), build_transform(data_config, False), rank.batch_size, 0, 1,
        spec.data.loader_workers,
    )  # fmt: skip
    source = (
        None
        if head is None
        else SourceHead(torch.from_numpy(head[0]), None if head[1] is None else torch.from_numpy(head[1]))
    )
    out = extract(model, loader, device, source, depths=depths, coarse=spec.strategy.group_granularity == "coarse")
    scores = compute_scores(
        rank.scores, out.labels, features=out.features, source_logits=out.source_logits, num_classes=num_classes
    )
    result: dict[str, Any] = {
        "scores": scores,
        "feature_dim": int(out.features.shape[1]),
        "images": int(out.features.shape[0]),
        "input_size": int(data_config["input_size"][-1]),
    }
    if depths:
        feature_only = [s for s in rank.scores if s in FEATURE_SCORES]
        result["depths"] = [
            {
                "freeze_depth": d,
                "after": out.depth_names[d],
                "scores": compute_scores(feature_only, out.labels, features=f, num_classes=num_classes),
                "feature_dim": int(f.shape[1]),
                "images": int(f.shape[0]),
            }
            for d, f in sorted(out.depth_features.items())
        ]
    result["seconds"] = time.monotonic() - started
    return result


def _order(rows: list[dict[str, Any]], sort_by: str) -> list[dict[str, Any]]:
    """Best first by sort_by (higher is better for every score); rows without it last."""
    return sorted(rows, key=lambda r: (r["scores"].get(sort_by) is None, -(r["scores"].get(sort_by) or 0.0)))


def _track(spec: JobSpec, rows: list[dict[str, Any]], key: str, run_name: str) -> str | None:
    """One MLflow parent run for the ranking, a child per row (candidate or depth)."""
    if not spec.tracking.enabled:
        return None
    from tltrain.tracking.tracker import open_tracker

    rank = rank_settings(spec)
    with open_tracker(spec, run_name=run_name, tags={"tltrain.rank": key}, resume=False) as parent:
        parent.log_spec(spec.to_dict())
        parent.set_tags({"rank.sort_by": rank.sort_by, "rank.best": rows[0][key] if rows else None})
        parent.log_epoch({"candidates": len(rows), "images": rows[0]["images"] if rows else 0}, step=0)
        for position, row in enumerate(rows, start=1):
            tags = {"tltrain.rank_parent": run_name, "rank.position": position, "rank.note": row.get("note")}
            tags.update({f"rank.{k}": row[k] for k in ("weights", "after") if k in row})
            with open_tracker(
                spec, parent_run_id=parent.run_id, run_name=f"{run_name}/{row[key]}", tags=tags, resume=False
            ) as child:
                metrics = {f"{METRIC_PREFIX}{k}": v for k, v in row["scores"].items()}
                metrics.update({"feature_dim": row["feature_dim"], "images": row["images"], "seconds": row["seconds"]})
                child.log_epoch(metrics, step=0)
        return parent.run_id


def run_rank(spec: JobSpec, *, depths: bool = False, fine_tune: bool = False, echo: bool = True) -> dict[str, Any]:
    """The whole command; returns the --json summary (rows best first). fine_tune: then train
    every row with the spec's settings and correlate the scores with what they reached
    (execution/rank_check)."""
    rank = rank_settings(spec)
    dataset = scan_dataset(spec)
    num_classes = len(dataset.class_names)
    sample = stratified_sample(dataset.train, dataset.class_names, rank.sample_per_class, rank.seed)
    _check_sample(sample, dataset.class_names)
    checked = check_candidates(spec, num_classes, depths)
    if fine_tune:
        from tltrain.execution.rank_check import check_fine_tunes

        check_fine_tunes(spec, [c.candidate for c in checked], depths, num_classes)
    started = time.monotonic()  # the ranking's cost: Ray, features, scores (not the checks above)
    ensure_ray(spec.scaling.address)
    task = ray.remote(num_cpus=spec.scaling.cpus_per_worker, num_gpus=1 if spec.scaling.use_gpu else 0)(_score_task)
    futures = []
    for c in checked:
        head = None if c.head is None else (c.head.weight.numpy(), None if c.head.bias is None else c.head.bias.numpy())
        futures.append(
            task.remote(spec.to_dict(), c.model.model_dump(), head, sample, dataset.train_root, num_classes, depths)
        )
    try:
        results = ray.get(futures)
    except ray.exceptions.RayTaskError as err:
        cause = err.as_instanceof_cause()
        if isinstance(cause, TransferabilityError):
            raise SpecError(f"rank: {cause}") from None
        raise
    rows = []
    for c, res in zip(checked, results):
        note = None
        if c.head is None and NEEDS_SOURCE_HEAD & set(rank.scores):
            note = "no source head in these weights: " + ", ".join(s for s in rank.scores if s in NEEDS_SOURCE_HEAD)
            note += " skipped"
        rows.append({
            "candidate": c.candidate.title(), "model": c.candidate.name, "weights": c.candidate.weights,
            "weights_remap": c.candidate.weights_remap, "scores": res["scores"], "feature_dim": res["feature_dim"], "images": res["images"],
            "seconds": res["seconds"], "note": note, "depths": res.get("depths"),
        })  # fmt: skip
    if depths:
        only = rows[0]
        shown = [s for s in rank.scores if s in FEATURE_SCORES]
        sort_by = rank.sort_by if rank.sort_by in shown else shown[0]
        depth_rows = [
            {**d, "depth": f"{d['freeze_depth']} (after {d['after']})", "seconds": only["seconds"]}
            for d in only["depths"]
        ]
        ordered = _order(depth_rows, sort_by)
        if echo:
            print(f"{only['candidate']}: scores of each freeze depth's input, best first by {sort_by}")
            print(format_rank_table(ordered, shown, key="depth"))
        run_id = _track(spec, ordered, "depth", f"{spec.name}-rank-depths")
        check = _fine_tune(spec, ordered, shown, "depth", started, checked[0].candidate) if fine_tune else None
        return {"name": spec.name, "candidate": only["candidate"], "scores": only["scores"], "sort_by": sort_by,
                "images": len(sample), "depths": json.loads(json.dumps(ordered, default=float)),
                "best_freeze_depth": ordered[0]["freeze_depth"], "mlflow_run_id": run_id, "fine_tune": check}  # fmt: skip
    ordered = _order(rows, rank.sort_by)
    for r in ordered:
        r.pop("depths", None)
    if echo:
        print(f"{len(sample)} training images ({rank.sample_per_class} per class at most, seed {rank.seed}); "
              f"best first by {rank.sort_by}")  # fmt: skip
        print(format_rank_table(ordered, list(rank.scores)))
    run_id = _track(spec, ordered, "candidate", f"{spec.name}-rank")
    check = _fine_tune(spec, ordered, list(rank.scores), "candidate", started) if fine_tune else None
    return {
        "name": spec.name,
        "sort_by": rank.sort_by,
        "images": len(sample),
        "candidates": json.loads(json.dumps(ordered, default=float)),
        "best": ordered[0]["candidate"],
        "mlflow_run_id": run_id,
        "fine_tune": check,
    }


def _fine_tune(
    spec: JobSpec,
    rows: list[dict[str, Any]],
    scores: Sequence[str],
    key: str,
    started: float,
    candidate: RankCandidate | None = None,
) -> dict[str, Any]:
    """--fine-tune: every row trained and correlated (execution/rank_check); candidate: --depths' model."""
    from tltrain.execution.rank_check import fine_tune_rows

    return fine_tune_rows(spec, rows, scores, depths=candidate is not None, key=key,
                          rank_wall_s=time.monotonic() - started, candidate=candidate)  # fmt: skip


# The searched keys a prescreen ranks: which source model a trial starts from.
PRESCREEN_KEYS = ("model.name", "model.weights")


def _value_label(key: str, value: Any, taken: set[str]) -> str:
    text = "null (random init)" if value is None else str(value)
    short = Path(text).name if key == "model.weights" and "/" in text else text
    return short if short not in taken else text


def prescreen(spec: JobSpec, out: TextIO) -> tuple[JobSpec, dict[str, Any] | None]:
    """tune.prescreen: rank the choices of the searched model.name or model.weights by the
    prescreen score (rank's sample settings) and return the spec whose space keeps the top
    `keep` (in their original order), with the report the sweep summary carries."""
    if spec.tune is None or spec.tune.prescreen is None:
        return spec, None
    screen = spec.tune.prescreen
    keys = [k for k in PRESCREEN_KEYS if k in spec.tune.space]
    if len(keys) != 1:
        found = "searches neither" if not keys else "searches both"
        raise SpecError(
            f"tune.prescreen: ranks the choices of one searched key, model.name or model.weights; tune.space {found}"
        )
    key = keys[0]
    dist = parse_distribution(key, spec.tune.space[key])
    if not isinstance(dist, Dist) or dist.kind != "choice":
        raise SpecError(f"tune.prescreen: tune.space.{key} must be a {{choice: [...]}} of candidates to rank")
    values = dist.candidates()
    labels: list[str] = []
    for v in values:
        labels.append(_value_label(key, v, set(labels)))
    m = spec.model
    candidates = [
        {"name": v if key == "model.name" else m.name, "weights": v if key == "model.weights" else m.weights,
         "weights_remap": m.weights_remap, "label": label}
        for v, label in zip(values, labels)
    ]  # fmt: skip
    base = rank_settings(spec).model_dump()
    rank = RankSpec.model_validate(
        {**base, "candidates": candidates, "scores": [screen.score], "sort_by": screen.score}
    )
    print(f"prescreen: ranking {len(values)} choices of {key} by {screen.score}, keeping {screen.keep}", file=out)
    result = run_rank(spec.model_copy(update={"rank": rank}), echo=False)
    order = [row["candidate"] for row in result["candidates"]]
    kept_labels = set(order[: screen.keep])
    value_of = dict(zip(labels, values))
    kept = [value_of[label] for label in labels if label in kept_labels]
    pruned = [value_of[label] for label in labels if label not in kept_labels]
    print(format_rank_table(result["candidates"], [screen.score]), file=out)
    print(f"prescreen: searching {', '.join(label for label in labels if label in kept_labels)}; pruned "
          f"{', '.join(label for label in labels if label not in kept_labels) or 'none'}", file=out, flush=True)  # fmt: skip
    tree = spec.to_dict()
    tree["tune"]["space"][key] = {"choice": kept}
    report = {
        "key": key, "score": screen.score, "keep": screen.keep, "kept": kept, "pruned": pruned,
        "ranking": [{"candidate": r["candidate"], "value": value_of[r["candidate"]],
                     screen.score: r["scores"][screen.score]} for r in result["candidates"]],
        "mlflow_run_id": result["mlflow_run_id"],
    }  # fmt: skip
    return parse_spec(tree), report
