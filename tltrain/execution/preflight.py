"""Everything that can be checked before Ray reserves a worker: data, model, strategy, weights.

Gathers what the checks need (the dataset scan, through the local cache for s3:// roots; the
weights file) and applies the bounds in spec/bounds.py and core/plan.py. The result, a
`TrainPlan`, is what every worker receives. No Ray here: `tltrain validate` runs this alone.
"""

from __future__ import annotations

from pathlib import Path

from tltrain import storage
from tltrain.core.checkpoint import sha256_file
from tltrain.core.plan import TrainPlan, probe_model
from tltrain.data import DataError, plan_dataset, resolve_data_config
from tltrain.spec.bounds import check_spec_batch
from tltrain.spec.schema import JobSpec, SpecError, expand_path


def _check_weights(spec: JobSpec) -> None:
    uri = spec.model.weights
    if uri is None or uri == "hub":
        return
    if storage.is_s3(uri):
        if not storage.exists(uri):
            raise SpecError(f"model.weights: {uri} does not exist (check the bucket, key and AWS_ENDPOINT_URL)")
    elif not Path(expand_path(uri)).is_file():
        raise SpecError(f'model.weights: no file at {uri} (a local path, an s3:// URI, "hub" or null)')


def _check_storage(spec: JobSpec) -> None:
    if storage.is_s3(spec.storage.uri):
        bucket = "s3://" + storage.split_s3(spec.storage.uri)[0]
        if not storage.exists(bucket):
            raise SpecError(f"storage.uri: bucket {bucket} does not exist or is not reachable")


def build_plan(spec: JobSpec) -> TrainPlan:
    """Validate the spec against the real data and model. Raises SpecError naming the field or
    file; writes nothing but the local dataset and weights caches."""
    _check_weights(spec)
    _check_storage(spec)
    try:
        dataset = plan_dataset(spec.data, spec.loop.seed, storage.localizer(spec.data.cache_dir))
    except DataError as err:
        raise SpecError(str(err)) from None
    check_spec_batch(len(dataset.train), spec)
    local_weights = storage.fetch_weights(spec.model.weights, spec.data.cache_dir)
    weights_sha = sha256_file(local_weights) if local_weights is not None else None
    probe, groups = probe_model(spec, len(dataset.class_names), local_weights)
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
