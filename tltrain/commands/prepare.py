"""`tltrain prepare`: decode a spec's images once into uint8 shards (execution/prepare.py does it)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tltrain.execution.prepare import DEFAULT_SHARD_BYTES, prepare
from tltrain.spec import SpecError, load_spec


def cmd_prepare(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.set)
    out = args.out or spec.data.prepared
    if not out:
        raise SpecError("tltrain prepare: give --out URI (or set data.prepared in the spec)")
    summary = prepare(
        spec,
        out,
        workers=args.workers,
        shard_bytes=int(args.shard_mb * 2**20),
        force=args.force,
        log=lambda msg: print(msg, file=sys.stderr if args.json else sys.stdout, flush=True),
    )
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


def add_commands(sub: Any) -> None:
    """Register `tltrain prepare` on the CLI's subparsers (cli.build_parser calls this)."""
    p = sub.add_parser("prepare", help="decode + resize images once into uint8 shards for data.format: shards")
    p.add_argument("spec", help="job spec YAML (its data, model and image_size decide what is stored)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a spec field")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    p.add_argument("--out", default=None, metavar="URI", help="local dir or s3:// prefix (default: data.prepared)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPUs; 0 = in process)")
    p.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20, help="target size of one shard file")
    p.add_argument("--force", action="store_true", help="rewrite even if the directory is up to date")
    p.set_defaults(func=cmd_prepare)
