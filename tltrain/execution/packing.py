"""Small trials on a shared GPU, on the cluster: the `trials_per_gpu: auto` measurement and fake GPUs.

`tune.trials_per_gpu: auto` sizes k by memory: before the sweep, one Ray task with a whole GPU
builds the trial's model at the largest batch (and image size, lowest freeze depth, every searched
model / precision / optimizer) of the space and runs training steps there, in the spec's precision,
reading the allocator's peak and the device's size; spec/packing.py turns that into k. The
arithmetic lives there (no Ray, no torch), so it is tested without a GPU.

Fake GPUs (TLTRAIN_FAKE_GPUS=1) let the packing be tested on a machine without CUDA: a Ray node
started with `--num-gpus N` schedules GPU shares as on a real one, and a worker given GPU
resources trains on CPU with gloo instead, saying so once in its log. It is opt-in and refuses a
worker that does see a CUDA device, so a real GPU cluster never trains on CPU silently; without the
variable, a GPU worker with no CUDA fails as before.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any, TextIO

import ray
import ray.train.torch
import torch
from ray.train.torch import TorchConfig

from tltrain.core.model import build_model, layer_groups
from tltrain.core.optim import apply_freeze, build_optimizer, resolve_freeze_depth, set_frozen_norms_eval
from tltrain.core.plan import TrainPlan
from tltrain.core.steps import autocast_dtype, set_backend_flags
from tltrain.data import resolve_data_config
from tltrain.spec.packing import (
    describe_measurement,
    gpu_fraction,
    per_trial_bytes,
    trials_per_gpu_for,
)
from tltrain.spec.schema import FreezeDepth, JobSpec, SpecError
from tltrain.spec.search import apply_config
from tltrain.spec.space import Dist

log = logging.getLogger(__name__)

# Set to 1 where the cluster's GPUs are fake (`ray start --num-gpus N` on a machine without CUDA,
# for tests): read by whoever builds a trainer (the driver, or each Tune trial's process on the
# cluster, so set it in the environment the cluster starts from as well).
FAKE_GPUS_ENV = "TLTRAIN_FAKE_GPUS"


# --- fake GPUs: CPU and gloo where Ray hands out GPUs the machine does not have ------------------


def fake_gpus() -> bool:
    return os.environ.get(FAKE_GPUS_ENV) == "1"


def for_fake_gpus(
    spec: JobSpec, worker: Callable[[dict[str, Any]], None]
) -> tuple[Callable[[dict[str, Any]], None], TorchConfig | None]:
    """(worker, Ray Train torch config) for `build_trainer`: unchanged unless GPU workers run under
    TLTRAIN_FAKE_GPUS=1, where the worker trains on CPU and the process group uses gloo (Ray
    would pick NCCL for workers that hold GPU resources)."""
    if not (spec.scaling.use_gpu and fake_gpus()):
        return worker, None
    return functools.partial(_on_cpu, worker), TorchConfig(backend="gloo")


def announce_fake_gpus(spec: JobSpec, out: TextIO) -> None:
    """One line on the driver when its GPU runs will train on CPU (each worker also logs it, but
    a worker's log may not reach the terminal)."""
    if spec.scaling.use_gpu and fake_gpus():
        print(f"{FAKE_GPUS_ENV}=1: GPU workers hold fake GPU shares and train on CPU with gloo", file=out, flush=True)


def worker_device() -> torch.device:
    """A Ray Train worker's device: Ray's choice, or the CPU where the cluster's GPUs are fake
    (TLTRAIN_FAKE_GPUS=1; `_on_cpu` has refused a worker that does see CUDA). Every worker
    function asks this instead of `ray.train.torch.get_device`."""
    return torch.device("cpu") if fake_gpus() else ray.train.torch.get_device()


def _on_cpu(worker: Callable[[dict[str, Any]], None], config: dict[str, Any]) -> None:
    """Run `worker` on this Ray Train worker with its GPU share but on the CPU (`worker_device`)."""
    if torch.cuda.is_available():
        raise RuntimeError(
            f"{FAKE_GPUS_ENV}=1 says this cluster's GPUs are fake, but this worker sees CUDA device "
            f"{torch.cuda.get_device_name(0)!r}: unset {FAKE_GPUS_ENV} to train on the GPU"
        )
    context = ray.train.get_context()
    if context.get_world_rank() == 0:
        log.warning(
            "%s=1: worker holds GPU %s but this machine has no CUDA; training on CPU with gloo",
            FAKE_GPUS_ENV,
            ray.get_gpu_ids(),
        )
    worker(config)


# --- trials_per_gpu: auto -------------------------------------------------------------------------

# Searched keys whose categories change memory: every combination of their values is measured.
_CATEGORICAL = ("model.name", "loop.precision", "optim.name")
_LARGEST = ("scaling.batch_size_per_worker", "data.image_size")  # the largest value is the worst


def _depth_rank(depth: FreezeDepth) -> float:
    return float("inf") if depth == "all" else float(depth)


def measured_variants(spec: JobSpec, space: dict[str, Dist]) -> list[JobSpec]:
    """The trial specs whose one training step bounds every trial's peak memory: the largest
    searched batch size and image size, the lowest freeze depth any trial reaches (progressive
    unfreezing included: its last depth trains most), and each searched model, precision and
    optimizer (a null image size, the model's own, is measured beside the largest number)."""
    fixed: dict[str, Any] = {}
    options: dict[str, list[Any]] = {}
    for key in _LARGEST:
        if key in space:
            values = space[key].candidates()
            numbers = [v for v in values if isinstance(v, (int, float))]
            options[key] = ([max(numbers)] if numbers else []) + ([None] if None in values else [])
    depths: list[FreezeDepth] = [spec.strategy.freeze_depth, *spec.strategy.unfreeze.values()]
    for key, dist in space.items():
        if key == "strategy.freeze_depth" or key.startswith("strategy.unfreeze."):
            depths += dist.candidates()
    fixed["strategy.freeze_depth"] = min(depths, key=_depth_rank)
    fixed["strategy.unfreeze"] = {}
    if "loop.ema_decay" in space:  # an EMA twin is one more copy of the weights on the device
        fixed["loop.ema_decay"] = next((v for v in space["loop.ema_decay"].candidates() if v is not None), None)
    for key in _CATEGORICAL:
        if key in space:
            options[key] = list(dict.fromkeys(space[key].candidates()))
    keys = list(options)
    return [
        apply_config(spec, {**fixed, **dict(zip(keys, combo))}, tune=None)
        for combo in itertools.product(*(options[k] for k in keys))
    ]


def require_gpus_for_auto(cluster_resources: dict[str, float]) -> None:
    """`auto` measures on a GPU: refuse before any trial on a cluster that has none."""
    if cluster_resources.get("GPU", 0) < 1:
        raise SpecError(
            "tune.trials_per_gpu auto measures training steps on a GPU, and the Ray cluster has none "
            f"(CPU {cluster_resources.get('CPU', 0):g}, GPU {cluster_resources.get('GPU', 0):g}): run on a GPU "
            "cluster, or set tune.trials_per_gpu to a number (e.g. 2)"
        )


def resolve_trials_per_gpu(spec: JobSpec, plan: TrainPlan, space: dict[str, Dist], out: TextIO) -> int:
    """tune.trials_per_gpu as a number: the spec's, or measured (one line to `out`) for auto."""
    assert spec.tune is not None
    if spec.tune.trials_per_gpu != "auto":
        if spec.tune.trials_per_gpu > 1:
            print(
                f"tune.trials_per_gpu {spec.tune.trials_per_gpu}: each trial reserves "
                f"{gpu_fraction(spec.tune.trials_per_gpu):g} GPU, up to {spec.tune.trials_per_gpu} per GPU",
                file=out,
                flush=True,
            )
        return spec.tune.trials_per_gpu
    require_gpus_for_auto(ray.cluster_resources())
    variants = measured_variants(spec, space)
    task = ray.remote(num_gpus=1, num_cpus=spec.scaling.cpus_per_worker, max_calls=1)(_measure)
    results = ray.get(task.remote([v.to_dict() for v in variants], len(plan.class_names)))
    if results is None:
        raise SpecError(
            "tune.trials_per_gpu auto: the GPU Ray gave the measuring task has no CUDA device (a node started "
            f"with --num-gpus but without a GPU, e.g. {FAKE_GPUS_ENV}=1 tests): set tune.trials_per_gpu to a number"
        )
    for result in results:
        if result["oom"]:
            raise SpecError(
                f"scaling.batch_size_per_worker: one training step of {result['what']} does not fit in the memory "
                f"of {result['device']} even alone: lower the (searched) batch size or image size"
            )
    worst = max(results, key=lambda r: per_trial_bytes(r["peak"], r["outside"]))
    k = trials_per_gpu_for(worst["peak"], worst["total"], worst["outside"])
    print(
        describe_measurement(worst["peak"], worst["outside"], worst["total"], k, worst["what"], worst["device"]),
        file=out,
        flush=True,
    )
    return k


def _measure(spec_dicts: list[dict[str, Any]], num_classes: int) -> list[dict[str, Any]] | None:
    """On the GPU Ray gave this task: one result per variant (or one marked oom, where a variant
    does not fit even alone); None without a CUDA device."""
    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    results = []
    for spec_dict in spec_dicts:
        spec = JobSpec.model_validate(spec_dict)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            what = train_steps(spec, num_classes, device)
        except torch.cuda.OutOfMemoryError:
            batch = spec.scaling.batch_size_per_worker
            return [{"oom": True, "what": f"{spec.model.name} at batch {batch}", "device": name}]
        peak = int(torch.cuda.max_memory_allocated(device))
        free, total = torch.cuda.mem_get_info(device)
        # Device memory in use that the allocator does not account for: this process's CUDA context
        # and library handles (every packed trial has its own), plus anything else on the device.
        outside = max(0, int(total - free) - int(torch.cuda.memory_reserved(device)))
        results.append({"oom": False, "peak": peak, "outside": outside, "total": int(total), "what": what,
                        "device": name})  # fmt: skip
    return results


def train_steps(spec: JobSpec, num_classes: int, device: torch.device) -> str:
    """Two training steps of `spec`'s model on synthetic data at its batch size and image size:
    forward, backward and optimizer step as the loop runs them (freezing, channels_last, precision,
    an EMA copy). Two, not one: the optimizer creates its state at the end of the first step, so
    only the second has activations, gradients and optimizer state on the device together.
    Returns what was run, for the measurement line."""
    lp = spec.loop
    set_backend_flags(lp, device)
    model = build_model(spec.model.model_copy(update={"weights": None}), num_classes, image_size=spec.data.image_size)
    size = int(resolve_data_config(model, spec.data.image_size, model_name=spec.model.name)["input_size"][-1])
    batch = spec.scaling.batch_size_per_worker
    groups = layer_groups(model, coarse=spec.strategy.group_granularity == "coarse")
    apply_freeze(model, groups, resolve_freeze_depth(spec.strategy.freeze_depth, groups))
    model.to(device).train()
    set_frozen_norms_eval(model)
    channels_last = lp.channels_last and device.type == "cuda"  # as the loop decides it
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model) if lp.ema_decay is not None else None  # held for its memory
    optimizer = build_optimizer(model, groups, spec.strategy, spec.optim, device)
    scaler = torch.amp.GradScaler(device.type, enabled=lp.precision == "fp16")
    dtype = autocast_dtype(lp.precision)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    for _ in range(2):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out[0] if isinstance(out, tuple) else out, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del model, ema, optimizer
    return f"{spec.model.name} at batch {batch}, {size} px, {lp.precision}"
