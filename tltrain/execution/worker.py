"""What runs on every Ray Train worker: build data and model, restore, hand over to `core.loop.train`.

The loop only sees torch.distributed and a `report` callable; this module turns that into
`ray.train.report` with tltrain's own checkpoint upload (manifest last, retried through outages).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from tltrain import __version__, storage
from tltrain.core.checkpoint import (
    CHECKPOINT_PREFIX,
    MANIFEST_FILE,
    CheckpointError,
    CheckpointMeta,
    load_meta,
    load_train_state,
    load_twins,
    sha256_file,
    verify_checkpoint,
)
from tltrain.core.live import LiveSteps
from tltrain.core.loop import Resume, train
from tltrain.core.model import build_model, layer_groups
from tltrain.core.plan import TrainPlan
from tltrain.core.steps import autocast_dtype
from tltrain.data import build_eval_loader, build_target_loader, build_train_loader, build_transform
from tltrain.execution.packing import worker_device
from tltrain.spec.schema import JobSpec

log = logging.getLogger(__name__)


def rebase(samples: Sequence[Sequence[Any]], driver_root: str, local_root: str) -> list[tuple[str, int]]:
    """The driver's absolute paths, moved under this node's copy of the same dataset root."""
    if driver_root == local_root:
        return [(p, int(y)) for p, y in samples]
    return [(str(Path(local_root) / Path(p).relative_to(driver_root)), int(y)) for p, y in samples]


def restore_candidates(latest_uri: str) -> list[str]:
    """The checkpoint to resume from, then the older ones of the same run, newest first.

    Ray names checkpoint folders checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff>, so name order is time
    order; only folders older than Ray's latest are fallbacks (a newer folder is an upload that
    Ray never registered)."""
    run_uri, _, latest_name = latest_uri.rstrip("/").rpartition("/")
    listing = storage.list_files(run_uri, retry_s=storage.OUTAGE_RETRY_S)
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
                storage.download_tree(uri, directory, retry_s=storage.OUTAGE_RETRY_S)
                verify_checkpoint(directory, source=uri)
                meta = load_meta(directory)
                model_state, ema_state = load_twins(directory, meta, source=uri)
                resume = Resume(train_state=load_train_state(directory, source=uri), meta=meta, ema_state=ema_state)
            except CheckpointError as err:
                rejected.append(uri)
                if rank == 0:
                    log.warning("%s; falling back to the previous checkpoint of the run", err)
                continue
            # A shape mismatch here is not damage but a changed spec under the same name: it
            # propagates (an older checkpoint of the run would not fit either).
            if spec.strategy.lora is not None:
                from tltrain.core.lora import load_adapter_state

                load_adapter_state(model, model_state)
            else:
                model.load_state_dict(model_state)
        if rank == 0:
            log.warning(
                "resuming %s from %s (epoch %s, global_step %s)",
                spec.name,
                uri,
                resume.meta.epoch,
                resume.meta.global_step,
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
    storage.OUTAGE_RETRY_S (Ray retries its own copy 3 times within ~3 s, and only for some errors).
    Rank 0 blocks here while the other ranks wait at their next collective, so training resumes
    in step once the store is back."""

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        ray_storage = ray.train.get_context().get_storage()
        fs_path = ray_storage.build_checkpoint_path_from_name(dir_name)
        storage.upload_tree(
            checkpoint.path,
            checkpoint_uri(spec.storage.uri, fs_path),
            last=[MANIFEST_FILE],
            retry_s=storage.OUTAGE_RETRY_S,
        )
        return ray.train.Checkpoint(path=fs_path, filesystem=ray_storage.storage_filesystem)

    return upload


def _quiet_report_logs() -> None:
    """Ray Train logs every report (all metrics) at INFO on every rank, under a logger named by
    the file path of its context module; the driver already prints one line per epoch."""
    origin = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if origin is not None and origin.origin:
        logging.getLogger(origin.origin).setLevel(logging.WARNING)


def _build_loaders(spec: JobSpec, plan: TrainPlan, rank: int, world_size: int, device: torch.device) -> tuple[Any, Any]:
    """This rank's train and val loaders on the spec's data path (plan paths rebased onto this
    node's copy of the data)."""
    autocast = autocast_dtype(spec.loop.precision)
    if spec.data.format == "shards":  # decoded once by `tltrain prepare`; crops on the device
        from tltrain.data.device import build_shard_loaders

        root = storage.localize(spec.data.prepared or "", spec.data.cache_dir)
        return build_shard_loaders(spec, plan, rank, world_size, device, root=root, autocast=autocast)
    train_root = storage.localize(spec.data.train, spec.data.cache_dir)
    val_root = storage.localize(spec.data.val, spec.data.cache_dir) if spec.data.val else train_root
    train_samples = rebase(plan.train, plan.train_root, train_root)
    val_samples = rebase(plan.val, plan.val_root, val_root)
    if spec.data.decode == "nvjpeg":
        from tltrain.data.nvjpeg import build_nvjpeg_loaders

        return build_nvjpeg_loaders(spec, plan, train_samples, val_samples, rank, world_size, device, autocast=autocast)
    batch, workers = spec.scaling.batch_size_per_worker, spec.data.loader_workers
    train_tf = build_transform(plan.data_config, True, spec.data)
    train_loader = build_train_loader(
        train_samples, train_tf, batch, rank, world_size, spec.loop.seed, workers, sampler=spec.data.sampler
    )
    val_loader = build_eval_loader(
        val_samples, build_transform(plan.data_config, False), batch, rank, world_size, workers
    )
    return train_loader, val_loader


def _build_target_loader(spec: JobSpec, plan: TrainPlan, rank: int, world_size: int) -> Any:
    """strategy.domain_adaptation: this rank's target stream (the training augmentation, so the
    alignment compares the two domains under one pipeline and cannot key on augmentation)."""
    if spec.strategy.domain_adaptation is None or spec.data.target_unlabelled is None:
        return None
    target_root = storage.localize(spec.data.target_unlabelled, spec.data.cache_dir)
    target = [p for p, _ in rebase([(p, 0) for p in plan.target], plan.target_root, target_root)]
    train_tf = build_transform(plan.data_config, True, spec.data)
    batch, workers = spec.scaling.batch_size_per_worker, spec.data.loader_workers
    return build_target_loader(target, train_tf, batch, rank, world_size, spec.loop.seed, workers)


def _build_source_val_loader(spec: JobSpec, plan: TrainPlan, rank: int, world_size: int) -> Any:
    """data.source_val_fraction: the source-domain val split held out of data.train (None without)."""
    if not plan.source_val:
        return None
    train_root = storage.localize(spec.data.train, spec.data.cache_dir)
    source_val = rebase(plan.source_val, plan.train_root, train_root)
    eval_tf = build_transform(plan.data_config, False)
    batch, workers = spec.scaling.batch_size_per_worker, spec.data.loader_workers
    return build_eval_loader(source_val, eval_tf, batch, rank, world_size, workers)


def worker_fn(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build data and model, restore, hand over to `loop.train`."""
    started_at = time.perf_counter()  # the first epoch's wall time includes this set-up
    _quiet_report_logs()
    spec = JobSpec.model_validate(config["spec"])
    plan = TrainPlan(**config["plan"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = worker_device()
    torch.manual_seed(spec.loop.seed)

    # A restored run gets its weights from the checkpoint, so the source file is not needed,
    # except under LoRA: its checkpoints hold the adapters and head only, on the source weights
    # (the driver checked they are the ones the checkpoint was trained on).
    needs_source = ray.train.get_checkpoint() is None or spec.strategy.lora is not None
    weights_file = storage.fetch_weights(spec.model.weights, spec.data.cache_dir) if needs_source else None
    model_spec = spec.model if needs_source else spec.model.model_copy(update={"weights": None})
    model = build_model(model_spec, len(plan.class_names), weights_file=weights_file, image_size=spec.data.image_size)
    coarse = spec.strategy.group_granularity == "coarse"
    if spec.strategy.lora is not None:
        from tltrain.core.lora import adapt_model  # peft is imported only by LoRA runs

        # The adapters are a change to exactly the weights the driver hashed: this node's cached
        # copy must be that file (an object replaced in storage meanwhile would not be).
        if weights_file is not None and plan.weights_sha256 and sha256_file(weights_file) != plan.weights_sha256:
            raise RuntimeError(
                f"model.weights {spec.model.weights}: this node's copy ({weights_file}) differs from the file the "
                "driver checked; clear the weights cache (data.cache_dir) on this node"
            )

        groups = adapt_model(model, spec.strategy, coarse)
    else:
        groups = layer_groups(model, coarse=coarse)
    resume, rejected = _restore(model, spec, rank)
    model.to(device)
    train_loader, val_loader = _build_loaders(spec, plan, rank, world_size, device)
    target_loader = _build_target_loader(spec, plan, rank, world_size)
    source_val_loader = _build_source_val_loader(spec, plan, rank, world_size)
    meta = CheckpointMeta(
        spec=spec.to_dict(),
        class_names=plan.class_names,
        model_name=spec.model.name,
        data_config=plan.data_config,
        source_weights_uri=plan.weights_uri,
        source_weights_sha256=plan.weights_sha256,
        dataset_fingerprint=plan.fingerprint,
        layer_groups=plan.layer_group_names,
        tltrain_version=__version__,
        invalid_checkpoints=sorted(set((resume.meta.invalid_checkpoints if resume else []) + rejected)),
    )
    upload = _upload_fn(spec)
    queue = config.get(PROGRESS_QUEUE)  # the driver's (train/compare); Tune trials have none
    # A non-blocking put (one actor round trip, every few seconds at most): never stalls a step.
    live = LiveSteps(functools.partial(queue.put, block=False), world_size) if queue is not None and rank == 0 else None

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_fn=upload)

    train(
        spec,
        model,
        groups,
        train_loader,
        val_loader,
        device=device,
        num_classes=len(plan.class_names),
        report=report,
        meta=meta,
        resume=resume,
        started_at=started_at,
        class_weights=plan.class_weights,
        live=live,
        target_loader=target_loader,
        source_val_loader=source_val_loader,
    )


PROGRESS_QUEUE = "progress_queue"  # the worker config key trainer.fit sets


def checkpoint_uri(storage_uri: str, path: str) -> str:
    """A checkpoint's URI from Ray's filesystem path (no scheme) and the spec's storage URI."""
    return f"s3://{path}" if storage.is_s3(storage_uri) else path
