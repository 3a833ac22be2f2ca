"""The tracker interface without MLflow: what callers get when tracking is off.

Kept apart from tracking.py so that a run with tracking disabled never imports mlflow (GPU images
and slim worker images need not carry it).
"""

from __future__ import annotations

import math
import numbers
from types import TracebackType
from typing import Any, Literal

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]


def is_metric_value(v: Any) -> bool:
    """Whether `log_epoch` records this value (and the learning curves plot it)."""
    # MLflow takes finite numbers only; lists (per-class accuracy) and flags are not metrics.
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


class NullTracker:
    """What open_tracker returns when tracking is off: every method does nothing."""

    run_id: str | None = None

    def log_spec(self, spec_dict: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_epoch(self, metrics: dict[str, Any], step: int) -> None: ...
    def log_final(self, checkpoint_dir: str | None, history: list[dict[str, Any]]) -> None: ...
    def end(self, status: RunStatus = "FINISHED") -> None: ...

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None
