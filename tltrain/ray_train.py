"""Ray Train: the worker function and the TorchTrainer around it.

Ray stays in this module (and tune.py): the loop only sees torch.distributed and a `report`
callable. Progress goes driver-side through a Train `UserCallback` (it runs in the controller actor)
into a Ray queue that the driver thread drains, so progress lines and MLflow calls happen in the
user's process, not inside an actor.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue

from tltrain import __version__, storage, storage_retry
from tltrain.checkpoint import (
    MANIFEST_FILE,
    META_FILE,
    CheckpointError,
    load_meta,
    load_model_state,
    load_train_state,
    verify_checkpoint,
)
from tltrain.config import JobSpec
from tltrain.data import build_eval_loader, build_train_loader, build_transform, localize
from tltrain.loop import Resume, train
from tltrain.model import build_model, layer_groups
from tltrain.preflight import TrainPlan, fetch_weights
from tltrain.tracking_base import is_metric_value

log = logging.getLogger(__name__)

OnReport = Callable[[dict[str, Any], "str | None"], None]

INVALID_CHECKPOINTS_KEY = "invalid_checkpoints"


def _rebase(samples: list[list[Any]], driver_root: str, local_root: str) -> list[tuple[str, int]]:
    """The driver's absolute paths, moved under this node's copy of the same dataset root."""
    if driver_root == local_root:
        return [(p, int(y)) for p, y in samples]
    return [(str(Path(local_root) / Path(p).relative_to(driver_root)), int(y)) for p, y in samples]


CHECKPOINT_PREFIX = "checkpoint_"


def restore_candidates(latest_uri: str) -> list[str]:
    """The checkpoint to resume from, then the older ones of the same run, newest first.

    Ray names checkpoint folders checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff>, so name order is time
    order; only folders older than Ray's latest are fallbacks (a newer folder is an upload that
    Ray never registered)."""
    run_uri, _, latest_name = latest_uri.rstrip("/").rpartition("/")
    listing = storage_retry.with_retries(lambda: storage.list_files(run_uri), f"list {run_uri}", storage_retry.OUTAGE_RETRY_S)
    names = {rel.split("/", 1)[0] for rel in listing if "/" in rel}
    older = sorted((n for n in names if n.startswith(CHECKPOINT_PREFIX) and n < latest_name), reverse=True)
    return [latest_uri] + [f"{run_uri}/{n}" for n in older]


def _restore(model: torch.nn.Module, spec: JobSpec, rank: int) -> tuple[Resume | None, list[str]]:
    """Load the latest complete checkpoint into `model`: Ray's latest if it verifies, else (with a
    warning) the newest older one of the run that does. Returns (resume, checkpoints rejected)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, []
    rejected: list[str] = []
    candidates = restore_candidates(checkpoint_uri(spec.storage.uri, checkpoint.path))
    for uri in candidates:
        with tempfile.TemporaryDirectory(prefix="tltrain-restore-") as directory:
            try:
                storage_retry.with_retries(
                    lambda: storage.download_tree(uri, directory), f"download {uri}", storage_retry.OUTAGE_RETRY_S
                )
                verify_checkpoint(directory, source=uri)
                model_state = load_model_state(directory, source=uri)
                resume = Resume(train_state=load_train_state(directory, source=uri), meta=load_meta(directory))
            except CheckpointError as err:
                rejected.append(uri)
                if rank == 0:
                    log.warning("%s; falling back to the previous checkpoint of the run", err)
                continue
            # A shape mismatch here is not damage but a changed spec under the same name: it
            # propagates (an older checkpoint of the run would not fit either).
            model.load_state_dict(model_state)
        if rank == 0:
            log.warning(
                "resuming %s from %s (epoch %s, global_step %s)",
                spec.name, uri, resume.meta["epoch"], resume.meta["global_step"],
            )
        return resume, rejected
    raise CheckpointError(
        f"no complete checkpoint to resume {spec.name} from ({len(candidates)} tried under "
        f"{candidates[0].rpartition('/')[0]}); delete that folder to start over, or use a new name"
    )


def _upload_fn(spec: JobSpec) -> Callable[[ray.train.Checkpoint, str], ray.train.Checkpoint]:
    """Ray's checkpoint_upload_fn: our upload instead of Ray's pyarrow copy, for two reasons.
    MANIFEST.json goes up only after every other file, so a checkpoint in storage is complete or
    has no manifest (never loaded); and each file is retried through storage outages for up to
    storage_retry.OUTAGE_RETRY_S (Ray retries its own copy 3 times within ~3 s, and only for some errors).
    Rank 0 blocks here while the other ranks wait at their next collective, so training resumes
    in step once the store is back."""

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        ray_storage = ray.train.get_context().get_storage()
        fs_path = ray_storage.build_checkpoint_path_from_name(dir_name)
        storage.upload_tree(
            checkpoint.path, checkpoint_uri(spec.storage.uri, fs_path),
            last=[MANIFEST_FILE], retry_s=storage_retry.OUTAGE_RETRY_S,
        )
        return ray.train.Checkpoint(path=fs_path, filesystem=ray_storage.storage_filesystem)

    return upload


def worker_fn(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build data and model, restore, hand over to `loop.train`."""
    started_at = time.perf_counter()  # the first epoch's wall time includes this set-up
    # Ray Train logs every report (all metrics) at INFO on every rank, under a logger named by its
    # file path; the driver already prints one line per epoch.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    spec = JobSpec.model_validate(config["spec"])
    plan = TrainPlan(**config["plan"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.loop.seed)

    resuming = ray.train.get_checkpoint() is not None
    # A restored run gets its weights from the checkpoint; the source file would be overwritten.
    weights_file = None if resuming else fetch_weights(spec.model.weights, spec.data.cache_dir)
    model_spec = spec.model.model_copy(update={"weights": None}) if resuming else spec.model
    model = build_model(model_spec, len(plan.class_names), weights_file=weights_file)
    groups = layer_groups(model, coarse=spec.strategy.group_granularity == "coarse")
    resume, rejected = _restore(model, spec, rank)
    model.to(device)

    if spec.data.format == "shards":  # decoded once by `tltrain prepare`; crops on the device
        from tltrain.gpu_data import build_shard_loaders

        train_loader, val_loader = build_shard_loaders(spec, plan, rank, world_size, device)
    else:
        train_root = localize(spec.data.train, spec.data.cache_dir)
        val_root = localize(spec.data.val, spec.data.cache_dir) if spec.data.val else train_root
        train_samples = _rebase(plan.train, plan.train_root, train_root)
        val_samples = _rebase(plan.val, plan.val_root, val_root)
        batch = spec.scaling.batch_size_per_worker
        if spec.data.decode == "nvjpeg":
            from tltrain.nvjpeg_data import build_nvjpeg_loaders

            train_loader, val_loader = build_nvjpeg_loaders(
                spec, plan, train_samples, val_samples, rank, world_size, device
            )
        else:
            train_loader = build_train_loader(
                train_samples, build_transform(plan.data_config, True, spec.data.augment), batch, rank, world_size,
                spec.loop.seed, spec.data.loader_workers,
            )
            val_loader = build_eval_loader(
                val_samples, build_transform(plan.data_config, False), batch, rank, world_size, spec.data.loader_workers
            )
    meta: dict[str, Any] = {
        "spec": spec.to_dict(),
        "class_names": plan.class_names,
        "model_name": spec.model.name,
        "data_config": plan.data_config,
        "source_weights_uri": plan.weights_uri,
        "source_weights_sha256": plan.weights_sha256,
        "dataset_fingerprint": plan.fingerprint,
        "layer_groups": plan.layer_group_names,
        "tltrain_version": __version__,
        # Checkpoints found corrupt or incomplete on restore, carried forward in every later
        # checkpoint so that `fit` never picks one of them as the best.
        INVALID_CHECKPOINTS_KEY: sorted(set((resume.meta.get(INVALID_CHECKPOINTS_KEY, []) if resume else []) + rejected)),
    }
    upload = _upload_fn(spec)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=upload)

    train(
        spec, model, groups, train_loader, val_loader,
        device=device, num_classes=len(plan.class_names), report=report, meta=meta, resume=resume,
        started_at=started_at,
    )


class _ForwardReports(UserCallback):
    """Runs in the Train controller: forwards rank 0's metrics (+ checkpoint path) to the driver."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        path = checkpoint.path if checkpoint is not None else None
        self.queue.put((metrics[0], path))


@dataclass
class FitResult:
    best_checkpoint_uri: str | None
    best_metrics: dict[str, Any] | None
    latest_metrics: dict[str, Any] | None
    error: BaseException | None


def checkpoint_uri(storage_uri: str, path: str) -> str:
    """A checkpoint's URI from Ray's filesystem path (no scheme) and the spec's storage URI."""
    return f"s3://{path}" if storage.is_s3(storage_uri) else path


def ensure_ray(address: str | None, num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    # address None: RAY_ADDRESS or a cluster started on this machine, else a new local Ray
    # (Ray's own resolution). Worker logs reach the driver; Ray's INFO chatter does not.
    ray.init(address=address, num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=True)


def keep_working_dir() -> None:
    """Ray Train and Tune move workers and trial processes into a per-run directory unless this is
    off; relative data, weights and storage paths in a spec must resolve against the job's working
    directory, as on the driver. Set before a trainer or Tuner starts: Tune hands it on to trials."""
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"


def build_trainer(spec: JobSpec, plan: TrainPlan, callbacks: list[Any], name: str | None = None) -> TorchTrainer:
    # The retrying wrapper: Ray's controller writes its run snapshot right after each checkpoint,
    # and a storage outage at that moment would otherwise fail the run with a ControllerError.
    filesystem, storage_path = storage.pyarrow_filesystem(spec.storage.uri, retry_s=storage_retry.OUTAGE_RETRY_S)
    if not storage.is_s3(spec.storage.uri):
        Path(storage_path).mkdir(parents=True, exist_ok=True)
    keep_working_dir()
    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        worker_fn,
        train_loop_config={"spec": spec.to_dict(), "plan": plan.to_dict()},
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name or spec.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.storage.keep,
                checkpoint_score_attribute=spec.storage.metric,
                checkpoint_score_order=spec.storage.mode,
            ),
            failure_config=FailureConfig(max_failures=spec.storage.max_failures),
            callbacks=callbacks,
        ),
    )


def fit(spec: JobSpec, plan: TrainPlan, on_report: OnReport) -> FitResult:
    """Run the training job; `on_report(metrics, checkpoint_uri)` is called on the driver per epoch."""
    ensure_ray(spec.scaling.address)
    queue: Queue = Queue()
    trainer = build_trainer(spec, plan, [_ForwardReports(queue)])

    def drain(block_s: float) -> None:
        try:
            metrics, path = queue.get(timeout=block_s) if block_s else queue.get_nowait()
        except Empty:
            return
        on_report(metrics, checkpoint_uri(spec.storage.uri, path) if path else None)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(trainer.fit)
        while not future.done():
            drain(0.5)
        while not queue.empty():
            drain(0)
        try:
            result = future.result()
            error = result.error
        except Exception as err:  # TrainingFailedError: reported with the partial result below
            result, error = None, err
    queue.shutdown()
    if result is None:
        return FitResult(None, None, None, error)
    best_uri, best_metrics = best_checkpoint(result, spec.storage.uri, spec.storage.metric, spec.storage.mode)
    return FitResult(
        best_checkpoint_uri=best_uri,
        best_metrics=best_metrics,
        latest_metrics=result.metrics,
        error=error,
    )


def _invalid_checkpoints(storage_uri: str, latest: Any) -> set[str]:
    """URIs that a restore of this run found corrupt or incomplete (recorded in the latest meta)."""
    if latest is None:
        return set()
    with tempfile.TemporaryDirectory(prefix="tltrain-meta-") as directory:
        local = f"{directory}/{META_FILE}"
        try:
            storage.download_file(f"{checkpoint_uri(storage_uri, latest.path)}/{META_FILE}", local)
            return set(json.loads(Path(local).read_text()).get(INVALID_CHECKPOINTS_KEY, []))
        except Exception as err:  # a missing meta must not fail a finished run; just skip the filter
            log.warning("could not read %s of the latest checkpoint: %s", META_FILE, err)
            return set()


def best_checkpoint(result: Any, storage_uri: str, metric: str, mode: str) -> tuple[str | None, dict[str, Any] | None]:
    """(URI, metrics) of a Train run's best checkpoint by `metric` that is still complete in storage
    (`keep` may have deleted it) and that no restore rejected as corrupt (Ray still ranks those: it
    cannot know that a file changed after the upload). Used by `train` and by each Tune trial."""
    if not result.best_checkpoints:
        return None, None
    invalid = _invalid_checkpoints(storage_uri, result.checkpoint)
    ranked = sorted(
        ((c, m) for c, m in result.best_checkpoints if is_metric_value(m.get(metric))),
        key=lambda cm: cm[1][metric], reverse=mode == "max",
    )
    for ckpt, metrics in ranked:
        uri = checkpoint_uri(storage_uri, ckpt.path)
        if uri not in invalid and storage.exists(f"{uri}/{MANIFEST_FILE}"):
            return uri, metrics
    return None, None
