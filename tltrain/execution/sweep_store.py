"""Where a sweep lives in storage, and each finished trial's record read back from it.

Kept apart from tune.py (which drives Ray Tune) because both the live driver and a driver resumed
after a kill build records the same way, from storage alone. Layout of a sweep named N:

    <storage.uri>/N/                          the Tune experiment (Ray's files, one dir per trial)
    <storage.uri>/N/runs/N-<trial_id>/        each trial's Ray Train run: checkpoint_*/ (its spec's
                                              storage.uri is <storage.uri>/N/runs)
    <storage.uri>/N/tltrain/spec.json         the sweep's resolved spec (--resume must match it)
    <storage.uri>/N/tltrain/done/<id>.json    a finished trial's record, written by the driver

Numbers in a record come from the Train run's checkpoints (each checkpoint's meta.json holds the
whole epoch history), not from Tune's in-memory results, so they survive a killed driver.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tltrain import storage
from tltrain.core.checkpoint import META_FILE, CheckpointMeta
from tltrain.execution.trainer import best_checkpoint
from tltrain.execution.worker import checkpoint_uri
from tltrain.spec.metrics import ranked, worker_seconds
from tltrain.spec.schema import JobSpec, SpecError
from tltrain.spec.search import apply_config, plain

log = logging.getLogger(__name__)

# Spec keys that may differ between a kill and --resume: changing them leaves the trials comparable.
_RESUME_MAY_CHANGE = ("scaling.address", "tracking.", "data.cache_dir", "data.loader_workers")


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


def write_json(uri: str, obj: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="tltrain-") as tmp:
        local = Path(tmp) / "f.json"
        local.write_text(json.dumps(obj, indent=2, default=str))
        if not storage.is_s3(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        storage.upload_file(str(local), uri)


def read_json(uri: str) -> Any | None:
    if not storage.exists(uri):
        return None
    with tempfile.TemporaryDirectory(prefix="tltrain-") as tmp:
        local = Path(tmp) / "f.json"
        storage.download_file(uri, str(local))
        return json.loads(local.read_text())


def train_run_result(paths: SweepPaths, trial_id: str) -> Any | None:
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


def _read_train_run(
    paths: SweepPaths, trial_id: str, metric: str, mode: str
) -> tuple[list[dict[str, Any]], str | None, float | None]:
    """(epoch history, best existing checkpoint URI, that checkpoint's metric) of a trial's Train run;
    ([], None, None) when it never saved a checkpoint."""
    result = train_run_result(paths, trial_id)
    if result is None:
        return [], None, None
    history: list[dict[str, Any]] = []
    if result.checkpoint is not None:
        meta = read_json(f"{checkpoint_uri(paths.uri, result.checkpoint.path)}/{META_FILE}")
        history = CheckpointMeta.from_dict(meta).loop_state.history if meta else []
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
    best_epoch = next(iter(ranked(history, lambda h: h.get(metric), mode)), None)
    best = float(best_epoch[metric]) if best_epoch else None
    epochs = int(history[-1]["epoch"]) if history else 0
    stopped_by = None
    if error is None and 0 < epochs < tspec.loop.epochs:
        last = history[-1]
        stopped_by = "diverged" if last.get("diverged") else "patience" if last.get("stopped_early") else "asha"
    worker_s = worker_seconds(history, tspec.scaling.num_workers)
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


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def prepare_storage(spec: JobSpec, paths: SweepPaths, resume: bool) -> bool:
    """Refuse to overwrite; on --resume check it is the same search. Returns True to restore
    Tune's stored state, False to start the search (run_tune then records its spec)."""
    from ray.tune import Tuner

    restorable = Tuner.can_restore(paths.fs_path, storage_filesystem=paths.fs)
    stored = read_json(paths.spec_uri)
    if not resume:
        if restorable or stored is not None or storage.holds_output(paths.uri):
            what = "a search" if restorable or stored is not None else "something (not a tltrain search)"
            raise SpecError(
                f"name: {what} named {spec.name!r} already exists at {paths.uri}; pass --resume to continue "
                f"it, or choose a new name (--set name=...). Nothing was overwritten."
            )
        return False
    if stored is None:
        if storage.holds_output(paths.uri):
            raise SpecError(f"name: {paths.uri} holds something that is not a tltrain search; nothing to resume")
        raise SpecError(f"name: no search named {spec.name!r} at {paths.uri} to resume; run without --resume")
    changed = [k for k in _diff(stored, spec.to_dict()) if not k.startswith(_RESUME_MAY_CHANGE)]
    if changed:
        raise SpecError(
            f"--resume continues the same search, but the spec differs from the stored one at: {', '.join(changed)} "
            f"(stored at {paths.spec_uri}); use the same spec and --set values, or a new name"
        )
    return restorable  # False: the spec was written but Tune never started, so start it now
