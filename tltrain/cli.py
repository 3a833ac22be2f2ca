"""`tltrain ...`: the root parser. Each module in commands/ adds its own subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tltrain.commands import bench, compare, demo, jobs, prepare, rank, registry, runs, serve, submit, train, tune
from tltrain.reports import console
from tltrain.spec import SpecError
from tltrain.storage.lease import LeaseHeld

# The order `tltrain --help` lists them in.
COMMAND_MODULES = (train, tune, rank, compare, demo, bench, submit, jobs, runs, registry, serve, prepare)


def _emit_json(obj: dict[str, Any]) -> None:
    # The last stdout line is one JSON object, for scripts and CI.
    print(json.dumps(obj, default=str), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tltrain", description="Fine-tune pretrained image models on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="tltrain's own log lines at INFO level")
    parser.add_argument(
        console.FLAG,
        action="store_true",
        help="show Ray's and MLflow's own output on the terminal (default: a log file under "
        f"{console.LOG_DIR}, its path printed once)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup(verbose=args.verbose, library_logs=args.library_logs, command=args.command)
    # The hub is unreachable offline and timm/HF retry for ~50 s: fail fast unless the user opts in.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        # Spec commands return their summary (printed as JSON with --json); the others an exit code.
        result = args.func(args)
        if isinstance(result, dict):
            if args.json:
                _emit_json(result)
            return 0
        return int(result or 0)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except LeaseHeld as err:  # the name is in use: nothing was started or written
        print(f"error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        console.reset()


if __name__ == "__main__":
    sys.exit(main())
