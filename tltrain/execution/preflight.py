"""Everything that can be checked before Ray reserves a worker: data, model, strategy, weights.

Gathers what the checks need (the dataset scan, through the local cache for s3:// roots; the
weights file) and applies the bounds in spec/bounds.py and core/plan.py. The result, a
`TrainPlan`, is what every worker receives. No Ray here: `tltrain validate` runs this alone.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tltrain import storage
from tltrain.core.checkpoint import (
    CHECKPOINT_PREFIX,
    MANIFEST_FILE,
    META_FILE,
    MODEL_FILE,
    CheckpointMeta,
    load_meta,
    sha256_file,
)
from tltrain.core.optim import apply_freeze, resolve_freeze_depth
from tltrain.core.plan import (
    TrainPlan,
    check_domain_features,
    check_forward,
    check_metrics,
    probe_model,
    resolve_class_weights,
)
from tltrain.data import (
    DataError,
    DatasetPlan,
    UnlabelledIndex,
    hold_out,
    plan_dataset,
    resolve_data_config,
    scan_unlabelled,
)
from tltrain.spec.bounds import check_spec_batch
from tltrain.spec.schema import JobSpec, SpecError, expand_path


def check_weights(spec: JobSpec) -> None:
    """model.weights exists where it says (a local file, an s3:// object), before anything downloads it."""
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


# Schedules whose shape depends on loop.epochs: the LR at a given step moves when the total does.
_TOTAL_DEPENDENT = ("cosine", "linear")


def run_folder(spec: JobSpec) -> str:
    """Where a run's checkpoints, Ray run state and lease live: <storage.uri>/<name>."""
    return f"{spec.storage.uri.rstrip('/')}/{spec.name}"


def _latest_checkpoint_meta(spec: JobSpec) -> tuple[str, CheckpointMeta] | None:
    """(URI, meta) of the newest complete checkpoint of a run of this name, if there is one."""
    run_uri = run_folder(spec)
    if not storage.exists(run_uri):
        return None
    files = set(storage.list_files(run_uri, retry_s=storage.OUTAGE_RETRY_S))
    complete = sorted(
        rel.split("/", 1)[0]
        for rel in files
        if rel.startswith(CHECKPOINT_PREFIX)
        and rel.endswith(f"/{MANIFEST_FILE}")
        and f"{rel.split('/', 1)[0]}/{META_FILE}" in files
    )
    if not complete:
        return None
    uri = f"{run_uri}/{complete[-1]}"
    with tempfile.TemporaryDirectory(prefix="tltrain-meta-") as tmp:
        storage.download_file(f"{uri}/{META_FILE}", f"{tmp}/{META_FILE}")
        return uri, load_meta(tmp)


def _check_resume(spec: JobSpec) -> None:
    """Re-running a name resumes it. A different loop.epochs under a schedule that depends on the
    total would jump the LR (cosine from ~0 back up, with no warmup): refuse, and say how to
    continue from the checkpoint as a new run. Constant schedules extend as they are."""
    found = _latest_checkpoint_meta(spec)
    if found is None:
        return
    uri, meta = found
    old_epochs = int(meta.spec["loop"]["epochs"])
    kind = meta.spec["schedule"]["kind"]
    if old_epochs != spec.loop.epochs and kind in _TOTAL_DEPENDENT:
        raise SpecError(
            f"loop.epochs: {spec.name} exists in storage ({meta.epoch} of {old_epochs} epochs done) with a {kind} "
            f"schedule, whose LR at every step depends on the total; changing it to {spec.loop.epochs} mid-run "
            f"would jump the LR. Keep loop.epochs={old_epochs} to resume, or "
            + (
                f"start a new run: --set name={spec.name}-more (a LoRA checkpoint holds adapters only, so a new run "
                "starts from the source weights again)"
                if meta.lora
                else f"continue from its latest checkpoint as a new run: --set name={spec.name}-more --set "
                f"model.weights={uri}/{MODEL_FILE} (the new run warms up and decays over its own epochs)"
            )
        )
    _check_dann_resume(spec, uri, meta)


def _check_dann_resume(spec: JobSpec, uri: str, meta: CheckpointMeta) -> None:
    """DANN's discriminator lives in the optimizer (its own param group) and in train_state.pt: a
    checkpoint resumes only under the same discriminator, or none (no adaptation, mmd and coral
    hold no extra state and may swap)."""

    def discriminator(da: dict[str, Any]) -> str:
        return f"a {da.get('discriminator_hidden')}-wide DANN discriminator" if da.get("method") == "dann" else "none"

    old = (meta.spec.get("strategy") or {}).get("domain_adaptation") or {}
    new = (spec.to_dict()["strategy"] or {}).get("domain_adaptation") or {}
    if discriminator(old) != discriminator(new):
        raise SpecError(
            f"strategy.domain_adaptation: {spec.name} exists in storage ({uri}) with {old or 'no domain adaptation'}; "
            f"its optimizer state holds {discriminator(old)}, and this spec's needs {discriminator(new)}. Keep "
            f"strategy.domain_adaptation as it was to resume, or start a new run: --set name={spec.name}-v2"
        )


def scan_dataset(spec: JobSpec) -> DatasetPlan:
    """The data scan and seeded split every run uses (remote roots through the local cache)."""
    try:
        return plan_dataset(spec.data, spec.data.split_seed, storage.localizer(spec.data.cache_dir))
    except DataError as err:
        raise SpecError(str(err)) from None


def build_plan(spec: JobSpec) -> TrainPlan:
    """Validate the spec against the real data and model. Raises SpecError naming the field or
    file; writes nothing but the local dataset and weights caches."""
    check_weights(spec)
    _check_storage(spec)
    _check_resume(spec)
    dataset = scan_dataset(spec)
    check_spec_batch(len(dataset.train), spec)
    check_metrics(spec, len(dataset.class_names))
    class_weights = resolve_class_weights(spec, dataset.class_names, [y for _, y in dataset.train])
    local_weights = storage.fetch_weights(spec.model.weights, spec.data.cache_dir)
    weights_sha = sha256_file(local_weights) if local_weights is not None else None
    probe, groups = probe_model(spec, len(dataset.class_names), local_weights)
    data_config = resolve_data_config(probe, spec.data.image_size, model_name=spec.model.name)
    params = dict(probe.named_parameters())  # before adapters: the groups' sizes are the model's
    group_params = [sum(params[n].numel() for n in g.param_names) for g in groups]
    check_forward(spec, probe, int(data_config["input_size"][-1]))  # first: a size the model refuses names the field
    lora_modules = _check_lora(spec, probe, int(data_config["input_size"][-1]))
    _check_lora_resume(spec, weights_sha)
    check_domain_features(spec, probe, int(data_config["input_size"][-1]))
    target = _scan_target(spec)
    source_val: list[tuple[str, int]] = []
    train = [(p, y) for p, y in dataset.train]
    fingerprint = dict(dataset.fingerprint)
    if target is not None:
        fingerprint["target_unlabelled"] = target.fingerprint  # lineage of the target images too
    if spec.data.source_val_fraction is not None:
        source_val, train = hold_out(train, dataset.class_names, spec.data.source_val_fraction,
                                     spec.data.split_seed, "source_val")  # fmt: skip
        check_spec_batch(len(train), spec)
    if not lora_modules:
        apply_freeze(probe, groups, resolve_freeze_depth(spec.strategy.freeze_depth, groups))
    return TrainPlan(
        class_names=dataset.class_names,
        train=train,
        val=[(p, y) for p, y in dataset.val],
        train_root=dataset.train_root,
        val_root=dataset.val_root,
        data_config=data_config,
        num_layer_groups=len(groups) - 1,
        layer_group_names=[g.name for g in groups],
        layer_group_params=group_params,
        weights_uri=spec.model.weights,
        weights_sha256=weights_sha,
        fingerprint=fingerprint,
        skipped=dataset.skipped + (target.skipped if target is not None else []),
        test=[(p, y) for p, y in dataset.test],
        test_root=dataset.test_root,
        class_weights=class_weights,
        total_params=sum(p.numel() for p in probe.parameters()),
        trainable_params=sum(p.numel() for p in probe.parameters() if p.requires_grad),
        lora_modules=lora_modules,
        target=target.paths if target is not None else [],
        target_root=target.root if target is not None else "",
        source_val=source_val,
    )


def _scan_target(spec: JobSpec) -> UnlabelledIndex | None:
    """data.target_unlabelled scanned like the training images (each file checked, data.on_bad_image
    applies), with enough images for one full batch on every worker (drop_last, as the labelled
    loader: the all-gathers of MMD / CORAL need equal shapes on every rank)."""
    if spec.data.target_unlabelled is None:
        return None
    try:
        target = scan_unlabelled(spec.data.target_unlabelled, spec.data.on_bad_image,
                                 localize=storage.localizer(spec.data.cache_dir))  # fmt: skip
    except DataError as err:
        raise SpecError(str(err)) from None
    need = spec.scaling.batch_size_per_worker * spec.scaling.num_workers
    if len(target.paths) < need:
        raise SpecError(
            f"data.target_unlabelled: {len(target.paths)} readable images under {spec.data.target_unlabelled}, and "
            f"one target batch per worker needs {need} (scaling.batch_size_per_worker x scaling.num_workers); add "
            "images or lower the batch"
        )
    return target


# What decides which tensors a LoRA checkpoint holds: a resume must keep every one of these.
LORA_LAYOUT_FIELDS = ("model.name", "strategy.freeze_depth", "strategy.group_granularity", "strategy.lora")


def _check_lora_resume(spec: JobSpec, weights_sha: str | None) -> None:
    """Re-running a name whose checkpoints are LoRA's (or are not, when the spec now asks for LoRA):
    the checkpoint fits only the same adapter layout on the same source weights."""
    found = _latest_checkpoint_meta(spec)
    if found is None:
        return
    uri, meta = found
    before, now = meta.lora, spec.strategy.lora
    if before is None and now is None:
        return
    tree = spec.to_dict()
    for field in LORA_LAYOUT_FIELDS:
        section, key = field.split(".")
        old, new = (meta.spec.get(section) or {}).get(key), tree[section][key]
        if old != new:
            raise SpecError(
                f"{field}: {spec.name} exists in storage with {field}={old!r} ({uri}); its checkpoints hold "
                f"{'LoRA adapters for that layout' if before else 'full weights, not LoRA adapters'}. Keep {old!r} "
                f"to resume, or start a new run: --set name={spec.name}-v2"
            )
    if meta.source_weights_sha256 != weights_sha:
        raise SpecError(
            f"model.weights: {spec.name}'s LoRA checkpoints ({uri}) hold adapters on weights with sha256 "
            f"{meta.source_weights_sha256}, and {spec.model.weights} now hashes to {weights_sha}; restore that "
            f"file to resume, or start a new run: --set name={spec.name}-v2"
        )


def _check_lora(spec: JobSpec, probe: nn.Module, image_size: int) -> int:
    """strategy.lora on the driver's probe model: the targets must match adaptable layers above the
    freeze depth that the forward really calls. Adapts `probe` in place; returns how many layers
    got adapters (0 without LoRA)."""
    lora = spec.strategy.lora
    if lora is None:
        return 0
    if spec.model.weights is None:
        raise SpecError(
            "strategy.lora: adapters learn a change to pretrained weights, and model.weights is null (random init); "
            "set model.weights, or drop strategy.lora for training from scratch"
        )
    from tltrain.core.lora import LoraError, adapt_model, adapted_layers, check_adapters_used

    try:
        adapt_model(probe, spec.strategy, spec.strategy.group_granularity == "coarse")
        check_adapters_used(probe, torch.randn(1, 3, image_size, image_size))
    except LoraError as err:
        raise SpecError(str(err)) from None
    return len(adapted_layers(probe))
