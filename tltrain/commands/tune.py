"""`tltrain tune`: search the spec's `tune.space` (execution/tune.py runs the search)."""

from __future__ import annotations

import argparse
from typing import Any

from tltrain.commands._args import add_force_unlock_arg, add_spec_args
from tltrain.spec import load_spec


def cmd_tune(args: argparse.Namespace) -> dict[str, Any]:
    from tltrain.execution.tune import run_tune

    return run_tune(load_spec(args.spec, args.set), resume=args.resume, force_unlock=args.force_unlock)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("tune", help="search fine-tuning hyperparameters (the spec's tune: section)")
    add_spec_args(p)
    add_force_unlock_arg(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of the same name")
    p.set_defaults(func=cmd_tune)
