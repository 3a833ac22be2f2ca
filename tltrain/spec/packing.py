"""Sharing one GPU between small trials: the arithmetic only (no Ray, no torch), so it is tested directly.

A 1-worker trial can ask Ray for a fraction of a GPU (`scaling.gpus_per_worker`, or 1/k with
`tune.trials_per_gpu: k`); Ray then places up to k such trials on each GPU. With `trials_per_gpu:
auto`, execution/packing.py measures one trial's peak memory on a GPU and `trials_per_gpu_for`
turns it into k. The schema (bounds of the two fields), the trainer (the worker's Ray resources)
and the sweep (how many trials run at once) all take their numbers from here.
"""

from __future__ import annotations

import math

# Ray accounts resources in units of 0.0001 (ray._private.ray_constants.MIN_RESOURCE_GRANULARITY;
# a test checks the two agree): a smaller GPU share cannot be asked for.
GPU_GRANULARITY = 0.0001
# The share of a GPU's memory that packed trials may plan to use together (the bound): the
# rest is headroom for what one training step does not show (the driver of a sweep, NCCL/cuDNN
# buffers created later, another process on the device).
GPU_MEMORY_SHARE = 0.90
# A measured peak is multiplied by this before packing, because one measured step under-counts a
# trial: the caching allocator holds more than it hands out (reserved runs ~5-20 % over allocated
# once shapes vary), cuDNN's autotuner tries algorithms with larger workspaces in later steps, and
# the evaluation pass and the checkpoint's state_dict copy allocate beside the training state.
MEMORY_SAFETY = 1.25
# `auto` packs at most this many trials on one GPU. Trials are separate processes whose CUDA
# contexts time-slice the GPU (no MPS): past a handful the device is busy and more trials only
# stretch each one (ASHA waits longer for its rungs), and each trial also needs its own CPUs for
# data loading. 8 is the point the GPU measurement of the issue checks (8 EfficientNet-Lite0 trials
# on one GPU); raise it only with a measurement that shows more trials per hour.
MAX_AUTO_TRIALS_PER_GPU = 8
# An explicit `tune.trials_per_gpu` may go up to this: for every k up to here, the share
# `gpu_fraction(k)` lets exactly k trials onto a GPU whether Ray rounds or truncates it to its
# units (from k = 88 on, a truncated share would let k + 1 fit).
MAX_TRIALS_PER_GPU = 64


def gpu_fraction(trials_per_gpu: int) -> float:
    """The GPU share of one trial when `trials_per_gpu` trials share a GPU: 1/k rounded down to
    Ray's granularity, so k of them fit in one GPU and k + 1 do not."""
    if not 1 <= trials_per_gpu <= MAX_TRIALS_PER_GPU:
        raise ValueError(f"trials_per_gpu must be 1..{MAX_TRIALS_PER_GPU}, got {trials_per_gpu}")
    units = round(1 / GPU_GRANULARITY)
    return (units // trials_per_gpu) / units


def worker_gpus(use_gpu: bool, gpus_per_worker: float | None) -> float:
    """The GPUs one Ray Train worker reserves: none for CPU workers, else `gpus_per_worker`
    (null = a whole GPU)."""
    if not use_gpu:
        return 0.0
    return 1.0 if gpus_per_worker is None else float(gpus_per_worker)


def per_trial_bytes(peak_bytes: int, context_bytes: int = 0) -> float:
    """What one trial is planned to hold on the GPU: its measured peak with the safety margin, plus
    the memory its process holds outside the allocator (CUDA context, library handles)."""
    return peak_bytes * MEMORY_SAFETY + context_bytes


def trials_per_gpu_for(peak_bytes: int, total_bytes: int, context_bytes: int = 0) -> int:
    """k for `trials_per_gpu: auto`: as many trials as fit in GPU_MEMORY_SHARE of the device,
    each `per_trial_bytes`; at least 1 (a trial that does not fit still runs alone, as without
    packing) and at most MAX_AUTO_TRIALS_PER_GPU."""
    if peak_bytes <= 0 or total_bytes <= 0:
        raise ValueError(f"need a positive peak and device size, got peak {peak_bytes}, total {total_bytes}")
    fits = math.floor(GPU_MEMORY_SHARE * total_bytes / per_trial_bytes(peak_bytes, context_bytes))
    return max(1, min(fits, MAX_AUTO_TRIALS_PER_GPU))


def trials_that_fit(
    cluster_cpus: float, cluster_gpus: float, workers: int, cpus_per_worker: float, gpus_per_worker: float
) -> int:
    """Trials of `workers` workers the cluster holds at once (0 when not even one fits).

    A GPU share below 1 must come from one GPU (Ray never splits a worker's share across two), so
    G GPUs hold G x floor(1 / share) such workers, not floor(G / share): 2 GPUs at 0.4 hold 4."""
    eps = 1e-9  # 0.3333 x 3 must count as fitting in 1.0
    fits = math.floor(cluster_cpus / (workers * cpus_per_worker) + eps)
    if gpus_per_worker > 0:
        if gpus_per_worker < 1:
            gpu_slots = math.floor(cluster_gpus + eps) * math.floor(1 / gpus_per_worker + eps)
            fits = min(fits, gpu_slots // workers)
        else:
            fits = min(fits, math.floor(cluster_gpus / (workers * gpus_per_worker) + eps))
    return max(0, fits)


def trials_at_once(fits: int, num_samples: int, max_concurrent_trials: int | None) -> int:
    """How many trials the sweep runs side by side: tune.max_concurrent_trials when set, else as
    many as fit (k x G for k trials per GPU on G GPUs), never more than the trials there are and
    at least one (a cluster that holds none now may still grow)."""
    if max_concurrent_trials is not None:
        return min(max_concurrent_trials, num_samples)
    return max(1, min(fits, num_samples))


def describe_measurement(
    peak_bytes: int, context_bytes: int, total_bytes: int, trials_per_gpu: int, what: str, device: str
) -> str:
    """The sweep's one line about `trials_per_gpu: auto`: what was measured and the k it gave."""
    gib = 1024**3
    capped = trials_per_gpu == MAX_AUTO_TRIALS_PER_GPU and trials_per_gpu < math.floor(
        GPU_MEMORY_SHARE * total_bytes / per_trial_bytes(peak_bytes, context_bytes)
    )
    return (
        f"tune.trials_per_gpu auto: two training steps of {what} peaked at {peak_bytes / gib:.2f} GiB "
        f"(+{context_bytes / gib:.2f} GiB outside the allocator) on {device} ({total_bytes / gib:.1f} GiB); "
        f"x{MEMORY_SAFETY} safety within {GPU_MEMORY_SHARE:.0%} of the device -> {trials_per_gpu} trial(s) per GPU"
        + (f" (capped at {MAX_AUTO_TRIALS_PER_GPU})" if capped else "")
        + f", {gpu_fraction(trials_per_gpu):g} GPU each"
    )
