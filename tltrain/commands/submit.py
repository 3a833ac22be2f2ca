"""`tltrain submit`: validate a spec, ship it (and the local files it names) to a Ray cluster, run it.

The staging, environment forwarding, storage checks and job client are execution/jobs.py; this is
the command and its flags.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tltrain.commands._args import add_address_arg
from tltrain.execution.jobs import (
    DEFAULT_ENTRYPOINT_NUM_CPUS,
    DEFAULT_STAGING_DIR,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    JOB_ENV,
    Submission,
    check_storage,
    dashboard_address,
    entrypoint,
    exit_code,
    follow_logs,
    forwarded_env,
    job_client,
    local_files,
    stage,
)
from tltrain.spec import SpecError, load_spec


def cmd_submit(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    # 1. Everything that can be checked here is checked before a client is even built.
    try:
        spec = load_spec(args.spec, args.set)
        local_files(spec)
    except SpecError as exc:
        print(f"error: {exc}\nnothing was submitted", file=err)
        return EXIT_INVALID
    if args.entrypoint_num_cpus < 0:
        print("error: --entrypoint-num-cpus must be >= 0\nnothing was submitted", file=err)
        return EXIT_INVALID

    try:
        client = job_client(args.address)
    except Exception as exc:  # ConnectionError, auth errors: say where we tried
        print(f"error: cannot reach the Ray cluster ({args.address or 'RAY_ADDRESS / default'}): {exc}", file=err)
        return EXIT_FAILED
    address = dashboard_address(client)

    submission_id = args.submission_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    staging_root = Path(args.staging_dir).expanduser()
    try:
        check_storage(spec, address, args.allow_local_storage, err)
        staged = stage(spec, staging_root / submission_id)
    except SpecError as exc:
        print(f"error: {exc}\nnothing was submitted", file=err)
        return EXIT_INVALID

    env_vars, skipped = forwarded_env(os.environ) if args.forward_env else ({}, [])
    env_vars.update(JOB_ENV)
    sub = Submission(
        entrypoint=entrypoint(args.tune),
        working_dir=str(staged.working_dir),
        env_vars=env_vars,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        metadata={"tltrain.name": spec.name, "tltrain.command": "tune" if args.tune else "train"},
        address=args.address,
    )
    # 2. Send. The driver reserves a little CPU and never a GPU: GPUs are for the Train workers.
    try:
        job_id = client.submit_job(
            entrypoint=sub.entrypoint,
            submission_id=submission_id,
            runtime_env=sub.runtime_env(),
            metadata=sub.metadata,
            entrypoint_num_cpus=sub.entrypoint_num_cpus,
            entrypoint_num_gpus=0,
        )
    except Exception as exc:
        print(f"error: submission to {address} failed: {exc}", file=err)
        return EXIT_FAILED

    quiet = args.json
    report = err if quiet else out
    print(f"submitted {job_id} to {address}", file=report)
    print(f"  entrypoint: {sub.entrypoint}  (working_dir {staged.working_dir})", file=report)
    for key, source in staged.shipped.items():
        print(f"  shipped {key}: {source}", file=report)
    if env_vars:
        print(f"  env passed to the job: {', '.join(env_vars)}", file=report)
    if skipped:
        print(f"  env not passed (local to this machine): {', '.join(skipped)}", file=report)
    print(f"  same with Ray's CLI: {sub.ray_cli(wait=args.follow)}", file=report)
    if not args.follow:
        print(f"  follow: tltrain jobs logs {job_id} --follow", file=report)
    report.flush()

    summary: dict[str, Any] = {
        "submission_id": job_id,
        "address": address,
        "entrypoint": sub.entrypoint,
        "working_dir": str(staged.working_dir),
        "shipped": staged.shipped,
        "env_vars": sorted(env_vars),
        "ray_job_submit": sub.ray_cli(wait=args.follow),
    }
    code = EXIT_OK
    if args.follow:
        try:
            status = follow_logs(client, job_id, out)
        except KeyboardInterrupt:
            print(f"\nstopped following; the job keeps running. Stop it with: tltrain jobs stop {job_id}", file=err)
            return 130
        summary["status"] = str(status.value)
        print(f"job {job_id}: {status.value}", file=report)
        code = exit_code(status)
    if args.json:
        print(json.dumps(summary), file=out, flush=True)
    return code


def add_commands(subparsers: Any) -> None:
    """Register `submit` on the `tltrain` argparse subparsers."""
    p = subparsers.add_parser(
        "submit",
        help="run a job spec on a Ray cluster through the Job Submission API",
        description="Validate a job spec, ship it (and the local files it names) to a Ray cluster and "
        "run `tltrain train` (or `tune`) there.",
    )
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a spec field")
    p.add_argument("--tune", action="store_true", help="run `tltrain tune` (the spec's tune: section) instead of train")
    add_address_arg(p)
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit with its status")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last stdout line")
    p.add_argument("--submission-id", default=None, help="job id to use (default: <name>-<time>-<random>)")
    p.add_argument(
        "--entrypoint-num-cpus",
        type=float,
        default=DEFAULT_ENTRYPOINT_NUM_CPUS,
        help=f"CPUs reserved for the driver (default {DEFAULT_ENTRYPOINT_NUM_CPUS}); it never reserves a GPU",
    )
    p.add_argument(
        "--allow-local-storage",
        action="store_true",
        help="accept a local storage.uri on a multi-node cluster (only for a shared mount on every node)",
    )
    p.add_argument(
        "--no-forward-env",
        dest="forward_env",
        action="store_false",
        help="do not pass AWS_*/MLFLOW_* variables to the job (the cluster has its own role/settings)",
    )
    p.add_argument(
        "--staging-dir",
        default=DEFAULT_STAGING_DIR,
        help=f"where the job's working_dir is staged (default {DEFAULT_STAGING_DIR})",
    )
    p.set_defaults(func=cmd_submit)
