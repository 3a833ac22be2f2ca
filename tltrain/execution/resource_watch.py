"""Say so when a run or sweep waits for resources instead of retrying silently.

Ray Train asks for each worker group as one placement group; when the cluster cannot place it
(another job holds the CPUs/GPUs, the spec asks for more than any node has, an autoscaler is slow)
the group stays PENDING and Ray Train times the start out and retries, with nothing on the
terminal. `ResourceWatch` polls the placement-group table from the driver and, once a group has
been pending for `WAIT_WARN_S` (across Ray Train's retries), prints what it asks for, what the cluster has free, and which
placement groups hold the rest; then again at most every `REPEAT_S` while something still waits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO

import ray

WAIT_WARN_S = 30.0  # a placement group pending this long gets a line on the terminal
REPEAT_S = 120.0  # while anything still waits, at most one line per this many seconds
_POLL_S = 2.0
_WAITING = ("PENDING", "RESCHEDULING")


def _schedulable(amounts: Mapping[str, float]) -> dict[str, float]:
    """The resources a user asks for (CPU, GPU, custom), without memory, node and per-group keys."""
    shown = {k: v for k, v in amounts.items() if not k.startswith(("node:", "memory", "object_store_memory"))}
    return {k: v for k, v in shown.items() if "_group_" not in k and v > 0}


def _resources(amounts: Mapping[str, float]) -> str:
    """{CPU: 2.0, memory: ..., node:...} -> "CPU 2"."""
    return ", ".join(f"{k} {v:g}" for k, v in sorted(_schedulable(amounts).items())) or "nothing schedulable"


def _total(bundles: Mapping[Any, Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for bundle in bundles.values():
        for key, value in bundle.items():
            out[key] = out.get(key, 0.0) + float(value)
    return out


def describe_wait(pg: Mapping[str, Any], waited_s: float, table: Mapping[str, Mapping[str, Any]],
                  free: Mapping[str, float], total: Mapping[str, float]) -> str:  # fmt: skip
    """The line printed for a placement group that has waited `waited_s`."""
    bundles = pg.get("bundles") or {}
    # Groups that hold CPUs/GPUs (not Tune's own zero-CPU trial reservations).
    holders = [p for p in table.values() if p.get("state") == "CREATED" and _schedulable(_total(p["bundles"]))]
    held = "; ".join(
        f"{p['placement_group_id'][:8]}{' ' + p['name'] if p.get('name') else ''}: {_resources(_total(p['bundles']))}"
        for p in holders[:6]
    )
    return (
        f"waiting {waited_s:.0f}s for resources: placement group {pg['placement_group_id'][:8]} "
        f"({pg.get('strategy', '?')}) asks for {len(bundles)} bundle(s), {_resources(_total(bundles))} in all; "
        f"the cluster has {_resources(free) if _schedulable(free) else 'none'} free of {_resources(total)}"
        + (f"; held by {len(holders)} placement group(s): {held}" if holders else "")
        + ". Free them (another job, a notebook), add nodes, or ask for less (scaling.num_workers, "
        "scaling.cpus_per_worker, tune.max_concurrent_trials)"
    )


class ResourceWatch:
    """`with ResourceWatch(out):` around a Ray Train fit or a Tune run, on the driver."""

    def __init__(self, out: TextIO, warn_after_s: float = WAIT_WARN_S, poll_s: float = _POLL_S) -> None:
        self.out, self.warn_after_s, self.poll_s = out, warn_after_s, poll_s
        self._first_seen: dict[str, float] = {}
        self._waiting_since: float | None = None
        self._last_line = -float("inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lines: list[str] = []

    def check(self, now: float) -> None:
        if not ray.is_initialized():
            return
        try:
            table = ray.util.placement_group_table()
        except Exception:  # noqa: BLE001  # the driver is shutting down, or the GCS is briefly away
            return
        waiting = {pg_id: pg for pg_id, pg in table.items() if pg.get("state") in _WAITING}
        if not waiting:
            self._waiting_since = None
            return
        # Since when something has waited without a break: Ray Train times a worker group's start
        # out (60 s) and asks again with a new placement group, which must not restart the clock.
        if self._waiting_since is None:
            self._waiting_since = now
        self._first_seen = {pg_id: self._first_seen.get(pg_id, now) for pg_id in waiting}
        waited = now - self._waiting_since
        if waited < self.warn_after_s or now - self._last_line < REPEAT_S:
            return
        pg = waiting[min(waiting, key=lambda pg_id: self._first_seen[pg_id])]
        line = describe_wait(pg, waited, table, ray.available_resources(), ray.cluster_resources())
        self._last_line = now
        self.lines.append(line)
        print(line, file=self.out, flush=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check(time.monotonic())

    def __enter__(self) -> ResourceWatch:
        self._thread = threading.Thread(target=self._loop, name="resource-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
