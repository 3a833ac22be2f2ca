"""`tltrain rank`: transferability scores of candidate source models (execution/rank.py runs it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from tltrain.commands._args import add_spec_args
from tltrain.spec import load_spec
from tltrain.spec.schema import SpecError


def candidates_override(path: str) -> str:
    """--candidates FILE (YAML/JSON: a list of {name, weights, ...} or {candidates: [...]}) as the
    `--set rank.candidates=...` it stands for, so the spec validates it like any other field."""
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"--candidates {path}: file not found")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"--candidates {path}: not valid YAML: {err}") from None
    if isinstance(data, dict) and "candidates" in data:
        data = data["candidates"]
    if not isinstance(data, list) or not data:
        raise SpecError(f"--candidates {path}: expected a non-empty list of {{name, weights}} entries")
    return "rank.candidates=" + json.dumps(data)


def cmd_rank(args: argparse.Namespace) -> dict[str, Any]:
    from tltrain.execution.rank import run_rank

    overrides = list(args.set) + ([candidates_override(args.candidates)] if args.candidates else [])
    return run_rank(load_spec(args.spec, overrides), depths=args.depths, fine_tune=args.fine_tune)


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "rank",
        help="rank source models (or --depths: one model's freeze depths) by LogME, LEEP, NCE and H-score on a "
        "sample of the training set: forward passes only",
    )
    add_spec_args(p)
    p.add_argument("--candidates", default=None, metavar="FILE", help="YAML list of {name, weights, weights_remap}")
    p.add_argument("--depths", action="store_true", help="score the pooled output of each layer group of one model")
    p.add_argument(
        "--fine-tune",
        action="store_true",
        help="then fine-tune every candidate (or depth) with the spec's training settings and report each score's "
        "Kendall tau with the accuracy reached: checks a score on your data before a search trusts it",
    )
    p.set_defaults(func=cmd_rank)
