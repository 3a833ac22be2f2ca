"""The readable half of `tltrain bench`'s output: the header line and the summary as report lines.

bench.py measures and returns the summary (what `--json` prints); this module only formats, so the
report's wording and units can change without touching the measurements, and the measuring code
does not carry string formatting. (bench.py still prints the progress lines of stages 1 and 2 as
each finishes, so a slow run shows where it is.)
"""

from __future__ import annotations

from typing import Any, TextIO

from tltrain.spec.metrics import DATA_WAIT_FRAC
from tltrain.spec.schema import JobSpec


def print_header(spec: JobSpec, image_size: int, depth: int, num_layer_groups: int, steps: int, out: TextIO) -> None:
    """What is about to be measured (`spec` as run_bench adjusted it), printed before the first
    (slow) measurement starts."""
    print(
        f"bench {spec.model.name}: {spec.loop.precision}, batch {spec.scaling.batch_size_per_worker}"
        f"{' x accum ' + str(spec.loop.grad_accum) if spec.loop.grad_accum > 1 else ''}, {image_size}px, "
        f"freeze_depth {depth}/{num_layer_groups}, compile {'on' if spec.loop.compile else 'off'}, "
        f"data {spec.data.format}{' + nvjpeg' if spec.data.decode == 'nvjpeg' else ''} "
        f"({spec.data.loader_workers} loader workers), {'GPU' if spec.scaling.use_gpu else 'CPU'}, {steps} steps",
        file=out,
        flush=True,
    )


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def print_summary(s: dict[str, Any], out: TextIO) -> None:
    """The end-to-end rate and where the time, FLOPs and memory went, from run_bench's summary."""
    mem = "peak GPU memory" if s["peak_mem_kind"].startswith("cuda") else "peak RSS"
    print(
        f"  3 end to end           {s['e2e_img_per_s']:9.1f} img/s   ({s['ratio_e2e_vs_ray']:.3f}x Ray step, "
        f"{s['ratio_e2e_vs_bare']:.3f}x bare; {s['e2e_steps']} steps)",
        file=out,
    )
    print(
        f"  where the time goes (end to end): data wait {_fmt_pct(s[DATA_WAIT_FRAC])}, "
        f"compute {_fmt_pct(s['compute_frac'])}",
        file=out,
    )
    peak = "unknown for this device" if s["peak_flops"] is None else f"{s['peak_flops'] / 1e12:.0f} TFLOP/s"
    print(
        f"  MFU ({s['train_flops_per_img'] / 1e9:.2f} GFLOP/img fwd+bwd, peak {peak}): "
        f"bare {_fmt_pct(s['mfu_bare'])}, Ray {_fmt_pct(s['mfu_ray'])}, end to end {_fmt_pct(s['mfu'])}",
        file=out,
    )
    print(
        f"  {mem}: bare {_fmt_bytes(s['peak_mem_bytes_bare'])}, Ray {_fmt_bytes(s['peak_mem_bytes_ray'])}, "
        f"end to end {_fmt_bytes(s['peak_mem_bytes'])}",
        file=out,
    )
    if "bare_full_img_per_s" in s:
        print(
            f"  frozen: freeze_depth {s['freeze_depth']} {s['bare_img_per_s']:.1f} img/s vs full fine-tune "
            f"{s['bare_full_img_per_s']:.1f} img/s ({s['frozen_speedup']:.2f}x; fwd+bwd "
            f"{s['train_flops_per_img'] / 1e9:.2f} vs {s['train_flops_per_img_full'] / 1e9:.2f} GFLOP/img)",
            file=out,
        )
    out.flush()
