"""Bounds that need a count from the data or the model (the schema checks everything else).

Each rule has this one home; preflight applies them before Ray starts, the search checks its space
with them, and the loop re-checks the batch bound on what its loader really holds.
"""

from __future__ import annotations

from tltrain.spec.schema import FreezeDepth, JobSpec, SpecError


def check_freeze_depth(field: str, depth: FreezeDepth, num_groups: int, model: str) -> None:
    """A freeze depth is 0..num_groups (backbone layer groups; the head is never frozen) or "all"."""
    if depth != "all" and not 0 <= depth <= num_groups:
        raise SpecError(
            f"{field}: depth {depth} is beyond {model}'s {num_groups} layer groups "
            f'(use 0..{num_groups}, or "all" for feature extraction)'
        )


def check_batch(num_train_images: int, num_workers: int, batch_size_per_worker: int, grad_accum: int = 1) -> None:
    """Every worker needs at least one full optimizer step per epoch: batch_size_per_worker x
    grad_accum images of its own (loaders drop the short tail so all ranks step together)."""
    per_worker = num_train_images // num_workers
    needed = batch_size_per_worker * grad_accum
    if per_worker < needed:
        raise SpecError(
            f"scaling.batch_size_per_worker: {num_workers} worker(s) x {batch_size_per_worker} x loop.grad_accum "
            f"{grad_accum} needs {needed} training images per worker, the data has {per_worker}: lower the batch "
            "size or the workers"
        )


def check_spec_batch(num_train_images: int, spec: JobSpec) -> None:
    """check_batch with the spec's workers, batch size and accumulation."""
    check_batch(num_train_images, spec.scaling.num_workers, spec.scaling.batch_size_per_worker, spec.loop.grad_accum)
