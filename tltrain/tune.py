"""`tltrain tune`: a Ray Tune search over Ray Train runs, with ASHA, resume, cost and best checkpoint.

Each trial is a whole Ray Train run (the spec's workers) started from a Tune trial function that
itself reserves no CPU, so the trainer's workers can be placed; trials run side by side as far as
the cluster's CPUs/GPUs allow (or tune.max_concurrent_trials). Storage layout of a sweep named N:

    <storage.uri>/N/                          the Tune experiment (Ray's files, one dir per trial)
    <storage.uri>/N/runs/N-<trial_id>/        each trial's Ray Train run: checkpoint_*/ (its spec's
                                              storage.uri is <storage.uri>/N/runs)
    <storage.uri>/N/tltrain/spec.json         the sweep's resolved spec (--resume must match it)
    <storage.uri>/N/tltrain/done/<id>.json    a finished trial's record, written by the driver

Resume: Tune's own experiment state (trials, searcher, scheduler) is synced to storage about every
10 s; a trial that finished after the last sync would be re-run from it, so the driver writes a
record the moment a trial finishes and the trial function returns at once when it finds one. An
unfinished trial reruns its function, whose Train run (same name and storage) resumes from its
latest checkpoint. Numbers in the summary come from the Train runs' checkpoints (each checkpoint's
meta.json holds the whole epoch history), not from Tune's in-memory results, so they survive a
killed driver.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ray import tune

from tltrain import storage
from tltrain.config import JobSpec, SpecError
from tltrain.preflight import TrainPlan, build_plan
from tltrain.ray_train import best_checkpoint, build_trainer, checkpoint_uri, ensure_ray
from tltrain.search_space import Dist, apply_config, plain, validate_space

log = logging.getLogger(__name__)

# Changing these between a kill and --resume would make trials of one search incomparable.
_RESUME_MAY_CHANGE = ("scaling.address", "tracking.", "data.cache_dir", "data.loader_workers")
# Keys whose change alters the data plan (classes, samples, preprocessing or layer groups): such a
# trial checks its own plan instead of reusing the driver's.
_PLAN_KEYS = ("model.", "data.", "strategy.group_granularity", "loop.seed")
# Marks a result that repeats an already finished trial's last epoch (see run_trial).
_REPLAYED = "tltrain_replayed"


# --- where a sweep lives ----------------------------------------------------------------------


@dataclass
class SweepPaths:
    name: str
    uri: str  # <storage.uri>/<name>: s3://... or a local path
    fs: Any  # pyarrow FileSystem (from tltrain.storage)
    fs_path: str  # the same location as Ray wants it with `fs` (no scheme)

    @property
    def runs_uri(self) -> str:
        return f"{self.uri}/runs"

    @property
    def spec_uri(self) -> str:
        return f"{self.uri}/tltrain/spec.json"

    def run_name(self, trial_id: str) -> str:
        return f"{self.name}-{trial_id}"

    def run_fs_path(self, trial_id: str) -> str:
        return f"{self.fs_path}/runs/{self.run_name(trial_id)}"

    def run_uri(self, trial_id: str) -> str:
        return f"{self.runs_uri}/{self.run_name(trial_id)}"

    def done_uri(self, trial_id: str) -> str:
        return f"{self.uri}/tltrain/done/{trial_id}.json"


def sweep_paths(spec: JobSpec) -> SweepPaths:
    fs, base = storage.pyarrow_filesystem(spec.storage.uri)
    fs_path = f"{base}/{spec.name}"
    return SweepPaths(spec.name, checkpoint_uri(spec.storage.uri, fs_path), fs, fs_path)


def trial_spec(spec: JobSpec, paths: SweepPaths, trial_id: str, config: dict[str, Any]) -> JobSpec:
    """A trial's own training spec: the sampled values, its run name, the sweep's runs/ storage, and
    checkpoints ranked by the search metric (so the kept top-k hold the trial's best)."""
    assert spec.tune is not None
    return apply_config(
        spec,
        config,
        name=paths.run_name(trial_id),
        tune=None,
        **{"storage.uri": paths.runs_uri, "storage.metric": spec.tune.metric, "storage.mode": spec.tune.mode},
    )


def _write_json(uri: str, obj: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="tltrain-") as tmp:
        local = Path(tmp) / "f.json"
        local.write_text(json.dumps(obj, indent=2, default=str))
        if not storage.is_s3(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        storage.upload_file(str(local), uri)


def _read_json(uri: str) -> Any | None:
    if not storage.exists(uri):
        return None
    with tempfile.TemporaryDirectory(prefix="tltrain-") as tmp:
        local = Path(tmp) / "f.json"
        storage.download_file(uri, str(local))
        return json.loads(local.read_text())


# --- the trial function (runs in a Tune actor on the cluster) ----------------------------------


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def run_trial(config: dict[str, Any], spec_dict: dict[str, Any], plan_dict: dict[str, Any]) -> None:
    """One trial = one Ray Train run of the spec with the sampled values; Train's reports reach
    Tune through TuneReportCallback (ASHA sees every epoch)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = JobSpec.model_validate(spec_dict)
    assert spec.tune is not None
    paths = sweep_paths(spec)
    trial_id = tune.get_context().get_trial_id()
    done = _read_json(paths.done_uri(trial_id))
    if done is not None:
        # Finished before the driver restarted (Tune's saved state lagged): do not train again, but
        # hand Tune the trial's last epoch, as Tune wants every trial to report its metric.
        last = dict((done.get("history") or [{}])[-1])
        last.setdefault("epoch", done.get("epochs", 0))
        if last.get(spec.tune.metric) is None:
            last[spec.tune.metric] = done.get("best_metric") if done.get("best_metric") is not None else math.nan
        tune.report({**last, _REPLAYED: True})
        return
    tspec = trial_spec(spec, paths, trial_id, config)
    prior = _train_run_result(paths, trial_id)
    latest = prior.metrics if prior is not None and prior.checkpoint is not None else None
    if latest and (int(latest.get("epoch", 0)) >= tspec.loop.epochs or latest.get("stopped_early")):
        # Its Train run already ended (the driver died before recording it): training again would
        # report nothing, which Tune rejects; hand over the last epoch instead.
        tune.report({**latest, _REPLAYED: True})
        return
    plan = TrainPlan(**plan_dict)
    if any(key.startswith(_PLAN_KEYS) for key in config):
        plan = build_plan(tspec)
    trainer = build_trainer(tspec, plan, [TuneReportCallback()], name=paths.run_name(trial_id))
    trainer.fit()  # raises on failure: Tune marks the trial ERROR and --resume retries it


# --- a trial's record, from its Train run in storage -------------------------------------------


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _train_run_result(paths: SweepPaths, trial_id: str) -> Any | None:
    """The trial's Ray Train Result from storage (checkpoints and their metrics), None before its
    first checkpoint."""
    import ray.train

    try:
        return ray.train.Result.from_path(paths.run_fs_path(trial_id), storage_filesystem=paths.fs)
    except RuntimeError as err:
        # No run folder or no checkpoint snapshot in it yet: the trial never checkpointed. Anything
        # else (storage unreachable) propagates: a record must not claim "0 epochs" by mistake.
        if "doesn't exist" not in str(err):
            raise
        log.debug("tune: no Train run for trial %s: %s", trial_id, err)
        return None


def _read_train_run(paths: SweepPaths, trial_id: str, metric: str, mode: str) -> tuple[list[dict[str, Any]], str | None, float | None]:
    """(epoch history, best existing checkpoint URI, that checkpoint's metric) of a trial's Train run;
    ([], None, None) when it never saved a checkpoint."""
    from tltrain.checkpoint import META_FILE

    result = _train_run_result(paths, trial_id)
    if result is None:
        return [], None, None
    history: list[dict[str, Any]] = []
    if result.checkpoint is not None:
        meta = _read_json(f"{checkpoint_uri(paths.uri, result.checkpoint.path)}/{META_FILE}") or {}
        history = list((meta.get("loop_state") or {}).get("history") or [])
    best_uri, best_metrics = best_checkpoint(result, paths.uri, metric, mode)
    return history, best_uri, float(best_metrics[metric]) if best_metrics else None


def build_record(
    spec: JobSpec, paths: SweepPaths, trial_id: str, config: dict[str, Any], error: str | None
) -> dict[str, Any]:
    """One row of the result table: sampled values, best metric, epochs, stop reason, cost."""
    assert spec.tune is not None
    metric, mode = spec.tune.metric, spec.tune.mode
    config = {k: plain(v) for k, v in config.items()}
    tspec = trial_spec(spec, paths, trial_id, config)
    history, best_uri, best_ckpt_metric = _read_train_run(paths, trial_id, metric, mode)
    values = [float(h[metric]) for h in history if isinstance(h.get(metric), (int, float))]
    best = None
    for v in values:
        if best is None or _better(v, best, mode):
            best = v
    epochs = int(history[-1]["epoch"]) if history else 0
    stopped_by = None
    if error is None and 0 < epochs < tspec.loop.epochs:
        stopped_by = "patience" if history[-1].get("stopped_early") else "asha"
    worker_s = sum(float(h.get("epoch_time_s", 0.0)) for h in history) * tspec.scaling.num_workers
    return {
        "trial_id": trial_id,
        "run_name": paths.run_name(trial_id),
        "config": config,
        "status": "ERROR" if error else "TERMINATED",
        "error": error,
        "best_metric": best_ckpt_metric if best_ckpt_metric is not None else best,
        "best_checkpoint": best_uri,
        "epochs": epochs,
        "stopped_early": stopped_by is not None,
        "stopped_by": stopped_by,
        "cost_worker_s": worker_s,
        "gpu_hours": worker_s / 3600 if tspec.scaling.use_gpu else 0.0,
        "history": history,
    }


# --- driver side: progress, per-trial records and MLflow children ------------------------------

# Live reporters of this process by sweep URI. Tune pickles its callbacks into tuner.pkl and a
# restored Tuner brings back those pickles, so the callback carries only this key.
_LIVE: dict[str, "_SweepReporter"] = {}


class SweepCallback(tune.Callback):
    """Forwards Tune's trial events to this process's live `_SweepReporter` (looked up by key)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def _call(self, method: str, *args: Any) -> None:
        reporter = _LIVE.get(self.key)
        if reporter is None:
            return
        try:
            getattr(reporter, method)(*args)
        except Exception as err:  # noqa: BLE001 - a report must never stop the search
            log.warning("tune: %s for a trial failed: %s", method, err)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._call("on_result", trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._call("on_done", trial.trial_id, dict(trial.config), None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._call("on_done", trial.trial_id, dict(trial.config), _trial_error(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Every trial of the search, restored ones included, by its real id (trial directory
        # names can carry a suffix after a restore).
        ended = [(t.trial_id, dict(t.config), _trial_error(t) if t.status == "ERROR" else None) for t in trials]
        self._call("on_end", ended)


def _trial_error(trial: Any) -> str:
    text = ""
    try:
        text = trial.get_pickled_error() or trial.get_error() or ""
    except Exception:  # noqa: BLE001
        text = ""
    text = str(text).strip()
    return text.splitlines()[-1][:500] if text else "trial failed (see the trial's logs)"


class _SweepReporter:
    """The driver's side of a sweep: a line per trial epoch, and when a trial ends its record
    (written to storage) and MLflow child run. Records are built on a background thread: they read
    storage and write MLflow, which must not stall Tune's event loop (it starts the next trials)."""

    def __init__(self, spec: JobSpec, paths: SweepPaths, out: TextIO, parent: Any) -> None:
        self.spec = spec
        self.paths = paths
        self.out = out
        self.parent = parent  # tracking.Tracker / NullTracker of the sweep
        self.records: dict[str, dict[str, Any]] = {}  # finished in this process
        self.trials: list[tuple[str, dict[str, Any], str | None]] | None = None  # (id, config, error) at the end
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tltrain-tune")

    def on_end(self, trials: list[tuple[str, dict[str, Any], str | None]]) -> None:
        self.trials = trials

    def on_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if result.get(_REPLAYED):
            return  # a trial recorded by an earlier driver, handing Tune its last epoch again
        assert self.spec.tune is not None
        metric = self.spec.tune.metric
        value = result.get(metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else str(value)
        print(
            f"[{trial_id}] epoch {result.get('epoch')}/{self.spec.loop.epochs}  {metric} {shown}  "
            f"{float(result.get('img_per_s') or 0):.0f} img/s",
            file=self.out,
            flush=True,
        )

    def on_done(self, trial_id: str, config: dict[str, Any], error: str | None) -> None:
        self._pool.submit(self._finish_logged, trial_id, config, error)

    def _finish_logged(self, trial_id: str, config: dict[str, Any], error: str | None) -> None:
        try:
            self.finish(trial_id, config, error)
        except Exception as err:  # noqa: BLE001 - run_tune rebuilds a missing record at the end
            log.warning("tune: could not record trial %s: %s", trial_id, err)

    def finish(self, trial_id: str, config: dict[str, Any], error: str | None) -> dict[str, Any]:
        """The trial's record: from an earlier driver if it wrote one, else built from storage,
        saved (finished trials only: an errored one is retried by --resume), logged and printed."""
        if trial_id in self.records:
            return self.records[trial_id]
        stored = _read_json(self.paths.done_uri(trial_id))
        if stored is not None:
            stored.setdefault("history", [])
            self.records[trial_id] = stored
            return stored
        record = build_record(self.spec, self.paths, trial_id, config, error)
        if error is None:
            _write_json(self.paths.done_uri(trial_id), record)
        try:
            _track_trial(self.spec, self.paths, self.parent, record)
        except Exception as err:  # noqa: BLE001 - tracking must not lose a trial's result
            log.warning("MLflow: could not log trial %s: %s", trial_id, err)
        self.records[trial_id] = record
        print(f"[{trial_id}] {_describe(record, self.spec)}", file=self.out, flush=True)
        return record

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _describe(record: dict[str, Any], spec: JobSpec) -> str:
    assert spec.tune is not None
    if record["status"] == "ERROR":
        return f"failed after {record['epochs']} epoch(s): {record['error']}"
    best = record["best_metric"]
    stop = {"asha": ", stopped early by ASHA", "patience": ", stopped early (patience)"}.get(record["stopped_by"] or "", "")
    return (
        f"done: best {spec.tune.metric} {best:.4f}" if best is not None else "done: no metric"
    ) + f" after {record['epochs']} epoch(s){stop}, {record['cost_worker_s']:.1f} worker-s"


def _track_trial(spec: JobSpec, paths: SweepPaths, parent: Any, record: dict[str, Any]) -> None:
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


# --- the search --------------------------------------------------------------------------------


def _ray_domain(dist: Dist) -> Any:
    if dist.kind == "choice":
        return tune.choice(list(dist.args))
    low, high = dist.args
    if dist.kind == "randint":
        return tune.randint(low, high + 1)  # the spec's randint includes high; Ray's excludes it
    if dist.kind == "uniform":
        return tune.uniform(low, high)
    return tune.loguniform(low, high)


def _max_concurrent(spec: JobSpec, space: dict[str, Dist]) -> int:
    """tune.max_concurrent_trials, else as many trials as the cluster's CPUs/GPUs hold at once
    (each trial needs num_workers x cpus_per_worker CPUs, and a GPU per worker with use_gpu)."""
    import ray

    assert spec.tune is not None
    if spec.tune.max_concurrent_trials is not None:
        return min(spec.tune.max_concurrent_trials, spec.tune.num_samples)

    def worst(key: str, default: Any) -> Any:
        dist = space.get(key)
        return max(dist.candidates()) if dist is not None else default

    workers = worst("scaling.num_workers", spec.scaling.num_workers)
    cpus = workers * worst("scaling.cpus_per_worker", spec.scaling.cpus_per_worker)
    use_gpu = bool(worst("scaling.use_gpu", spec.scaling.use_gpu))
    resources = ray.cluster_resources()
    fits = math.floor(resources.get("CPU", 0.0) / cpus + 1e-9)
    if use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0.0) / workers + 1e-9))
    if fits < 1:
        log.warning(
            "tune: the cluster has %s CPU / %s GPU now, a trial needs %s CPU%s; running one trial at a time "
            "(an autoscaler may add nodes)", resources.get("CPU", 0), resources.get("GPU", 0), cpus,
            f" + {workers} GPU" if use_gpu else "",
        )  # fmt: skip
    return max(1, min(fits, spec.tune.num_samples))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _prepare_storage(spec: JobSpec, paths: SweepPaths, resume: bool) -> bool:
    """Refuse to overwrite; on --resume check it is the same search. Returns True to restore
    Tune's stored state, False to start the search (run_tune then records its spec)."""
    from ray.tune import Tuner

    restorable = Tuner.can_restore(paths.fs_path, storage_filesystem=paths.fs)
    stored = _read_json(paths.spec_uri)
    if not resume:
        if restorable or stored is not None or storage.exists(paths.uri):
            what = "a search" if restorable or stored is not None else "something (not a tltrain search)"
            raise SpecError(
                f"name: {what} named {spec.name!r} already exists at {paths.uri}; pass --resume to continue "
                f"it, or choose a new name (--set name=...). Nothing was overwritten."
            )
        return False
    if stored is None:
        if storage.exists(paths.uri):
            raise SpecError(f"name: {paths.uri} holds something that is not a tltrain search; nothing to resume")
        raise SpecError(f"name: no search named {spec.name!r} at {paths.uri} to resume; run without --resume")
    changed = [k for k in _diff(stored, spec.to_dict()) if not k.startswith(_RESUME_MAY_CHANGE)]
    if changed:
        raise SpecError(
            f"--resume continues the same search, but the spec differs from the stored one at: {', '.join(changed)} "
            f"(stored at {paths.spec_uri}); use the same spec and --set values, or a new name"
        )
    return restorable  # False: the spec was written but Tune never started, so start it now


def _describe_sweep(spec: JobSpec, plan: TrainPlan, space: dict[str, Dist], concurrent: int, out: TextIO) -> None:
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
            (q["best_metric"] == r["best_metric"] or _better(q["best_metric"], r["best_metric"], mode))
            and q["cost_worker_s"] <= r["cost_worker_s"]
            and (q["best_metric"] != r["best_metric"] or q["cost_worker_s"] < r["cost_worker_s"])
            for q in scored
            if q is not r
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return json.dumps(v) if not isinstance(v, str) else v


def _print_table(summary: dict[str, Any], space_keys: list[str], out: TextIO) -> None:
    metric = summary["metric"]
    header = ["trial", *space_keys, metric, "epochs", "stop", "worker-s", "pareto"]
    rows = []
    for r in summary["trials"]:
        rows.append([
            r["trial_id"], *(_fmt(r["config"].get(k)) for k in space_keys),
            "ERROR" if r["status"] == "ERROR" else ("-" if r["best_metric"] is None else f"{r['best_metric']:.4f}"),
            str(r["epochs"]), r["stopped_by"] or "", f"{r['cost_worker_s']:.1f}", "*" if r["pareto"] else "",
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


def _tuner(
    spec: JobSpec, paths: SweepPaths, trainable: Any, param_space: dict[str, Any], concurrent: int, restore: bool
) -> tune.Tuner:
    """A new Tuner for the spec, or the stored one (trials, searcher and scheduler state) to resume:
    finished trials are kept, unfinished and errored ones continue from their checkpoints."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    assert spec.tune is not None
    t = spec.tune
    if restore:
        return tune.Tuner.restore(
            paths.fs_path, trainable=trainable, resume_errored=True, restart_errored=False,
            param_space=param_space, storage_filesystem=paths.fs,
        )  # fmt: skip
    limit: int | None = concurrent  # Tune wraps a Searcher in a ConcurrencyLimiter of this size
    if t.searcher == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        searcher: Any = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=t.seed))
    else:
        from ray.tune.search import BasicVariantGenerator

        # Tune ignores max_concurrent_trials for a generator passed in: it takes its own.
        searcher = BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrent)
        limit = None
    scheduler: Any = (
        ASHAScheduler(
            time_attr="epoch", max_t=spec.loop.epochs, grace_period=t.scheduler.grace_epochs,
            reduction_factor=t.scheduler.reduction_factor,
        )  # fmt: skip
        if t.scheduler.kind == "asha"
        else FIFOScheduler()
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, search_alg=searcher, scheduler=scheduler, num_samples=t.num_samples,
            max_concurrent_trials=limit, trial_dirname_creator=_trial_dirname,
        ),  # fmt: skip
        run_config=tune.RunConfig(
            name=spec.name, storage_path=paths.fs_path.rsplit("/", 1)[0], storage_filesystem=paths.fs,
            callbacks=[SweepCallback(paths.uri)], verbose=0, failure_config=tune.FailureConfig(max_failures=0),
        ),  # fmt: skip
    )


def run_tune(spec: JobSpec, resume: bool = False, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Search the spec's tune.space (validated before anything starts) and return the summary."""
    from tltrain.tracking import open_tracker

    if spec.tune is None:
        raise SpecError("tune: the spec has no tune: section (num_samples, metric, mode, space, ...)")
    if len(spec.name) > 110:
        raise SpecError("name: at most 110 characters for a sweep (each trial's run is <name>-<trial_id>)")
    plan = build_plan(spec)
    space = validate_space(spec, plan.num_layer_groups)
    paths = sweep_paths(spec)
    restore = _prepare_storage(spec, paths, resume)

    ensure_ray(spec.scaling.address)
    concurrent = _max_concurrent(spec, space)
    _describe_sweep(spec, plan, space, concurrent, out)
    param_space = {key: _ray_domain(dist) for key, dist in space.items()}
    # The trial function only waits on its trainer, whose workers reserve the real CPUs/GPUs; a
    # trial must reserve none of them or a trial's own CPU would keep the trainer's workers from
    # being placed. Tune refuses an all-zero request, hence one byte of "memory" (every node has it).
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_dict=spec.to_dict(), plan_dict=plan.to_dict()), {"CPU": 0, "memory": 1}
    )
    with open_tracker(spec, run_name=spec.name, tags={"tltrain.kind": "sweep"}, resume=resume) as parent:
        parent.log_spec(spec.to_dict())
        reporter = _SweepReporter(spec, paths, out, parent)
        _LIVE[paths.uri] = reporter
        if restore:
            print(f"resuming {paths.uri}: finished trials are kept, the others continue", file=out, flush=True)
        if not restore:
            _write_json(paths.spec_uri, spec.to_dict())  # from here on the name is taken
        try:
            tuner = _tuner(spec, paths, trainable, param_space, concurrent, restore)
            grid = tuner.fit()
        finally:
            _LIVE.pop(paths.uri, None)
            reporter.close()
        ended = reporter.trials
        if ended is None:  # no end-of-experiment callback: fall back on the result grid
            ended = [
                (
                    (r.metrics or {}).get("trial_id") or Path(r.path).name, dict(r.config or {}),
                    str(r.error).strip().splitlines()[-1][:500] if r.error else None,
                )
                for r in grid
            ]  # fmt: skip
        # Trials that ended before a killed driver wrote their record, or whose record failed,
        # get it now; the others come from this driver's or an earlier one's records.
        records = [reporter.finish(trial_id, config, error) for trial_id, config, error in ended]
        summary = summarize(spec, records)
        best = next((r for r in records if r["trial_id"] == summary["best_trial_id"]), None)
        _track_sweep(parent, summary, best)
        summary["mlflow_run_id"] = parent.run_id
    _print_table(summary, list(space), out)
    if summary["best_checkpoint"] is None:
        errors = [r["error"] for r in records if r["error"]]
        raise RuntimeError(f"tune: no trial of {spec.name} produced a checkpoint" + (f"; e.g. {errors[0]}" if errors else ""))
    return summary


def _track_sweep(parent: Any, summary: dict[str, Any], best: dict[str, Any] | None) -> None:
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
