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
ALIGN_LOSS = "train/align_loss"  # domain adaptation: the epoch's mean alignment loss (MMD, CORAL or DANN)
VAL_LOSS = "val/loss"
VAL_ACC = "val/acc"
VAL_ACC_PER_CLASS = "val/acc_per_class"  # a list: logged with the report, never a ranking key
VAL_COUNT = "val/count"
VAL_F1_MACRO = "val/f1_macro"  # mean over classes of per-class F1 (every class counts the same)
VAL_BALANCED_ACC = "val/balanced_acc"  # mean per-class recall
VAL_TOP5 = "val/top5"  # reported only with >= 5 classes
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
RANKABLE = (
    VAL_ACC,
    VAL_LOSS,
    VAL_F1_MACRO,
    VAL_BALANCED_ACC,
    VAL_TOP5,
    TRAIN_LOSS,
    IMG_PER_S,
    EPOCH_TIME_S,
    DATA_WAIT_FRAC,
)
TOP5_MIN_CLASSES = 5


# Evaluation splits: every evaluation reports <split>/<key> for the keys of core.scores. "val" and
# "test" are the exported weights' numbers; with loop.ema_decay on, "val_raw"/"val_ema" (and
# "test_raw"/"test_ema") are the two twins'.
class Split:
    """The prefix of an evaluation's metric names."""

    VAL = "val"
    TEST = "test"
    SOURCE_VAL = "val_source"  # data.source_val_fraction: a held-out share of the labelled source domain


class Twin:
    """With loop.ema_decay on, a checkpoint holds two sets of weights: the trained ones and their EMA."""

    RAW = "raw"
    EMA = "ema"


EXPORTED = "exported"  # which Twin a checkpoint exports (a string, so never logged as a metric)
TEST_ACC = "test/acc"
TEST_F1_MACRO = "test/f1_macro"
TEST_BALANCED_ACC = "test/balanced_acc"


def split_metric(split: str, name: str) -> str:
    """The name of `name` ("val/acc") in another split or twin ("test" -> "test/acc", "val_ema" ->
    "val_ema/acc")."""
    return f"{split}/{name.split('/', 1)[1]}"


def twin_split(split: str, twin: str) -> str:
    """ "val" + "ema" -> "val_ema": the split prefix of one twin's metrics."""
    return f"{split}_{twin}"


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


def worker_seconds(history: Iterable[dict[str, Any]], num_workers: int) -> float:
    """What a run cost: the wall time its workers were held, epoch by epoch (set-up, training,
    evaluation, checkpoints), times the workers; epoch_time_s (training steps only) for histories
    written before epoch_wall_s existed."""
    return sum(float(h.get(EPOCH_WALL_S, h.get(EPOCH_TIME_S, 0.0))) for h in history) * num_workers
