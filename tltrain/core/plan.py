"""TrainPlan, what every worker receives, and the model-side checks made before Ray starts.

The driver builds the plan once (execution/preflight.py gathers the data and weights); all ranks then
train on exactly the sample lists, classes and preprocessing that were checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tltrain.core.domain import pooled_features_error
from tltrain.core.model import LayerGroup, ModelError, build_model, layer_groups
from tltrain.spec.bounds import check_freeze_depth
from tltrain.spec.metrics import TOP5_MIN_CLASSES, VAL_TOP5
from tltrain.spec.schema import TORCHVISION_PREFIX, JobSpec, SpecError


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
    layer_group_params: list[int]  # parameters per group, same order
    weights_uri: str | None
    weights_sha256: str | None
    fingerprint: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # The held-out test split (data.test or data.test_fraction): evaluated once, after training,
    # on the selected checkpoint; no worker of the training run ever reads it.
    test: list[tuple[str, int]] = field(default_factory=list)
    test_root: str = ""
    class_weights: list[float] | None = None  # loop.class_weights resolved per label; None = all 1
    total_params: int = 0  # the model's parameters (with adapters under LoRA)
    trainable_params: int = 0  # of those, trained at the start (after freeze_depth, LoRA)
    lora_modules: int = 0  # layers given adapters (strategy.lora); 0 = no LoRA
    # strategy.domain_adaptation: data.target_unlabelled's images (the driver's paths under
    # target_root) and the source-domain val split held out of data.train (data.source_val_fraction).
    target: list[str] = field(default_factory=list)
    target_root: str = ""
    source_val: list[tuple[str, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_depths(spec: JobSpec, num_groups: int) -> None:
    """strategy.freeze_depth and every strategy.unfreeze entry against the model's layer groups."""
    check_freeze_depth("strategy.freeze_depth", spec.strategy.freeze_depth, num_groups, spec.model.name)
    for epoch, depth in spec.strategy.unfreeze.items():
        check_freeze_depth(f"strategy.unfreeze.{epoch}", depth, num_groups, spec.model.name)
        if epoch >= spec.loop.epochs:
            raise SpecError(f"strategy.unfreeze.{epoch}: epoch {epoch} is past loop.epochs={spec.loop.epochs}")


def count_layer_groups(spec: JobSpec, num_classes: int) -> int:
    """Backbone layer groups (the head not counted) of the spec's model, built without weights:
    for checking freeze depths of searched model variants."""
    try:
        model = build_model(
            spec.model.model_copy(update={"weights": None}), num_classes, image_size=spec.data.image_size
        )
    except ModelError as err:
        raise SpecError(str(err)) from None
    return len(layer_groups(model, coarse=spec.strategy.group_granularity == "coarse")) - 1


def probe_model(spec: JobSpec, num_classes: int, weights_file: Path | None) -> tuple[nn.Module, list[LayerGroup]]:
    """The spec's model with its source weights loaded (catches a wrong or mis-named weights file
    before Ray starts) and its layer groups, the spec's freeze depths checked against them. Hub
    weights are not needed to count groups or resolve preprocessing."""
    try:
        probe = build_model(
            spec.model.model_copy(update={"weights": None if spec.model.weights == "hub" else spec.model.weights}),
            num_classes,
            weights_file=weights_file,
            image_size=spec.data.image_size,
        )
        groups = layer_groups(probe, coarse=spec.strategy.group_granularity == "coarse")
    except ModelError as err:
        raise SpecError(str(err)) from None
    except (AssertionError, RuntimeError, ValueError) as err:  # an architecture refusing the size
        if spec.data.image_size is None:
            raise
        raise SpecError(
            f"data.image_size: {spec.model.name} cannot be built for {spec.data.image_size}x{spec.data.image_size} "
            f"({_first_line(err)}); use a size the architecture supports (ViTs: a multiple of the patch size)"
        ) from None
    check_depths(spec, len(groups) - 1)
    check_batch_norm_batch(spec, probe, groups)
    return probe, groups


def check_forward(spec: JobSpec, model: nn.Module, image_size: int) -> None:
    """One forward and backward pass of a 2-image batch at the run's resolution, on the driver's CPU:
    a size the architecture cannot take fails here, naming the field, not in every worker."""
    was_training = model.training
    model.train()
    try:
        x = torch.randn(2, 3, image_size, image_size)
        out = model(x)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    except Exception as err:  # shape errors come as RuntimeError, AssertionError, ValueError...
        raise SpecError(
            f"data.image_size: {spec.model.name} cannot train at {image_size}x{image_size} ({_first_line(err)}); "
            "use a size the architecture supports (ViTs: a multiple of the patch size; windowed models: of "
            "patch x window)"
        ) from None
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _min_freeze_depth(spec: JobSpec, num_groups: int) -> int:
    depths = [spec.strategy.freeze_depth, *spec.strategy.unfreeze.values()]
    return min(num_groups if d == "all" else int(d) for d in depths)


def check_batch_norm_batch(spec: JobSpec, model: nn.Module, groups: list[LayerGroup]) -> None:
    """BatchNorm in training mode needs more than one value per channel: a micro-batch of one image
    on a trainable BatchNorm layer fails in every worker. Frozen groups keep their norms in eval."""
    if spec.scaling.batch_size_per_worker > 1:
        return
    trainable = {n for g in groups[_min_freeze_depth(spec, len(groups) - 1) :] for n in g.param_names}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
            f"{name}.{p}" in trainable for p, _ in module.named_parameters()
        ):
            raise SpecError(
                f"scaling.batch_size_per_worker: 1 image per micro-batch cannot train {spec.model.name}'s "
                f"BatchNorm layers ({name} is in a trainable group): use 2 or more, or freeze those groups"
            )


def resolve_class_weights(spec: JobSpec, class_names: list[str], train_labels: list[int]) -> list[float] | None:
    """loop.class_weights per label. "balanced" is scikit-learn's: n_images / (n_classes x
    n_images_of_class), from the train split (so the weighted class frequencies are equal and
    their mean weight per image is 1). A dict names classes; an unknown name is refused."""
    given = spec.loop.class_weights
    if given is None:
        return None
    if given == "balanced":
        counts = [0] * len(class_names)
        for label in train_labels:
            counts[label] += 1
        total = len(train_labels)
        return [total / (len(class_names) * c) for c in counts]
    unknown = sorted(set(given) - set(class_names))
    if unknown:
        raise SpecError(
            f"loop.class_weights: {unknown} are not classes of data.train (its class folders: "
            f"{', '.join(class_names[:20])}{', ...' if len(class_names) > 20 else ''})"
        )
    return [float(given.get(name, 1.0)) for name in class_names]


def check_metrics(spec: JobSpec, num_classes: int) -> None:
    """val/top5 exists only with >= 5 classes: refuse ranking or searching by it below that."""
    if num_classes >= TOP5_MIN_CLASSES:
        return
    for field_name, metric in (
        ("storage.metric", spec.storage.metric),
        ("tune.metric", spec.tune and spec.tune.metric),
    ):
        if metric == VAL_TOP5:
            raise SpecError(
                f"{field_name}: {VAL_TOP5} needs at least {TOP5_MIN_CLASSES} classes (data.train has {num_classes}); "
                "use val/acc or val/f1_macro"
            )


def check_domain_features(spec: JobSpec, model: nn.Module, image_size: int) -> None:
    """strategy.domain_adaptation aligns the pooled features the classifier reads: the model must
    expose them the timm way (forward_features -> forward_head(pre_logits=True) -> classifier)."""
    if spec.strategy.domain_adaptation is None:
        return
    reason = (
        "torchvision models have no forward_features / forward_head"
        if spec.model.name.startswith(TORCHVISION_PREFIX)
        else pooled_features_error(model, image_size)
    )
    if reason is not None:
        raise SpecError(
            f"strategy.domain_adaptation: the pooled features of {spec.model.name} cannot be reached ({reason}); "
            "use a timm model (e.g. resnet50, vit_small_patch16_224), or drop strategy.domain_adaptation"
        )
