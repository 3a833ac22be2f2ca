"""`tltrain tune`: a Ray Tune search over Ray Train runs, with ASHA, resume, cost and best checkpoint.

Each trial is a whole Ray Train run (the spec's workers) started from a Tune trial function that
itself reserves no CPU, so the trainer's workers can be placed; trials run side by side as far as
the cluster's CPUs/GPUs allow (or tune.max_concurrent_trials); with tune.trials_per_gpu k, each
1-worker trial reserves 1/k of a GPU (execution/packing.py measures k for auto). Where a sweep
lives in storage and how a trial's record is built: sweep_store.py; the MLflow runs:
sweep_tracking.py; the table and summary: reports/sweep.py.

Resume: Tune's own experiment state (trials, searcher, scheduler) is synced to storage about every
10 s; a trial that finished after the last sync would be re-run from it, so the driver writes a
record the moment a trial finishes and the trial function returns at once when it finds one. An
unfinished trial reruns its function, whose Train run (same name and storage) resumes from its
latest checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, TextIO

import ray
from ray import tune

from tltrain import storage
from tltrain.core.checkpoint import MANIFEST_FILE
from tltrain.core.plan import TrainPlan, count_layer_groups
from tltrain.execution.evaluate import score_checkpoint, test_split_of
from tltrain.execution.packing import announce_fake_gpus, resolve_trials_per_gpu
from tltrain.execution.preflight import build_plan
from tltrain.execution.rank import prescreen
from tltrain.execution.resource_watch import ResourceWatch
from tltrain.execution.sweep_store import (
    SweepPaths,
    build_record,
    prepare_storage,
    read_json,
    sweep_paths,
    train_run_result,
    trial_spec,
    write_json,
)
from tltrain.execution.sweep_tracking import track_sweep, track_trial
from tltrain.execution.trainer import build_trainer, ensure_ray, keep_working_dir
from tltrain.reports.sweep import describe_sweep, describe_trial, print_table, standing, summarize
from tltrain.spec.metrics import IMG_PER_S
from tltrain.spec.packing import gpu_fraction, trials_at_once, trials_that_fit, worker_gpus
from tltrain.spec.schema import JobSpec, SpecError
from tltrain.spec.search import apply_config, validate_space
from tltrain.spec.space import Dist

log = logging.getLogger(__name__)

# Keys whose change alters the data plan (classes, samples, preprocessing or layer groups): such a
# trial checks its own plan instead of reusing the driver's.
_PLAN_KEYS = ("model.", "data.", "strategy.group_granularity")
# Marks a result that repeats an already finished trial's last epoch (see run_trial).
_REPLAYED = "tltrain_replayed"


# --- the trial function (runs in a Tune actor on the cluster) ----------------------------------


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def run_trial(
    config: dict[str, Any], spec_dict: dict[str, Any], plan_dict: dict[str, Any], gpu_share: float | None = None
) -> None:
    """One trial = one Ray Train run of the spec with the sampled values; Train's reports reach
    Tune through TuneReportCallback (ASHA sees every epoch). `gpu_share`: the trial's worker's
    GPU share under tune.trials_per_gpu (resolved on the driver; `auto` is measured there)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = JobSpec.model_validate(spec_dict)
    assert spec.tune is not None
    paths = sweep_paths(spec)
    trial_id = tune.get_context().get_trial_id()
    done = read_json(paths.done_uri(trial_id))
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
    if gpu_share is not None:
        tspec = apply_config(tspec, {"scaling.gpus_per_worker": gpu_share})
    prior = train_run_result(paths, trial_id)
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


# --- driver side: progress, per-trial records and MLflow children ------------------------------

# Live reporters of this process by sweep URI. Tune pickles its callbacks into tuner.pkl and a
# restored Tuner brings back those pickles, so the callback carries only this key.
_LIVE: dict[str, _SweepReporter] = {}


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

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._call("on_start", trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._call("on_result", trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._call("on_done", trial.trial_id, dict(trial.config), None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._call("on_done", trial.trial_id, dict(trial.config), _trial_error(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Every trial of the search, restored ones included, by its real id (trial directory
        # names can carry a suffix after a restore).
        ended = [
            EndedTrial(t.trial_id, dict(t.config), t.status, _trial_error(t) if t.status == "ERROR" else None)
            for t in trials
        ]
        self._call("on_end", ended)


@dataclass
class EndedTrial:
    trial_id: str
    config: dict[str, Any]
    status: str  # Tune's status when the experiment ended
    error: str | None


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
        self.trials: list[EndedTrial] | None = None  # every trial of the search, at the end
        self.started: set[str] = set()  # trials this process ran
        self.completed: set[str] = set()  # ... and saw end (finished, stopped by ASHA, or failed)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tltrain-tune")

    def on_start(self, trial_id: str) -> None:
        self.started.add(trial_id)

    def on_end(self, trials: list[EndedTrial]) -> None:
        self.trials = trials

    def unfinished(self, trial: EndedTrial) -> bool:
        """Interrupted rather than ended: on Ctrl-C Tune stops running trials and marks them
        TERMINATED without a completion event, and pending ones never ran. Trials restored as
        TERMINATED (ended under an earlier driver) were not started here."""
        if trial.status not in ("TERMINATED", "ERROR"):
            return True
        return trial.trial_id in self.started and trial.trial_id not in self.completed

    def on_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if result.get(_REPLAYED):
            return  # a trial recorded by an earlier driver, handing Tune its last epoch again
        assert self.spec.tune is not None
        metric = self.spec.tune.metric
        value = result.get(metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else str(value)
        print(
            f"[{trial_id}] epoch {result.get('epoch')}/{self.spec.loop.epochs}  {metric} {shown}  "
            f"{float(result.get(IMG_PER_S) or 0):.0f} img/s",
            file=self.out,
            flush=True,
        )

    def on_done(self, trial_id: str, config: dict[str, Any], error: str | None) -> None:
        self.completed.add(trial_id)
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
        stored = read_json(self.paths.done_uri(trial_id))
        if stored is not None:
            stored.setdefault("history", [])
            self.records[trial_id] = stored
            return stored
        record = build_record(self.spec, self.paths, trial_id, config, error)
        if error is None:
            write_json(self.paths.done_uri(trial_id), record)
        try:
            track_trial(self.spec, self.paths, self.parent, record)
        except Exception as err:  # noqa: BLE001 - tracking must not lose a trial's result
            log.warning("MLflow: could not log trial %s: %s", trial_id, err)
        self.records[trial_id] = record
        print(f"[{trial_id}] {describe_trial(record, self.spec)}", file=self.out, flush=True)
        running = len(self.started - self.completed)
        print(standing(list(self.records.values()), running, self.spec), file=self.out, flush=True)
        return record

    def checked(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record, rebuilt from storage if `keep` has since deleted the checkpoint it names: a
        trial ASHA stopped can still register one more epoch before its Train run is torn down."""
        uri = record.get("best_checkpoint")
        if uri is None or storage.exists(f"{uri}/{MANIFEST_FILE}"):
            return record
        fresh = build_record(self.spec, self.paths, record["trial_id"], record["config"], record["error"])
        if fresh["error"] is None:
            write_json(self.paths.done_uri(record["trial_id"]), fresh)
        self.records[record["trial_id"]] = fresh
        return fresh

    def close(self) -> None:
        self._pool.shutdown(wait=True)


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


def _max_concurrent(spec: JobSpec, space: dict[str, Dist], resources: dict[str, float], trials_per_gpu: int = 1) -> int:
    """tune.max_concurrent_trials, else as many trials as the cluster's CPUs/GPUs (`resources`)
    hold at once: each trial needs num_workers x cpus_per_worker CPUs and, with use_gpu, its GPU
    share per worker (1/trials_per_gpu when packed, else scaling.gpus_per_worker)."""
    assert spec.tune is not None

    def worst(key: str, default: Any) -> Any:
        dist = space.get(key)
        values = [v for v in dist.candidates() if v is not None] if dist is not None else []
        return max(values) if values else default

    workers = worst("scaling.num_workers", spec.scaling.num_workers)
    cpus = worst("scaling.cpus_per_worker", spec.scaling.cpus_per_worker)
    use_gpu = bool(worst("scaling.use_gpu", spec.scaling.use_gpu))
    gpus = worker_gpus(use_gpu, worst("scaling.gpus_per_worker", spec.scaling.gpus_per_worker))
    if trials_per_gpu > 1:
        gpus = gpu_fraction(trials_per_gpu)
    fits = trials_that_fit(resources.get("CPU", 0.0), resources.get("GPU", 0.0), workers, cpus, gpus)
    if fits < 1 and spec.tune.max_concurrent_trials is None:
        log.warning(
            "tune: the cluster has %s CPU / %s GPU now, a trial needs %s CPU%s; running one trial at a time "
            "(an autoscaler may add nodes)", resources.get("CPU", 0), resources.get("GPU", 0), workers * cpus,
            f" + {workers * gpus:g} GPU" if use_gpu else "",
        )  # fmt: skip
    return trials_at_once(fits, spec.tune.num_samples, spec.tune.max_concurrent_trials)


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
            time_attr="epoch",
            max_t=spec.loop.epochs,
            grace_period=t.scheduler.grace_epochs,
            reduction_factor=t.scheduler.reduction_factor,
        )  # fmt: skip
        if t.scheduler.kind == "asha"
        else FIFOScheduler()
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=t.num_samples,
            max_concurrent_trials=limit,
            trial_dirname_creator=_trial_dirname,
        ),  # fmt: skip
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=paths.fs_path.rsplit("/", 1)[0],
            storage_filesystem=paths.fs,
            callbacks=[SweepCallback(paths.uri)],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),  # fmt: skip
    )


# Searched keys that change where LoRA's adapters go: every combination of their choices is checked.
_LORA_LAYOUT_KEYS = ("model.name", "model.weights", "strategy.group_granularity", "strategy.lora.targets")
_MAX_LORA_CHECKS = 16


def _check_lora_trials(spec: JobSpec, space: dict[str, Dist]) -> None:
    """With LoRA in the sweep (the spec's strategy.lora, or a searched strategy.lora.* key), every
    combination of the searched layout keys' choices, at the deepest searched freeze depth (where
    adapters have the least room), goes through the preflight: a trial whose targets match nothing
    fails here, naming the field, not inside Ray."""
    lora_keys = [k for k in space if k.startswith("strategy.lora.")]
    if spec.strategy.lora is None and not lora_keys:
        return
    fixed: dict[str, Any] = {k: space[k].candidates()[0] for k in lora_keys}
    if "strategy.freeze_depth" in space:
        depths = space["strategy.freeze_depth"].candidates()
        fixed["strategy.freeze_depth"] = "all" if "all" in depths else max(int(d) for d in depths)
    varied = [k for k in _LORA_LAYOUT_KEYS if k in space and space[k].kind == "choice"]
    combos = list(itertools.product(*(space[k].candidates() for k in varied)))[:_MAX_LORA_CHECKS]
    for values in combos:
        config = {**fixed, **dict(zip(varied, values))}
        try:
            build_plan(apply_config(spec, config))
        except SpecError as err:
            raise SpecError(f"tune.space: the trial {config} would fail: {err}") from None


def run_tune(
    spec: JobSpec, resume: bool = False, out: TextIO | None = None, *, force_unlock: bool = False
) -> dict[str, Any]:
    """Search the spec's tune.space (validated before anything starts) and return the summary.
    `out`: where progress goes (None = sys.stdout as it is at the call)."""
    out = out or sys.stdout
    if spec.tune is None:
        raise SpecError("tune: the spec has no tune: section (num_samples, metric, mode, space, ...)")
    if len(spec.name) > 110:
        raise SpecError("name: at most 110 characters for a sweep (each trial's run is <name>-<trial_id>)")
    plan = build_plan(spec)

    def checked_space(spec: JobSpec) -> dict[str, Dist]:
        return validate_space(
            spec, plan.num_layer_groups, groups_of=lambda variant: count_layer_groups(variant, len(plan.class_names))
        )

    space = checked_space(spec)
    _check_lora_trials(spec, space)
    # tune.prescreen: the source-model choices ranked by a transferability score first (forward
    # passes only), and the space cut to the best `keep` of them before any trial is sampled.
    spec, screened = prescreen(spec, out)
    if screened is not None:
        space = checked_space(spec)
    paths = sweep_paths(spec)
    # One driver per sweep name: taken before the storage check, so of two simultaneous starts
    # the loser is refused here and cannot also pass prepare_storage's "new sweep" test.
    with storage.acquire_lease(paths.uri, spec.name, "sweep", force=force_unlock):
        summary = _search(spec, plan, space, paths, resume, out)
    if screened is not None:
        summary["prescreen"] = screened
        print(f"prescreen ({screened['score']}): searched {screened['kept']}; pruned {screened['pruned']}",
              file=out, flush=True)  # fmt: skip
    return summary


def _search(
    spec: JobSpec, plan: TrainPlan, space: dict[str, Any], paths: SweepPaths, resume: bool, out: TextIO
) -> dict[str, Any]:
    from tltrain.tracking.tracker import open_tracker

    restore = prepare_storage(spec, paths, resume)

    ensure_ray(spec.scaling.address)
    keep_working_dir()  # else each trial process starts inside its Tune trial folder
    announce_fake_gpus(spec, out)
    packed = resolve_trials_per_gpu(spec, plan, space, out)  # auto: measured on a GPU, before any trial
    gpu_share = gpu_fraction(packed) if packed > 1 else None
    concurrent = _max_concurrent(spec, space, ray.cluster_resources(), packed)
    describe_sweep(spec, plan, space, concurrent, out)
    param_space = {key: _ray_domain(dist) for key, dist in space.items()}
    # The trial function only waits on its trainer, whose workers reserve the real CPUs/GPUs; a
    # trial must reserve none of them or a trial's own CPU would keep the trainer's workers from
    # being placed. Tune refuses an all-zero request, hence one byte of "memory" (every node has it).
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec_dict=spec.to_dict(), plan_dict=plan.to_dict(), gpu_share=gpu_share),
        {"CPU": 0, "memory": 1},
    )
    with open_tracker(spec, run_name=spec.name, tags={"tltrain.kind": "sweep"}, resume=resume) as parent:
        parent.log_spec(spec.to_dict())
        reporter = _SweepReporter(spec, paths, out, parent)
        _LIVE[paths.uri] = reporter
        if restore:
            print(f"resuming {paths.uri}: finished trials are kept, the others continue", file=out, flush=True)
        if not restore:
            write_json(paths.spec_uri, spec.to_dict())  # from here on the name is taken
        try:
            with ResourceWatch(out):  # trials whose workers Ray cannot place get a line, not silence
                _tuner(spec, paths, trainable, param_space, concurrent, restore).fit()
        finally:
            _LIVE.pop(paths.uri, None)
            reporter.close()
        if reporter.trials is None:  # Tune's cleanup always ends the experiment's callbacks
            raise RuntimeError(f"tune: Ray Tune ended {spec.name} without reporting its trials; run --resume")
        unfinished = [t.trial_id for t in reporter.trials if reporter.unfinished(t)]
        if unfinished:
            # Ctrl-C: Tune saved its state and stopped. No record for these trials, so --resume
            # continues them from their checkpoints instead of taking them as done.
            print(
                f"interrupted: {len(unfinished)} trial(s) unfinished ({', '.join(unfinished)}); finished trials are "
                f"kept. Continue with: tltrain tune SPEC --resume", file=out, flush=True,
            )  # fmt: skip
            raise KeyboardInterrupt
        # Trials that ended before a killed driver wrote their record, or whose record failed,
        # get it now; the others come from this driver's or an earlier one's records.
        records = [reporter.checked(reporter.finish(t.trial_id, t.config, t.error)) for t in reporter.trials]
        summary = summarize(spec, paths.uri, records)
        best = next((r for r in records if r["trial_id"] == summary["best_trial_id"]), None)
        if summary["best_checkpoint"] and test_split_of(spec):
            # Only the winner, only now: the held-out split ranks nothing.
            summary["test_metrics"] = score_checkpoint(spec, plan, summary["best_checkpoint"])
        track_sweep(parent, summary, best)
        summary["mlflow_run_id"] = parent.run_id
    print_table(summary, list(space), out)
    if summary["best_checkpoint"] is None:
        errors = [r["error"] for r in records if r["error"]]
        raise RuntimeError(
            f"tune: no trial of {spec.name} produced a checkpoint" + (f"; e.g. {errors[0]}" if errors else "")
        )
    return summary
