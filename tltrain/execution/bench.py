"""`tltrain bench`: how close tltrain gets to the bare PyTorch step, and where the rest goes.

Three rates on the spec's model, precision, batch size and freeze depth, in one run:
  1. bare   - the plain PyTorch step on synthetic data already on the device (as
              ../shared/gpu/baseline.py: timm model, AdamW, autocast, channels_last on CUDA), in a
              Ray task so it runs where a GPU is, without Ray Train;
  2. ray    - tltrain's own `loop.train` inside a 1-worker Ray Train TorchTrainer, fed the same kind
              of synthetic on-device batches;
  3. e2e    - `execution.worker.worker_fn` (what `tltrain train` runs) on the spec's real data path
              (data.format / data.decode), loop.max_steps_per_epoch = steps.
Stages 2 and 3 run two epochs of `steps` steps and report the second (the first pays for
compilation, cuDNN autotuning and loader start-up). Also: MFU from FLOPs counted on one fwd+bwd step,
peak memory, the data-wait fraction, and with freeze_depth > 0 the bare rate of a full fine-tune
(frozen groups must show up as speed: they run no backward).
The FLOP counting and peak table are in core/flops.py, the readable report in reports/bench.py, and the
synthetic JPEG folder for the GPU run in data/synthetic.py.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any, TextIO

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from tltrain import storage
from tltrain.core.flops import mfu, peak_flops, train_flops_per_image
from tltrain.core.loop import train
from tltrain.core.model import build_model, layer_groups
from tltrain.core.optim import apply_freeze, set_frozen_norms_eval
from tltrain.core.plan import TrainPlan
from tltrain.core.steps import autocast_dtype
from tltrain.execution.packing import worker_device
from tltrain.execution.preflight import build_plan
from tltrain.execution.trainer import ensure_ray, fit
from tltrain.execution.worker import worker_fn
from tltrain.reports.bench import print_header, print_summary
from tltrain.spec.load import parse_spec
from tltrain.spec.metrics import DATA_WAIT_FRAC, EPOCH_TIME_S, IMG_PER_S
from tltrain.spec.schema import JobSpec, SpecError


def _peak_mem(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "max_rss"  # Linux: KiB


def _device(spec: JobSpec) -> torch.device:
    if spec.scaling.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- 1. the bare step --------------------------------------------------------------------------------


def bare_step_rate(spec: JobSpec, num_classes: int, image_size: int, depth: int, steps: int) -> dict[str, Any]:
    """img/s of the plain PyTorch step at freeze depth `depth` (run where the device is)."""
    lp = spec.loop
    device = _device(spec)
    cuda = device.type == "cuda"
    if cuda:  # the flags loop.train sets
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = lp.tf32
        torch.backends.cudnn.allow_tf32 = lp.tf32
    dtype = autocast_dtype(lp.precision)
    channels_last = lp.channels_last and cuda
    torch.manual_seed(lp.seed)
    model = build_model(spec.model.model_copy(update={"weights": None}), num_classes, image_size=spec.data.image_size)
    groups = layer_groups(model, coarse=spec.strategy.group_granularity == "coarse")
    apply_freeze(model, groups, depth)
    model.to(device).train()
    set_frozen_norms_eval(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    flops = train_flops_per_image(model, image_size, device, dtype, channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    fused: dict[str, Any] = {"fused": True} if cuda else {}
    opt = torch.optim.AdamW(params, lr=spec.optim.lr, **fused)
    scaler = torch.amp.GradScaler(device.type, enabled=lp.precision == "fp16")
    step_model = torch.compile(model) if lp.compile else model
    batch, accum = spec.scaling.batch_size_per_worker, lp.grad_accum
    xs = [torch.randn(batch, 3, image_size, image_size, device=device) for _ in range(accum)]
    if channels_last:
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    ys = [torch.randint(0, num_classes, (batch,), device=device) for _ in range(accum)]

    def step() -> None:
        for x, y in zip(xs, ys):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(step_model(x), y) / accum
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(max(3, steps // 3)):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak, peak_kind = _peak_mem(device)
    out = {
        IMG_PER_S: steps * batch * accum / seconds,
        "flops_per_img": flops,
        "peak_mem_bytes": peak,
        "peak_mem_kind": peak_kind,
        "warmup_s": warmup_s,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "trainable_params": sum(p.numel() for p in params),
    }
    return out


def _bare_task(
    spec_dict: dict[str, Any], num_classes: int, image_size: int, depths: list[int], steps: int
) -> dict[int, Any]:
    spec = JobSpec.model_validate(spec_dict)
    rates = {}
    for depth in depths:
        rates[depth] = bare_step_rate(spec, num_classes, image_size, depth, steps)
        if torch.cuda.is_available():  # the previous depth's model and optimizer are gone now
            torch.cuda.empty_cache()
    return rates


# --- 2. tltrain's step in Ray Train, synthetic data ---------------------------------------------------


class SyntheticLoader:
    """`n` micro-batches of one random batch already on the device: what loop.train iterates."""

    def __init__(
        self, batch: int, image_size: int, num_classes: int, n: int, device: torch.device, channels_last: bool
    ):
        self.images = torch.randn(batch, 3, image_size, image_size, device=device)
        if channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, num_classes, (batch,), device=device)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            yield self.images, self.labels


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str)) or v is None}


def _synthetic_worker(config: dict[str, Any]) -> None:
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    spec = JobSpec.model_validate(config["spec"])
    num_classes, image_size = config["num_classes"], config["image_size"]
    device = worker_device()
    torch.manual_seed(spec.loop.seed)
    model = build_model(spec.model.model_copy(update={"weights": None}), num_classes, image_size=spec.data.image_size)
    groups = layer_groups(model, coarse=spec.strategy.group_granularity == "coarse")
    model.to(device)
    channels_last = spec.loop.channels_last and device.type == "cuda"
    batch, accum, steps = spec.scaling.batch_size_per_worker, spec.loop.grad_accum, spec.loop.max_steps_per_epoch
    assert steps is not None  # _bench_spec sets loop.max_steps_per_epoch
    train_loader = SyntheticLoader(batch, image_size, num_classes, steps * accum, device, channels_last)
    val_loader = SyntheticLoader(batch, image_size, num_classes, 1, device, channels_last)

    def report(metrics: dict[str, Any], _checkpoint_dir: str | None) -> None:
        peak, kind = _peak_mem(device)
        ray.train.report({**_scalars(metrics), "bench/peak_mem_bytes": peak, "bench/peak_mem_kind": kind})

    train(spec, model, groups, train_loader, val_loader, device=device, num_classes=num_classes, report=report)


# --- 3. end to end: the real worker function on the real data ----------------------------------------


def _e2e_worker(config: dict[str, Any]) -> None:
    worker_fn(config)
    device = worker_device()
    peak, kind = _peak_mem(device)
    ray.train.report({"bench/peak_mem_bytes": peak, "bench/peak_mem_kind": kind})


def _fit(spec: JobSpec, plan: TrainPlan | None, worker: Any, name: str, **extra: Any) -> list[dict[str, Any]]:
    """Run `worker` in the spec's TorchTrainer (train's own builder; the bench spec has 1 worker,
    no retries, keep 1); rank 0's reports."""
    reports: list[dict[str, Any]] = []
    result = fit(
        spec, plan, lambda metrics, _uri: reports.append(metrics), name=name, worker=worker, extra_config=extra
    )
    if result.error is not None:
        raise result.error
    return reports


def _epoch_and_peak(reports: list[dict[str, Any]]) -> tuple[dict[str, Any], int | None]:
    epochs = [r for r in reports if IMG_PER_S in r]
    if not epochs:
        raise RuntimeError(f"the bench run reported no epoch ({reports})")
    peaks = [int(r["bench/peak_mem_bytes"]) for r in reports if "bench/peak_mem_bytes" in r]
    return epochs[-1], max(peaks) if peaks else None


def _bench_spec(spec: JobSpec, steps: int, name: str) -> JobSpec:
    tree = spec.to_dict()
    tree["name"] = name
    tree["loop"].update(epochs=2, max_steps_per_epoch=steps, early_stop_patience=None)
    tree["strategy"]["unfreeze"] = {}  # one freeze depth in both epochs
    tree["scaling"]["num_workers"] = 1
    tree["tracking"]["enabled"] = False
    tree["storage"].update(keep=1, max_failures=0)
    return parse_spec(tree, "(bench)")


def _check_resources(spec: JobSpec) -> None:
    """Fail now rather than wait forever for a GPU or CPUs the cluster does not have."""
    have = ray.cluster_resources()
    if spec.scaling.use_gpu and have.get("GPU", 0) < 1:
        raise SpecError("scaling.use_gpu: true, but the Ray cluster has no GPU (set it false to bench on CPU)")
    if have.get("CPU", 0) < spec.scaling.cpus_per_worker:
        raise SpecError(
            f"scaling.cpus_per_worker: {spec.scaling.cpus_per_worker} CPUs asked, the Ray cluster has "
            f"{have.get('CPU', 0):.0f}"
        )


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def run_bench(spec: JobSpec, steps: int = 20, out: TextIO | None = None) -> dict[str, Any]:
    """Measure the three rates (see the module docstring) and return the summary (`--json`);
    progress and the readable report go to `out` (default: stdout)."""
    out = out or sys.stdout
    if steps < 1:
        raise ValueError("--steps must be >= 1")
    name = f"{spec.name}-bench-{uuid.uuid4().hex[:8]}"
    bspec = _bench_spec(spec, steps, name)
    plan = build_plan(bspec)
    num_classes, image_size = len(plan.class_names), int(plan.data_config["input_size"][-1])
    freeze = bspec.strategy.freeze_depth
    depth = plan.num_layer_groups if freeze == "all" else int(freeze)
    ensure_ray(bspec.scaling.address)
    _check_resources(bspec)

    print_header(bspec, image_size, depth, plan.num_layer_groups, steps, out)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    depths = [depth] + ([0] if depth > 0 else [])
    task = ray.remote(num_cpus=bspec.scaling.cpus_per_worker, num_gpus=1 if bspec.scaling.use_gpu else 0, max_calls=1)(
        _bare_task
    )
    bare_all = ray.get(task.remote(bspec.to_dict(), num_classes, image_size, depths, steps))
    bare = bare_all[depth]
    timings["bare_s"] = time.perf_counter() - t0
    device = bare["device"]
    print(f"  1 bare PyTorch step    {bare[IMG_PER_S]:9.1f} img/s   ({device})", file=out, flush=True)

    # Bench runs write their (throwaway) run state beside the spec's runs on s3, or in a temp dir.
    local_dir = None if storage.is_s3(spec.storage.uri) else tempfile.mkdtemp(prefix="tltrain-bench-")
    run_root = f"{spec.storage.uri.rstrip('/')}/_bench" if local_dir is None else local_dir
    bspec = bspec.model_copy(update={"storage": bspec.storage.model_copy(update={"uri": run_root})})
    try:
        t0 = time.perf_counter()
        extra = {"num_classes": num_classes, "image_size": image_size}
        ray_epoch, ray_peak = _epoch_and_peak(_fit(bspec, None, _synthetic_worker, f"{name}-ray", **extra))
        timings["ray_s"] = time.perf_counter() - t0
        print(
            f"  2 tltrain step in Ray  {ray_epoch[IMG_PER_S]:9.1f} img/s   "
            f"({_ratio(ray_epoch[IMG_PER_S], bare[IMG_PER_S]):.3f}x bare)",
            file=out,
            flush=True,
        )

        t0 = time.perf_counter()
        # Evaluation is not what is measured: one batch of val keeps each epoch's eval short.
        e2e_plan = dataclasses.replace(plan, val=plan.val[: bspec.scaling.batch_size_per_worker])
        e2e_epoch, e2e_peak = _epoch_and_peak(_fit(bspec, e2e_plan, _e2e_worker, f"{name}-e2e"))
        timings["e2e_s"] = time.perf_counter() - t0
    finally:
        if local_dir is not None:
            shutil.rmtree(local_dir, ignore_errors=True)

    bare_ips, ray_ips, e2e_ips = bare[IMG_PER_S], ray_epoch[IMG_PER_S], e2e_epoch[IMG_PER_S]
    peak = peak_flops(device, bspec.loop.precision, bspec.loop.tf32) if device != "cpu" else None
    flops = bare["flops_per_img"]
    wait = float(e2e_epoch[DATA_WAIT_FRAC])
    batch = bspec.scaling.batch_size_per_worker * bspec.loop.grad_accum
    summary: dict[str, Any] = {
        "model": spec.model.name,
        "device": device,
        "precision": bspec.loop.precision,
        "batch_size": bspec.scaling.batch_size_per_worker,
        "grad_accum": bspec.loop.grad_accum,
        "image_size": image_size,
        "channels_last": bspec.loop.channels_last and device != "cpu",
        "compile": bspec.loop.compile,
        "data_format": bspec.data.format,
        "data_decode": bspec.data.decode,
        "loader_workers": bspec.data.loader_workers,
        "steps": steps,
        "e2e_steps": round(e2e_epoch[IMG_PER_S] * e2e_epoch[EPOCH_TIME_S] / batch),
        "freeze_depth": depth,
        "num_layer_groups": plan.num_layer_groups,
        "bare_img_per_s": bare_ips,
        "ray_img_per_s": ray_ips,
        "e2e_img_per_s": e2e_ips,
        "ratio_ray_vs_bare": _ratio(ray_ips, bare_ips),
        "ratio_e2e_vs_ray": _ratio(e2e_ips, ray_ips),
        "ratio_e2e_vs_bare": _ratio(e2e_ips, bare_ips),
        "train_flops_per_img": flops,
        "peak_flops": peak,
        "mfu": mfu(e2e_ips, flops, peak),
        "mfu_bare": mfu(bare_ips, flops, peak),
        "mfu_ray": mfu(ray_ips, flops, peak),
        "peak_mem_bytes": e2e_peak,
        "peak_mem_bytes_bare": bare["peak_mem_bytes"],
        "peak_mem_bytes_ray": ray_peak,
        "peak_mem_kind": bare["peak_mem_kind"],
        DATA_WAIT_FRAC: wait,
        "compute_frac": max(0.0, 1.0 - wait),
        "ray_data_wait_frac": float(ray_epoch[DATA_WAIT_FRAC]),
        "bare_warmup_s": bare["warmup_s"],
        "trainable_params": bare["trainable_params"],
        "timings_s": timings,
    }
    if depth > 0:
        full = bare_all[0]
        summary.update(
            bare_full_img_per_s=full[IMG_PER_S],
            frozen_speedup=_ratio(bare_ips, full[IMG_PER_S]),
            train_flops_per_img_full=full["flops_per_img"],
            trainable_params_full=full["trainable_params"],
        )
    print_summary(summary, out)
    return summary
