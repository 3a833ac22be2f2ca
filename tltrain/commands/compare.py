"""`tltrain compare`: the spec against scratch, linear-probe and plain fine-tune baselines."""

from __future__ import annotations

import argparse
from typing import Any

from tltrain.commands._args import add_force_unlock_arg, add_spec_args
from tltrain.spec import load_spec
from tltrain.spec.rungs import RUNGS
from tltrain.spec.schema import SpecError


def parse_rungs(text: str | None) -> tuple[str, ...]:
    if not text:
        return RUNGS
    rungs = tuple(r.strip() for r in text.split(",") if r.strip())
    unknown = [r for r in rungs if r not in RUNGS]
    if unknown or not rungs:
        raise SpecError(f"--rungs: {unknown or text!r} unknown; choose from {', '.join(RUNGS)}")
    return rungs


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    from tltrain.execution.compare import run_compare

    rungs = parse_rungs(args.rungs)  # checked before the spec: a typo costs nothing
    return run_compare(load_spec(args.spec, args.set), rungs, force_unlock=args.force_unlock)


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="train the spec beside scratch, linear-probe and plain fine-tune baselines; table of held-out test scores",
    )
    add_spec_args(p)
    add_force_unlock_arg(p)
    p.add_argument("--rungs", default=None, help=f"comma-separated subset of {','.join(RUNGS)} (default: all)")
    p.set_defaults(func=cmd_compare)
