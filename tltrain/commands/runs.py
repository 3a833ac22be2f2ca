"""`tltrain runs [URI | SPEC]`: the runs and sweeps under a storage URI and who holds each one's lease."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tltrain.spec import load_spec
from tltrain.spec.schema import DEFAULT_STORE_DIR


def _storage_uri(target: str | None) -> str:
    """A storage URI, or a spec file (its storage.uri); default: the embedded ~/.tltrain/runs."""
    if target is None:
        return f"{DEFAULT_STORE_DIR}/runs"
    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        return load_spec(target).storage.uri
    return target


def cmd_runs(args: argparse.Namespace) -> dict[str, Any]:
    from tltrain import storage

    uri = _storage_uri(args.target)
    now = time.time()
    rows: list[dict[str, Any]] = []
    for name, lease in storage.list_leases(uri):
        if lease is None:
            rows.append({"name": name, "lease": None, "state": "free"})
            continue
        rows.append({"name": name, "kind": lease.kind, "state": lease.state(now), "owner": lease.describe(now),
                     "lease": {k: v for k, v in vars(lease).items() if k != "token"}})  # fmt: skip
    if not args.json:
        print(f"{uri}: {len(rows)} run/sweep folder(s)")
        for row in rows:
            if row["lease"] is None:
                print(f"  {row['name']:<40} free")
            else:
                print(f"  {row['name']:<40} {row['kind']:<5} {row['state']}: {row['owner']}")
    return {"storage_uri": uri, "runs": rows}


def add_commands(sub: Any) -> None:
    p = sub.add_parser("runs", help="list the runs and sweeps under a storage URI and who holds their leases")
    p.add_argument("target", nargs="?", default=None, help="storage URI or job spec (default: ~/.tltrain/runs)")
    p.add_argument("--json", action="store_true", help="print the list as one JSON object on the last line")
    p.set_defaults(func=cmd_runs)
