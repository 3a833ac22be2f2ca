"""`tltrain bench`: img/s of the bare PyTorch step vs tltrain's step in Ray vs end to end."""

from __future__ import annotations

import argparse
from typing import Any

from tltrain.commands._args import add_spec_args
from tltrain.spec import load_spec


def cmd_bench(args: argparse.Namespace) -> dict[str, Any]:
    from tltrain.execution.bench import run_bench

    return run_bench(load_spec(args.spec, args.set), steps=args.steps)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("bench", help="img/s: bare PyTorch step vs Ray Train step vs end to end")
    add_spec_args(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.set_defaults(func=cmd_bench)
