"""TrainPlan, what every worker receives, and the model-side checks made before Ray starts.

The driver builds the plan once (execution/preflight.py gathers the data and weights); all ranks then
train on exactly the sample lists, classes and preprocessing that were checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tltrain.core.model import LayerGroup, ModelError, build_model, layer_groups
from tltrain.spec.bounds import check_freeze_depth
from tltrain.spec.schema import JobSpec, SpecError


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
        model = build_model(spec.model.model_copy(update={"weights": None}), num_classes)
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
        )
    except ModelError as err:
        raise SpecError(str(err)) from None
    groups = layer_groups(probe, coarse=spec.strategy.group_granularity == "coarse")
    check_depths(spec, len(groups) - 1)
    return probe, groups
