"""`tltrain jobs list|status|logs|stop`: look after jobs already on a Ray cluster.

These commands only read or stop jobs through the Job Submission API; they stage nothing and read no
spec. They are separate from `tltrain submit` (commands/submit.py, execution/jobs.py), which owns getting a spec onto the cluster (staging, env
forwarding, storage checks), and share with it only the client, the `--address` flag, the log
follower and the exit codes, so `tltrain jobs logs --follow` ends with the same status code as
`tltrain submit --follow`.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tltrain.commands._args import add_address_arg
from tltrain.execution.jobs import EXIT_FAILED, EXIT_OK, exit_code, follow_logs, job_client, wait_terminal


def _job_row(job: Any) -> dict[str, Any]:
    return {
        "submission_id": job.submission_id,
        "job_id": job.job_id,
        "status": str(job.status.value),
        "entrypoint": job.entrypoint,
        "message": job.message,
        "start_time": job.start_time,
        "end_time": job.end_time,
        "metadata": job.metadata or {},
    }


def _fmt_ms(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _job_command(body: Callable[[argparse.Namespace, Any, TextIO, TextIO], int]) -> Callable[..., int]:
    """The frame every `jobs` command shares: default streams, a client for --address, and a Ray
    error about the job (unknown ID, cluster gone mid-call) as one error line and a failed exit."""

    @functools.wraps(body)
    def command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
        out, err = out or sys.stdout, err or sys.stderr
        try:
            client = job_client(args.address)
        except Exception as exc:  # noqa: BLE001 - whatever the reason, the cluster cannot be used
            print(f"error: cannot reach the Ray cluster ({args.address or 'RAY_ADDRESS / default'}): {exc}", file=err)
            return EXIT_FAILED
        try:
            return body(args, client, out, err)
        except RuntimeError as exc:
            print(f"error: {exc}", file=err)
            return EXIT_FAILED

    return command


@_job_command
def cmd_jobs_list(args: argparse.Namespace, client: Any, out: TextIO, err: TextIO) -> int:
    rows = sorted((_job_row(j) for j in client.list_jobs()), key=lambda r: r["start_time"] or 0)
    if args.json:
        print(json.dumps(rows), file=out)
        return EXIT_OK
    print(f"{'SUBMISSION ID':44} {'STATUS':10} {'STARTED':19}  ENTRYPOINT", file=out)
    for r in rows:
        print(
            f"{(r['submission_id'] or r['job_id'] or '-'):44} {r['status']:10} {_fmt_ms(r['start_time']):19}  "
            f"{r['entrypoint']}",
            file=out,
        )
    return EXIT_OK


@_job_command
def cmd_jobs_status(args: argparse.Namespace, client: Any, out: TextIO, err: TextIO) -> int:
    row = _job_row(client.get_job_info(args.job_id))
    if args.json:
        print(json.dumps(row), file=out)
    else:
        print(f"{args.job_id}: {row['status']}" + (f" ({row['message']})" if row["message"] else ""), file=out)
        print(f"  started {_fmt_ms(row['start_time'])}, ended {_fmt_ms(row['end_time'])}", file=out)
        print(f"  entrypoint: {row['entrypoint']}", file=out)
    return EXIT_OK


@_job_command
def cmd_jobs_logs(args: argparse.Namespace, client: Any, out: TextIO, err: TextIO) -> int:
    try:
        if args.follow:
            return exit_code(follow_logs(client, args.job_id, out))
        out.write(client.get_job_logs(args.job_id))
        out.flush()
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


@_job_command
def cmd_jobs_stop(args: argparse.Namespace, client: Any, out: TextIO, err: TextIO) -> int:
    requested = client.stop_job(args.job_id)
    if args.no_wait:
        print(f"{args.job_id}: stop {'requested' if requested else 'not needed (already ended)'}", file=out)
        return EXIT_OK
    status = wait_terminal(client, args.job_id, timeout_s=args.timeout_s)
    print(f"{args.job_id}: {status.value}", file=out)
    if not status.is_terminal():
        print(f"error: still {status.value} after {args.timeout_s:.0f}s", file=err)
        return EXIT_FAILED
    return EXIT_OK


def add_commands(subparsers: Any) -> None:
    """Register `jobs` (list, status, logs, stop) on the `tltrain` argparse subparsers."""
    jobs = subparsers.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)

    def add(name: str, summary: str, func: Callable[..., int], job_id: bool = True) -> argparse.ArgumentParser:
        q = jsub.add_parser(name, help=summary)
        if job_id:
            q.add_argument("job_id", metavar="ID")
        add_address_arg(q)
        q.set_defaults(func=func)
        return q

    add("list", "all jobs on the cluster", cmd_jobs_list, job_id=False).add_argument(
        "--json", action="store_true", help="print the jobs as a JSON list"
    )
    add("status", "a job's status", cmd_jobs_status).add_argument(
        "--json", action="store_true", help="print the job as one JSON object"
    )
    add("logs", "a job's driver log (progress lines, the JSON summary)", cmd_jobs_logs).add_argument(
        "--follow", action="store_true", help="stream until the job ends; exit with its status"
    )
    q = add("stop", "stop a job and wait until it has ended", cmd_jobs_stop)
    q.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
    q.add_argument("--timeout-s", type=float, default=120.0, help="how long to wait for the job to end")
