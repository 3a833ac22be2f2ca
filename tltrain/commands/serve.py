"""`tltrain serve NAME@ALIAS`: a registered model over HTTP (MLflow's scoring server).

Thin: parse arguments, let tracking/serving build and run `mlflow models serve`, print the URL
and a curl example once the model answers.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any

from tltrain.commands._args import add_tracking_uri_arg


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def cmd_serve(args: argparse.Namespace) -> int:
    from tltrain.tracking import serving

    try:
        plan = serving.plan_serve(
            args.ref, host=args.host, port=args.port, workers=args.workers, tracking_uri=args.tracking_uri
        )
    except serving.ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"loading {plan.name} version {plan.version} ({plan.ref}) ...", flush=True)
    ready = []

    def on_ready() -> None:
        ready.append(True)
        example = textwrap.indent(serving.curl_example(plan.url), "    ")
        print(f"serving {plan.name} version {plan.version} at {plan.url}  (Ctrl-C stops it)", flush=True)
        print(f"  POST images to {plan.url}/invocations, e.g.:\n{example}", flush=True)

    code = serving.run(plan, on_ready)
    if not ready:
        print(f"error: the server exited (code {code}) before it answered {plan.url}/ping; its output is above",
              file=sys.stderr)  # fmt: skip
    return code


def add_commands(subparsers: Any) -> None:
    """Register `serve` on the top-level parser's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="serve a registered model over HTTP (mlflow models serve)",
        epilog="refs: NAME@ALIAS | NAME/VERSION | NAME (latest version). Local file paths in requests are refused.",
    )
    p.add_argument("ref", help="NAME@ALIAS | NAME/VERSION | NAME")
    p.add_argument("--port", type=_port, default=5000, help="TCP port (default 5000)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes, each with its own copy of the model"
    )
    add_tracking_uri_arg(p)
    p.set_defaults(func=cmd_serve)
