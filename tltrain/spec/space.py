"""Search distributions of `tune.space`: their shape only (kind, arity, bounds).

A leaf: no JobSpec import, so the schema can check a space's shape while it parses, and
spec/search.py checks keys and values against the spec.

Distributions (one per dotted spec path):
  choice: [a, b, ...]          any values the field accepts
  randint: [low, high]         integers, BOTH ends inclusive ([0, 6] can draw 0 and 6)
  uniform: [low, high]         floats
  loguniform: [low, high]      floats, 0 < low
  auto                         strategy.freeze_depth / strategy.unfreeze.<epoch> only:
                               every depth the model's layer groups allow, 0..num_layer_groups
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

KINDS = ("choice", "randint", "uniform", "loguniform")


AUTO = "auto"


@dataclass(frozen=True)
class Dist:
    kind: str  # one of KINDS
    args: tuple[Any, ...]  # choice: the values; ranges: (low, high), randint inclusive of high

    def candidates(self) -> list[Any]:
        """Values that stand for the whole distribution when validating against the spec: every
        choice; for a range both ends and a non-integer point inside (catches uniform on an int field)."""
        if self.kind == "choice":
            return list(self.args)
        low, high = self.args
        if self.kind == "randint":
            return [low, high]
        if self.kind == "uniform":
            return [low, high, low + 0.37 * (high - low)]
        return [low, high, math.exp(math.log(low) + 0.37 * (math.log(high) - math.log(low)))]


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def parse_distribution(key: str, raw: Any) -> Dist | str:
    """Check one entry's shape (kind, arity, bounds); returns a Dist or "auto". Raises ValueError
    with a message that starts with the key (config's validator and validate_space both use it)."""
    if raw == AUTO:
        return AUTO
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ValueError(
            f'{key}: expected one distribution, {{choice|randint|uniform|loguniform: [...]}} or "auto", got {raw!r}'
        )
    kind, args = next(iter(raw.items()))
    if kind not in KINDS:
        raise ValueError(f"{key}: unknown distribution {kind!r} (use one of {', '.join(KINDS)})")
    if not isinstance(args, (list, tuple)):
        raise ValueError(f"{key}: {kind} takes a list, e.g. {kind}: {_example(kind)}; got {args!r}")
    if kind == "choice":
        if not args:
            raise ValueError(f"{key}: choice needs at least one value")
        return Dist(kind, tuple(args))
    if len(args) != 2:
        raise ValueError(f"{key}: {kind} takes exactly [low, high], e.g. {kind}: {_example(kind)}; got {list(args)!r}")
    low, high = args
    if kind == "randint":
        if not (isinstance(low, int) and isinstance(high, int)) or isinstance(low, bool) or isinstance(high, bool):
            raise ValueError(f"{key}: randint bounds must be integers, got {list(args)!r}")
    elif not (_is_number(low) and _is_number(high)):
        raise ValueError(f"{key}: {kind} bounds must be numbers, got {list(args)!r}")
    if not low < high:
        raise ValueError(f"{key}: {kind} needs low < high, got [{low}, {high}] (for one value set the field itself)")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{key}: loguniform needs 0 < low, got low={low}")
    if kind != "randint":
        low, high = float(low), float(high)
    return Dist(kind, (low, high))


def _example(kind: str) -> str:
    return {"choice": "[a, b]", "randint": "[0, 6]", "uniform": "[0.5, 1.0]", "loguniform": "[1.0e-5, 1.0e-3]"}[kind]
