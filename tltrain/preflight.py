"""Everything that can be checked before Ray reserves a worker: data, model, strategy, weights.

The result, a `TrainPlan`, is what every worker receives, so all ranks train on exactly the sample
lists, classes and preprocessing the driver checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tltrain import storage
from tltrain.config import JobSpec, SpecError, expand_path
from tltrain.data import DataError, plan_dataset, resolve_data_config


@dataclass
class TrainPlan:
    class_names: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    train_root: str  # the driver's local root of data.train (workers rebase paths on their own)
    val_root: str
    data_config: dict[str, Any]
    num_layer_groups: int  # backbone groups (the head not counted)
    layer_group_names: list[str]
    weights_uri: str | None
    weights_sha256: str | None
    fingerprint: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weights_cache_path(uri: str, cache_dir: str) -> Path:
    from tltrain.data import cache_dir_for

    return Path(cache_dir_for(uri, cache_dir)) / Path(storage.split_s3(uri)[1]).name


def fetch_weights(uri: str | None, cache_dir: str) -> Path | None:
    """Local file of model.weights (downloaded once per node for s3:// URIs); None for hub/none."""
    if uri is None or uri == "hub":
        return None
    if storage.is_s3(uri):
        local = weights_cache_path(uri, cache_dir)
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            storage.download_file(uri, str(local))
        return local
    return Path(expand_path(uri))


def _check_weights(spec: JobSpec) -> None:
    uri = spec.model.weights
    if uri is None or uri == "hub":
        return
    if storage.is_s3(uri):
        if not storage.exists(uri):
            raise SpecError(f"model.weights: {uri} does not exist (check the bucket, key and AWS_ENDPOINT_URL)")
    elif not Path(expand_path(uri)).is_file():
        raise SpecError(f"model.weights: no file at {uri} (a local path, an s3:// URI, \"hub\" or null)")


def _check_depths(spec: JobSpec, num_groups: int) -> None:
    depths = {"strategy.freeze_depth": spec.strategy.freeze_depth}
    depths.update({f"strategy.unfreeze.{e}": d for e, d in spec.strategy.unfreeze.items()})
    for field_name, depth in depths.items():
        if depth != "all" and depth > num_groups:
            raise SpecError(
                f"{field_name}: {depth} is beyond {spec.model.name}'s {num_groups} layer groups "
                f'(use 0..{num_groups}, or "all" for feature extraction)'
            )
    for epoch in spec.strategy.unfreeze:
        if epoch >= spec.loop.epochs:
            raise SpecError(f"strategy.unfreeze.{epoch}: epoch {epoch} is past loop.epochs={spec.loop.epochs}")


def _check_tracking_storage(spec: JobSpec) -> None:
    if storage.is_s3(spec.storage.uri):
        bucket = "s3://" + storage.split_s3(spec.storage.uri)[0]
        if not storage.exists(bucket):
            raise SpecError(f"storage.uri: bucket {bucket} does not exist or is not reachable")


def _check_batch(spec: JobSpec, num_train: int) -> None:
    per_worker = num_train // spec.scaling.num_workers
    needed = spec.scaling.batch_size_per_worker * spec.loop.grad_accum
    if per_worker < needed:
        raise SpecError(
            f"scaling.batch_size_per_worker: {spec.scaling.num_workers} worker(s) x "
            f"{spec.scaling.batch_size_per_worker} x loop.grad_accum {spec.loop.grad_accum} needs {needed} "
            f"training images per worker, the data has {per_worker}: lower the batch size or the workers"
        )


def count_layer_groups(spec: JobSpec, num_classes: int) -> int:
    """Backbone layer groups (the head not counted) of the spec's model, built without weights:
    for checking freeze depths of searched model variants."""
    from tltrain.model import ModelError, build_model, layer_groups

    try:
        model = build_model(spec.model.model_copy(update={"weights": None}), num_classes)
    except ModelError as err:
        raise SpecError(str(err)) from None
    return len(layer_groups(model, coarse=spec.strategy.group_granularity == "coarse")) - 1


def build_plan(spec: JobSpec) -> TrainPlan:
    """Validate the spec against the real data and model. Raises SpecError / DataError naming the
    field or file; writes nothing but the local dataset cache."""
    from tltrain.model import ModelError, build_model, layer_groups

    _check_weights(spec)
    _check_tracking_storage(spec)
    try:
        dataset = plan_dataset(spec.data, spec.loop.seed)
    except DataError as err:
        raise SpecError(str(err)) from None
    _check_batch(spec, len(dataset.train))
    local_weights = fetch_weights(spec.model.weights, spec.data.cache_dir)
    weights_sha = storage.sha256_file(str(local_weights)) if local_weights is not None else None
    try:
        # Loading the file here catches a wrong or mis-named weights file before Ray starts; hub
        # weights are not needed to count groups or resolve preprocessing.
        probe = build_model(
            spec.model.model_copy(update={"weights": None if spec.model.weights == "hub" else spec.model.weights}),
            len(dataset.class_names),
            weights_file=local_weights,
        )
    except ModelError as err:
        raise SpecError(str(err)) from None
    groups = layer_groups(probe, coarse=spec.strategy.group_granularity == "coarse")
    _check_depths(spec, len(groups) - 1)
    return TrainPlan(
        class_names=dataset.class_names,
        train=[(p, y) for p, y in dataset.train],
        val=[(p, y) for p, y in dataset.val],
        train_root=dataset.train_root,
        val_root=dataset.val_root,
        data_config=resolve_data_config(probe, spec.data.image_size),
        num_layer_groups=len(groups) - 1,
        layer_group_names=[g.name for g in groups],
        weights_uri=spec.model.weights,
        weights_sha256=weights_sha,
        fingerprint=dataset.fingerprint,
        skipped=dataset.skipped,
    )
