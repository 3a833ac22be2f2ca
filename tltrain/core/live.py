"""Progress inside an epoch, on rank 0: when a step is worth telling the driver, and what to say.

One epoch of a real dataset on a GPU takes minutes to hours; the epoch line alone leaves the
terminal silent that long. Rank 0 sends a small message through `send` (the worker passes a
non-blocking put into the driver's queue) at every tenth of the epoch, which a log file shows as a
plain line, and every `interval_s` in between, which a terminal uses to refresh one line in place.
The loss is read from the device only when a message goes out: a `.item()` per step would sync the
GPU every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from tltrain.spec.metrics import DATA_WAIT_FRAC, IMG_PER_S

Send = Callable[[dict[str, Any]], None]
INTERVAL_S = 2.0  # a terminal's refresh; the driver prints nothing faster than this
STEP = "step"  # the message kind on the driver's queue


def tenth(step: int, steps: int) -> int:
    """Which tenth of the epoch `step` (1-based) completes: the plain-line rule, one home."""
    return step * 10 // max(steps, 1)


class LiveSteps:
    """Called by the loop after every optimizer step of rank 0; sends when a line is due."""

    def __init__(self, send: Send, world_size: int, interval_s: float = INTERVAL_S) -> None:
        self.send = send
        self.world_size = world_size
        self.interval_s = interval_s
        self.epoch = self.epochs = self.steps = 0
        self._tenth = 0
        self._t0 = self._last = 0.0

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self._tenth = 0
        self._t0 = self._last = time.perf_counter()

    def step(self, step: int, images: int, loss_sum: torch.Tensor, data_wait_s: float) -> None:
        """`step` optimizer steps done in this epoch, this rank's `images`, summed loss and wait."""
        if step >= self.steps:  # the epoch line follows at once
            return
        now = time.perf_counter()
        crossed = tenth(step, self.steps) > self._tenth
        if not crossed and now - self._last < self.interval_s:
            return
        self._tenth = max(self._tenth, tenth(step, self.steps))
        self._last = now
        elapsed = max(now - self._t0, 1e-9)
        try:
            self.send(
                {
                    "kind": STEP,
                    "epoch": self.epoch,
                    "epochs": self.epochs,
                    "step": step,
                    "steps": self.steps,
                    # Every rank runs the same number of steps on the same batch size.
                    IMG_PER_S: images * self.world_size / elapsed,
                    "loss": float(loss_sum) / max(images, 1),
                    DATA_WAIT_FRAC: data_wait_s / elapsed,
                    "elapsed_s": elapsed,
                }
            )
        except Exception:  # noqa: BLE001 - progress must never stop training
            pass
