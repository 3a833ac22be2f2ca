"""Flags shared by several commands, defined once."""

from __future__ import annotations

import argparse


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """SPEC, --set and --json: every command that reads a job spec."""
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a spec field")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")


def add_address_arg(p: argparse.ArgumentParser) -> None:
    """`--address`, the same on `submit` and every `jobs` command."""
    p.add_argument(
        "--address",
        default=None,
        help="Ray dashboard address, e.g. http://HEAD:8265 (default: RAY_ADDRESS, else http://127.0.0.1:8265)",
    )


def add_force_unlock_arg(p: argparse.ArgumentParser) -> None:
    """`--force-unlock`: train, tune and compare, which hold a run's or sweep's lease."""
    p.add_argument(
        "--force-unlock",
        action="store_true",
        help="take the name's lease even from an owner that looks alive (check that owner is gone first: "
        "`tltrain runs` shows it)",
    )


def add_tracking_uri_arg(p: argparse.ArgumentParser) -> None:
    """`--tracking-uri`: every registry command and `serve`."""
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite under ~/.tltrain)",
    )
