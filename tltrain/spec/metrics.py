"""Metric names, and the one rule for "is this value better".

The only module where metric names are written out (tests/test_layout.py greps the package for
their literals): the loop reports under these names, checkpoints and trials are ranked by them,
MLflow logs them, and the spec's `storage.metric` / `tune.metric` are checked against them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

Mode = Literal["max", "min"]

# Reported by the loop every epoch (all ranks agree on them: sums are all-reduced).
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"
VAL_ACC_PER_CLASS = "val/acc_per_class"  # a list: logged with the report, never a ranking key
VAL_COUNT = "val/count"
IMG_PER_S = "img_per_s"
EPOCH_TIME_S = "epoch_time_s"  # the training steps alone
EPOCH_WALL_S = "epoch_wall_s"  # wall time between reports: set-up, training, eval, checkpoint, upload
DATA_WAIT_FRAC = "data_wait_frac"
LR_PREFIX = "lr/"  # lr/<layer group>: the live LR of each optimizer param group

# Written once at the end of a run from the best checkpoint's confusion matrix.
BEST_ACC = "best/acc"
BEST_F1_MACRO = "best/f1_macro"
BEST_PREFIX = "best/"

# What a checkpoint (storage.metric), early stopping and a search (tune.metric) can rank by: numbers
# every epoch's report carries. Tune stops the whole search at the first result that lacks its
# metric, so the spec is checked against this list before anything starts.
RANKABLE = (VAL_ACC, VAL_LOSS, TRAIN_LOSS, IMG_PER_S, EPOCH_TIME_S, DATA_WAIT_FRAC)

T = TypeVar("T")


def check_rankable(metric: str) -> str:
    """`metric` if a run reports it every epoch, else ValueError naming the choices (the schema's
    validators turn it into an error naming the field)."""
    if metric not in RANKABLE:
        raise ValueError(f"{metric!r} is not a reported metric (use one of {', '.join(RANKABLE)})")
    return metric


def is_metric_value(v: Any) -> bool:
    """Whether a value is a loggable metric: a finite number (MLflow takes nothing else; lists such
    as per-class accuracy and flags are not metrics), and so one that can be ranked."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def better(value: float, best: float | None, mode: str) -> bool:
    """Whether `value` beats `best` under `mode` ("max" or "min"); anything beats no best yet."""
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def ranked(items: Iterable[T], value: Callable[[T], Any], mode: str) -> list[T]:
    """`items` whose value is a metric value, best first under `mode` (ties keep their order)."""
    scored = [it for it in items if is_metric_value(value(it))]
    return sorted(scored, key=lambda it: float(value(it)), reverse=mode == "max")
