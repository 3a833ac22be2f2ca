"""Getting a spec onto a remote Ray cluster through the Job Submission API (`tltrain submit`).


A submission is staged as a small directory that becomes the job's runtime_env `working_dir`:

    spec.yaml                 the resolved spec; local paths rewritten to the copies below
    files/data.train -> ...   symlinks to the local files the spec names (Ray's packager follows them)

so the cluster needs no shared disk: Ray zips the directory, stores it in the GCS and unpacks it on
every node that runs a process of the job, and the job's processes start in it, which is why the
rewritten paths are relative. s3:// URIs pass through. The staging directory is kept (it is only
links) so the printed `ray job submit ...` line runs as is.

Checkpoints: a multi-node cluster has no shared disk, so a local `storage.uri` is refused there
(use s3://, or `--allow-local-storage` when the path is a shared mount on every node); on a
single-node cluster it is allowed with a warning.

Credentials: AWS_* and MLFLOW_* variables set here are passed to the job as runtime_env env_vars
(names printed, never values). Variables that name local files (AWS_PROFILE, *_FILE, *_PATH,
*_BUNDLE) mean nothing on the cluster and are not passed; nor is a local MLflow store URI. Ray
shows a job's runtime_env in its dashboard: on a cluster with an instance role or IRSA, leave the
keys unset here (or use --no-forward-env).

Ray is imported lazily so a spec is validated, and refused, before anything heavy loads or any
request is sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from tltrain.spec.schema import DEFAULT_STORE_DIR, JobSpec, SpecError

DEFAULT_ENTRYPOINT_NUM_CPUS = 0.5
DEFAULT_STAGING_DIR = f"{DEFAULT_STORE_DIR}/submit"
SPEC_FILE = "spec.yaml"
FILES_DIR = "files"
# Ray keeps a working_dir package in the GCS, bounded by its gRPC message size (512 MiB in 2.60).
MAX_SHIPPED_BYTES = 500 * 1024 * 1024
FORWARDED_ENV_PREFIXES = ("AWS_", "MLFLOW_")
# Variables that point at files or profiles on this machine: meaningless on the cluster.
_LOCAL_ONLY_ENV = {"AWS_PROFILE", "AWS_DEFAULT_PROFILE"}
_LOCAL_ONLY_SUFFIXES = ("_FILE", "_PATH", "_BUNDLE", "_DIR")
_LOCAL_TRACKING_SCHEMES = ("sqlite:", "file:")
# Exit codes: 0 job succeeded (or submitted without --follow), 1 job failed / Ray unreachable,
# 2 invalid spec or arguments (nothing sent), 3 job stopped.
EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_STOPPED = 0, 1, 2, 3
_POLL_S = 1.0


# ---------------------------------------------------------------------------------------------
# Staging: the working_dir a job ships with


@dataclass
class Staged:
    working_dir: Path
    spec: JobSpec  # as the job will see it (relative paths)
    shipped: dict[str, str] = field(default_factory=dict)  # spec field -> local source
    shipped_bytes: int = 0


def is_local_path(value: str | None) -> bool:
    """A spec value naming a file on this machine (not null, "hub", or a URI like s3://)."""
    return value is not None and value not in ("", "hub") and "://" not in value


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def local_files(spec: JobSpec) -> dict[str, Path]:
    """The spec fields that name local files, resolved like `tltrain train` does (from the cwd)."""
    found: dict[str, Path] = {}
    for key, value, want_dir in (
        ("data.train", spec.data.train, True),
        ("data.val", spec.data.val, True),
        ("model.weights", spec.model.weights, False),
    ):
        if value is None or not is_local_path(value):
            continue
        path = Path(value).expanduser().absolute()
        if want_dir and not path.is_dir():
            raise SpecError(f"{key}: {value!r} is not a local directory (or use an s3:// URI)")
        if not want_dir and not path.is_file():
            raise SpecError(f'{key}: {value!r} is not a local file (or use an s3:// URI, "hub" or null)')
        found[key] = path
    return found


def stage(spec: JobSpec, staging_dir: Path) -> Staged:
    """Write `spec.yaml` plus links to the spec's local files into `staging_dir` (created)."""
    files = local_files(spec)
    total = sum(_tree_bytes(p) for p in files.values())
    if total > MAX_SHIPPED_BYTES:
        names = ", ".join(files)
        raise SpecError(
            f"{names}: {total / 2**20:.0f} MiB of local files is more than a Ray working_dir carries "
            f"({MAX_SHIPPED_BYTES / 2**20:.0f} MiB); upload them to s3:// and point the spec there"
        )
    staging_dir.mkdir(parents=True, exist_ok=False)
    (staging_dir / FILES_DIR).mkdir()
    tree = spec.to_dict()
    shipped: dict[str, str] = {}
    for key, source in files.items():
        link = staging_dir / FILES_DIR / key
        if source.is_file():  # keep the file name: loaders may look at its suffix
            link.mkdir()
            link = link / source.name
        link.symlink_to(source, target_is_directory=source.is_dir())
        section, name = key.split(".")
        tree[section][name] = str(link.relative_to(staging_dir))
        shipped[key] = str(source)
    # The job's driver runs inside the cluster: Ray gives it RAY_ADDRESS; a submitter-side address
    # in the spec would point it elsewhere.
    tree["scaling"]["address"] = None
    shipped_spec = JobSpec.model_validate(tree)
    (staging_dir / SPEC_FILE).write_text(
        "# staged by tltrain submit; local paths point into this working_dir\n"
        + yaml.safe_dump(shipped_spec.to_dict(), sort_keys=False)
    )
    return Staged(staging_dir, shipped_spec, shipped, total)


# ---------------------------------------------------------------------------------------------
# What the job gets: entrypoint, env, resources


def forwarded_env(environ: dict[str, str] | os._Environ[str]) -> tuple[dict[str, str], list[str]]:
    """(env_vars to pass, names skipped because they only make sense here). Never print values."""
    passed: dict[str, str] = {}
    skipped: list[str] = []
    for name in sorted(environ):
        if not name.startswith(FORWARDED_ENV_PREFIXES) or not environ[name]:
            continue
        value = environ[name]
        local_only = name in _LOCAL_ONLY_ENV or name.endswith(_LOCAL_ONLY_SUFFIXES)
        if name == "MLFLOW_TRACKING_URI" and (value.startswith(_LOCAL_TRACKING_SCHEMES) or "://" not in value):
            local_only = True
        if local_only:
            skipped.append(name)
        else:
            passed[name] = value
    return passed, skipped


def entrypoint(tune: bool) -> str:
    return f"tltrain {'tune' if tune else 'train'} {SPEC_FILE} --json"


@dataclass
class Submission:
    entrypoint: str
    working_dir: str
    env_vars: dict[str, str]
    entrypoint_num_cpus: float
    metadata: dict[str, str]
    address: str | None

    def runtime_env(self) -> dict[str, Any]:
        env: dict[str, Any] = {"working_dir": self.working_dir}
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env

    def ray_cli(self, wait: bool) -> str:
        """The same job through Ray's own CLI. Env values appear as "$NAME" for the shell to fill in."""
        parts = ["ray", "job", "submit"]
        if self.address:
            parts += ["--address", shlex.quote(self.address)]
        parts += ["--working-dir", shlex.quote(self.working_dir)]
        if self.env_vars:
            inner = ", ".join(
                f'\\"{name}\\": \\"{_shell_value(name, value)}\\"' for name, value in self.env_vars.items()
            )
            parts += ["--runtime-env-json", f'"{{\\"env_vars\\": {{{inner}}}}}"']
        parts += ["--metadata-json", shlex.quote(json.dumps(self.metadata, sort_keys=True))]
        parts += ["--entrypoint-num-cpus", _num(self.entrypoint_num_cpus), "--entrypoint-num-gpus", "0"]
        if not wait:
            parts.append("--no-wait")
        return " ".join(parts + ["--", self.entrypoint])


# Set on every job. Ray Train (and Tune) otherwise move each worker into a per-run directory under
# the node's session dir, and the shipped spec's paths are relative to the working_dir.
JOB_ENV = {"RAY_CHDIR_TO_TRIAL_DIR": "0"}


def _shell_value(name: str, value: str) -> str:
    # Values we set ourselves (not secrets) are written out; everything else is left to the shell.
    return value if JOB_ENV.get(name) == value else f"${name}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ---------------------------------------------------------------------------------------------
# Talking to the cluster


def job_client(address: str | None) -> Any:
    """A JobSubmissionClient; address None = RAY_ADDRESS, else http://127.0.0.1:8265 (Ray's rules)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def alive_node_count(address: str) -> int | None:
    """Alive nodes in the cluster behind a dashboard address; None when it cannot be told."""
    try:
        from ray.util.state import list_nodes

        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        return len(nodes)
    except Exception:  # an older/odd dashboard: the caller warns instead of refusing
        return None


def check_storage(spec: JobSpec, address: str, allow_local: bool, err: TextIO) -> None:
    """Refuse a local checkpoint root on a multi-node cluster (no shared disk is assumed)."""
    uri = spec.storage.uri
    if "://" in uri:
        return
    if not (uri.startswith("/") or uri.startswith("~")):
        raise SpecError(
            f"storage.uri: {uri!r} is relative; on the cluster it would land in the job's temporary "
            f"working_dir. Use s3://bucket/prefix (or an absolute path on a shared mount)"
        )
    if allow_local:
        print(f"warning: storage.uri {uri} must be a shared mount at the same path on every node", file=err)
        return
    nodes = alive_node_count(address)
    if nodes is not None and nodes > 1:
        raise SpecError(
            f"storage.uri: {uri!r} is a local path but the cluster has {nodes} nodes and no shared disk is "
            f"assumed: workers on other nodes could not save or restore checkpoints. Use s3://bucket/prefix "
            f"(or --allow-local-storage if the path is a shared mount on every node)"
        )
    where = "a single-node cluster" if nodes == 1 else "a cluster whose size could not be read"
    print(
        f"warning: storage.uri {uri} is a local path on {where}: checkpoints stay on that node's disk, "
        f"and a node added later (autoscaling) cannot reach them; prefer s3://",
        file=err,
    )


def dashboard_address(client: Any) -> str:
    return str(getattr(client, "_address", "") or "")


def wait_terminal(client: Any, job_id: str, timeout_s: float | None = None) -> Any:
    """Poll until the job reaches a terminal status; returns the JobStatus (or the last seen)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(_POLL_S)


def follow_logs(client: Any, job_id: str, out: TextIO) -> Any:
    """Stream the job's logs until it ends; returns its terminal JobStatus."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the stream closed early (dashboard restart): fall back to polling
        print(f"\nwarning: log stream ended ({exc}); waiting for the job to finish", file=sys.stderr)
    return wait_terminal(client, job_id)


def exit_code(status: Any) -> int:
    name = str(getattr(status, "value", status))
    if name == "SUCCEEDED":
        return EXIT_OK
    if name == "STOPPED":
        return EXIT_STOPPED
    return EXIT_FAILED
