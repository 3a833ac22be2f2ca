"""The `tune.space` of a job spec: parse, validate against the spec and the model, apply to a trial.

No Ray import here (tune.py turns a `Dist` into a Ray Tune domain), so a space is checked before
Ray starts, and the checks are testable without a cluster. Every error is a SpecError naming the
space key.

The distributions themselves (their shape) are in spec/space.py.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from tltrain.spec.bounds import check_freeze_depth
from tltrain.spec.load import parse_spec, set_dotted
from tltrain.spec.schema import JobSpec, SpecError
from tltrain.spec.space import AUTO, Dist, parse_distribution

# Spec paths a search may not vary, and why: they name the sweep's storage and ranking, or are
# fixed by the search itself.
_FIXED = {
    "name": "the sweep's name (each trial gets <name>-<trial_id>)",
    "tune": "the search settings themselves",
    "tracking": "where the sweep logs (one parent run, a child per trial)",
    "storage.uri": "where the sweep and its trials are stored",
    "storage.metric": "trials rank checkpoints by tune.metric",
    "storage.mode": "trials rank checkpoints by tune.mode",
    "scaling.address": "the cluster the sweep runs on",
    "loop.epochs": "ASHA's max_t (every trial's budget); set it in the spec",
    # Keys that change which images validate: trials would be ranked on different sets.
    "data.train": "where the validation images come from (val_fraction splits it); trials must share one val set",
    "data.val": "the validation set; trials must share one to be compared",
    "data.val_fraction": "the validation split; trials must share one val set to be compared",
    # The held-out split: no choice may depend on it, and every trial is scored on the same one.
    "data.test": "the held-out test set: never searched, only reported for the best trial",
    "data.test_fraction": "the held-out test split: never searched, only reported for the best trial",
    "data.tta": "test-time augmentation of the held-out split, which no trial is ranked on",
    "data.split_seed": "the validation split; trials must share one val set to be compared",
}


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):  # Optional[Section]
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _is_mapping(annotation: Any) -> bool:
    return get_origin(annotation) is dict or any(get_origin(a) is dict for a in get_args(annotation))


def check_field_path(key: str) -> None:
    """Raise SpecError unless `key` names a JobSpec field (a leaf, or one key of a dict field such
    as strategy.unfreeze.<epoch>) that a search may vary."""
    for fixed, why in _FIXED.items():
        if key == fixed or key.startswith(fixed + "."):
            raise SpecError(f"tune.space.{key}: cannot be searched: {fixed} is {why}")
    model: type[BaseModel] = JobSpec
    parts = key.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            where = ".".join(parts[:i]) or "the spec"
            raise SpecError(
                f"tune.space.{key}: not a spec field ({where} has no field {part!r}; see `tltrain spec-fields`)"
            )
        sub = _submodel(field.annotation)
        rest = parts[i + 1 :]
        if sub is not None:
            if not rest:
                raise SpecError(f"tune.space.{key}: is a section, not a field; search one of its fields")
            model = sub
            continue
        if _is_mapping(field.annotation) and len(rest) == 1:
            return  # one entry of a mapping field, e.g. strategy.unfreeze.2
        if rest:
            raise SpecError(f"tune.space.{key}: not a spec field ({'.'.join(parts[: i + 1])} has no sub-fields)")
        return


def plain(value: Any) -> Any:
    """numpy scalars (Ray's samplers) -> Python values, so pydantic and JSON accept them."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (list, dict, str)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def apply_config(spec: JobSpec, config: dict[str, Any], **updates: Any) -> JobSpec:
    """The spec of one trial: the sampled values (dotted paths) applied to the sweep's spec, plus
    plain top-level/dotted `updates` (e.g. name, storage.uri). Validated like any spec."""
    tree = copy.deepcopy(spec.to_dict())
    for key, value in {**config, **updates}.items():
        set_dotted(tree, key, plain(value))
    return parse_spec(tree, "(trial)")


def _check_values(spec: JobSpec, key: str, dist: Dist) -> None:
    for value in dist.candidates():
        try:
            apply_config(spec, {key: value})
        except SpecError as err:
            detail = str(err).split("\n", 1)[-1].strip()
            raise SpecError(f"tune.space.{key}: {value!r} is not a valid value ({detail})") from None


def _is_depth_key(key: str) -> bool:
    return key == "strategy.freeze_depth" or key.startswith("strategy.unfreeze.")


# Searching these changes the model's layer groups, so depths are checked against every variant.
_GROUP_KEYS = ("model.name", "strategy.group_granularity")


def _fewest_groups(
    spec: JobSpec, dists: dict[str, Dist], num_layer_groups: int, groups_of: Callable[[JobSpec], int] | None
) -> tuple[int, str]:
    """(layer groups, which model) of the searched model variant with the fewest groups: the depth
    range every trial can take. Without group-changing keys in the space, the spec's own model."""
    varied = {k: d for k, d in dists.items() if k in _GROUP_KEYS}
    if not varied:
        return num_layer_groups, spec.model.name
    if groups_of is None:
        raise SpecError(f"tune.space.{next(iter(varied))}: layer groups of the searched models are unknown")
    fewest: tuple[int, str] | None = None
    for values in itertools.product(*(d.candidates() for d in varied.values())):
        variant = apply_config(spec, dict(zip(varied, values)))
        n = groups_of(variant)
        label = f"{variant.model.name} ({variant.strategy.group_granularity})"
        if fewest is None or n < fewest[0]:
            fewest = (n, label)
    assert fewest is not None
    return fewest


def validate_space(
    spec: JobSpec, num_layer_groups: int, groups_of: Callable[[JobSpec], int] | None = None
) -> dict[str, Dist]:
    """The spec's search space, checked against JobSpec and the model; "auto" resolved.

    Raises SpecError naming the key for: no tune section or an empty space, a key that is not a
    (searchable) spec field, a bad distribution, a value the field rejects, a freeze depth beyond
    the model's `num_layer_groups`, and scheduler settings that cannot work with loop.epochs.
    When the space also searches model.name or strategy.group_granularity, `groups_of(trial spec)`
    counts each variant's groups and depths must fit the variant with the fewest.
    """
    if spec.tune is None:
        raise SpecError("tune: the spec has no tune: section (num_samples, metric, mode, space, ...)")
    tune = spec.tune
    if not tune.space:
        raise SpecError("tune.space: empty; give at least one dotted spec path with a distribution")
    if tune.scheduler.kind == "asha" and tune.scheduler.grace_epochs > spec.loop.epochs:
        raise SpecError(
            f"tune.scheduler.grace_epochs: {tune.scheduler.grace_epochs} is more than loop.epochs={spec.loop.epochs}"
        )
    parsed: dict[str, Dist | str] = {}
    for key, raw in tune.space.items():
        check_field_path(key)
        try:
            dist = parse_distribution(key, raw)
        except ValueError as err:
            raise SpecError(f"tune.space.{err}") from None
        if dist == AUTO and not _is_depth_key(key):
            raise SpecError(
                f'tune.space.{key}: "auto" is only for strategy.freeze_depth (every depth the model allows)'
            )
        if isinstance(dist, Dist):
            _check_values(spec, key, dist)  # before model variants are built from these values
        parsed[key] = dist
    if any(_is_depth_key(k) for k in parsed):
        num_layer_groups, model_label = _fewest_groups(
            spec, {k: d for k, d in parsed.items() if isinstance(d, Dist)}, num_layer_groups, groups_of
        )
    else:
        model_label = spec.model.name
    space: dict[str, Dist] = {}
    for key, dist in parsed.items():
        if dist == AUTO:
            dist = Dist("randint", (0, num_layer_groups)) if num_layer_groups > 0 else Dist("choice", (0,))
        assert isinstance(dist, Dist)
        if key.startswith("strategy.unfreeze."):
            epoch = key.rsplit(".", 1)[1]
            if not epoch.isdigit() or int(epoch) >= spec.loop.epochs:
                raise SpecError(f"tune.space.{key}: {epoch!r} is not an epoch before loop.epochs={spec.loop.epochs}")
        if _is_depth_key(key):
            depths = [v for v in dist.candidates() if v != "all" and isinstance(v, int)]
            for depth in sorted(depths, reverse=True)[:1]:  # the deepest names the problem
                check_freeze_depth(f"tune.space.{key}", depth, num_layer_groups, model_label)
        space[key] = dist
    return space
