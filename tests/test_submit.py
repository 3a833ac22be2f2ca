"""`tltrain submit` / `tltrain jobs`: staging, refusals, the printed Ray CLI line, and end to end on
a real two-node Ray cluster on 127.0.0.1 with checkpoints in a real S3 server (moto)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ray_nodes import LocalRayCluster
from tltrain.cli import build_parser
from tltrain.commands import jobs as cli_jobs
from tltrain.commands import submit as submit_cmd
from tltrain.execution import jobs as submit
from tltrain.spec.load import load_spec

VENV_BIN = Path(sys.executable).parent
TLTRAIN = str(VENV_BIN / "tltrain") if (VENV_BIN / "tltrain").exists() else shutil.which("tltrain")


def _write_spec(path: Path, **sections: Any) -> Path:
    tree: dict[str, Any] = {
        "name": "submit-unit",
        "model": {"name": "test_resnet", "weights": None},
        "data": {"train": "s3://bucket/train", "val": "s3://bucket/val", "image_size": 32},
        "storage": {"uri": "s3://bucket/runs"},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(tree))
    return path


# ---------------------------------------------------------------------------------------------
# Staging: what the job's working_dir holds


def test_stage_ships_local_files_and_rewrites_them_relative(tmp_path: Path) -> None:
    train, val = tmp_path / "imgs" / "train", tmp_path / "imgs" / "val"
    for root in (train, val):
        (root / "cat").mkdir(parents=True)
        (root / "cat" / "0.png").write_bytes(b"png-bytes")
    weights = tmp_path / "w" / "model.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    spec_path = _write_spec(
        tmp_path / "spec.yaml",
        data={"train": str(train), "val": str(val)},
        model={"weights": str(weights)},
        scaling={"address": "http://my-laptop-view:8265"},
    )
    spec = load_spec(spec_path, ["loop.epochs=3"])
    staged = submit.stage(spec, tmp_path / "stage" / "job-1")

    assert staged.shipped == {"data.train": str(train), "data.val": str(val), "model.weights": str(weights)}
    assert staged.shipped_bytes == len(b"png-bytes") * 2 + len(b"weights")
    shipped = load_spec(staged.working_dir / submit.SPEC_FILE)
    assert shipped.data.train == "files/data.train" and shipped.data.val == "files/data.val"
    assert shipped.model.weights == "files/model.weights/model.pth"
    assert shipped.loop.epochs == 3, "--set overrides are applied before shipping"
    assert shipped.scaling.address is None, "the driver joins the cluster it runs in"
    assert shipped.storage.uri == "s3://bucket/runs"
    # Relative to the working_dir, where Ray starts every process of the job:
    wd = staged.working_dir
    assert (wd / shipped.data.train / "cat" / "0.png").read_bytes() == b"png-bytes"
    assert (wd / shipped.model.weights).read_bytes() == b"weights"


def test_stage_passes_uris_through_and_ships_nothing(tmp_path: Path) -> None:
    spec = load_spec(_write_spec(tmp_path / "s.yaml", model={"weights": "hub"}))
    staged = submit.stage(spec, tmp_path / "stage")
    assert staged.shipped == {} and staged.shipped_bytes == 0
    shipped = load_spec(staged.working_dir / submit.SPEC_FILE)
    assert (shipped.data.train, shipped.data.val, shipped.model.weights) == (
        "s3://bucket/train",
        "s3://bucket/val",
        "hub",
    )


def test_stage_refuses_too_much_local_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = tmp_path / "train" / "a"
    train.mkdir(parents=True)
    (train / "x.png").write_bytes(b"0" * 2048)
    spec = load_spec(
        _write_spec(tmp_path / "s.yaml", data={"train": str(train.parent), "val": None, "val_fraction": 0.2})
    )
    monkeypatch.setattr(submit, "MAX_SHIPPED_BYTES", 1024)
    with pytest.raises(submit.SpecError, match="data.train.*upload them to s3://"):
        submit.stage(spec, tmp_path / "stage")
    assert not (tmp_path / "stage").exists()


# ---------------------------------------------------------------------------------------------
# Credentials and the equivalent `ray job submit` line


def test_forwarded_env_passes_credentials_but_not_local_only_settings() -> None:
    environ = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_PROFILE": "dev",
        "AWS_SHARED_CREDENTIALS_FILE": "/home/me/.aws/credentials",
        "AWS_CA_BUNDLE": "/etc/ssl/cert.pem",
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "AWS_SESSION_TOKEN": "",
        "HOME": "/home/me",
    }
    passed, skipped = submit.forwarded_env(environ)
    assert sorted(passed) == [
        "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI",
    ]  # fmt: skip
    assert sorted(skipped) == ["AWS_CA_BUNDLE", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"]
    local_store = submit.forwarded_env({"MLFLOW_TRACKING_URI": "sqlite:////home/me/mlflow.db"})
    assert local_store == ({}, ["MLFLOW_TRACKING_URI"])


def test_ray_cli_line_never_holds_secret_values_and_the_shell_fills_them_in(tmp_path: Path) -> None:
    sub = submit.Submission(
        entrypoint=submit.entrypoint(tune=True),
        working_dir=str(tmp_path / "work dir"),
        env_vars={"AWS_SECRET_ACCESS_KEY": "s3cr3t/with+chars", "RAY_CHDIR_TO_TRIAL_DIR": "0"},
        entrypoint_num_cpus=0.5,
        metadata={"tltrain.name": "x"},
        address="http://head:8265",
    )
    line = sub.ray_cli(wait=False)
    assert "s3cr3t" not in line and "$AWS_SECRET_ACCESS_KEY" in line
    # Run the line through bash with a fake `ray` that records its argv: the shell must hand Ray
    # exactly the runtime env, resources and entrypoint tltrain itself submits.
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "AWS_SECRET_ACCESS_KEY": "s3cr3t/with+chars"}
    argv = json.loads(subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, check=True).stdout)
    assert argv[:2] == ["job", "submit"]
    opts = dict(zip(argv[2::2], argv[3::2]))
    assert json.loads(opts["--runtime-env-json"]) == {"env_vars": sub.env_vars}
    assert opts["--working-dir"] == sub.working_dir and opts["--address"] == "http://head:8265"
    assert (opts["--entrypoint-num-cpus"], opts["--entrypoint-num-gpus"]) == ("0.5", "0")
    assert json.loads(opts["--metadata-json"]) == sub.metadata
    assert "--no-wait" in argv
    assert argv[argv.index("--") + 1 :] == ["tltrain", "tune", "spec.yaml", "--json"]


# ---------------------------------------------------------------------------------------------
# Refusals: nothing is sent


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def _record(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST = do_PUT = _record

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server standing in for the dashboard: it records every request it gets."""
    _Recorder.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "sections, overrides, field",
    [
        ({"loop": {"epochz": 2}}, [], "loop.epochz"),
        ({}, ["optim.lr=-1"], "optim.lr"),
        ({"data": {"val_fraction": 0.1}}, [], "data"),  # val and val_fraction both set
        ({"data": {"train": "/does/not/exist"}}, [], "data.train"),
        ({"model": {"weights": "missing.pth"}}, [], "model.weights"),
    ],
)
def test_invalid_spec_is_refused_before_anything_is_sent(
    tmp_path: Path,
    recording_server: tuple[str, list[str]],
    capsys: pytest.CaptureFixture[str],
    sections: dict[str, Any],
    overrides: list[str],
    field: str,
) -> None:
    address, requests = recording_server
    spec = _write_spec(tmp_path / "bad.yaml", **sections)
    args = build_parser().parse_args(
        ["submit", str(spec), "--address", address, "--staging-dir", str(tmp_path / "st")]
        + [f"--set={o}" for o in overrides]
    )
    assert args.func(args) == submit.EXIT_INVALID
    err = capsys.readouterr().err
    assert field in err and "nothing was submitted" in err
    assert requests == [], "the dashboard was contacted"
    assert not (tmp_path / "st").exists()


def test_commands_are_registered_on_the_cli() -> None:
    parser = build_parser()
    args = parser.parse_args(["submit", "s.yaml", "--tune", "--follow", "--set", "a.b=1", "--address", "http://h:8265"])
    assert (args.func, args.tune, args.follow, args.set, args.address) == (
        submit_cmd.cmd_submit,
        True,
        True,
        ["a.b=1"],
        "http://h:8265",
    )
    assert args.entrypoint_num_cpus == submit.DEFAULT_ENTRYPOINT_NUM_CPUS and args.forward_env
    for argv, func in [
        (["jobs", "list"], cli_jobs.cmd_jobs_list),
        (["jobs", "status", "ID"], cli_jobs.cmd_jobs_status),
        (["jobs", "logs", "ID", "--follow"], cli_jobs.cmd_jobs_logs),
        (["jobs", "stop", "ID"], cli_jobs.cmd_jobs_stop),
    ]:
        assert parser.parse_args(argv).func is func
    with pytest.raises(SystemExit):
        parser.parse_args(["jobs"])


def test_relative_local_storage_is_refused(tmp_path: Path) -> None:
    spec = load_spec(_write_spec(tmp_path / "s.yaml", storage={"uri": "runs"}))
    with pytest.raises(submit.SpecError, match="storage.uri.*relative"):
        submit.check_storage(spec, "http://127.0.0.1:1", allow_local=False, err=sys.stderr)


# ---------------------------------------------------------------------------------------------
# End to end: two Ray nodes on 127.0.0.1, S3 on 127.0.0.1, the real CLI


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRayCluster]:
    # Unix socket paths under a session dir must stay short: not under pytest's deep tmp_path.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS"))}
    # No credentials on the nodes: the job gets them only through `tltrain submit`'s runtime env.
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{VENV_BIN}:{env.get('PATH', '')}", HF_HUB_OFFLINE="1")
    attempts = 3  # a loaded machine can miss Ray's fixed 30 s raylet registration window
    for attempt in range(1, attempts + 1):
        root = Path(tempfile.mkdtemp(prefix="tlt-", dir="/tmp"))
        cluster = LocalRayCluster(root, env)
        try:
            cluster.start()
            break
        except (RuntimeError, TimeoutError) as exc:
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)
            if attempt == attempts:
                raise
            print(f"two-node cluster start failed (attempt {attempt}), retrying: {str(exc)[-2000:]}", file=sys.stderr)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _cli(args: list[str], env: dict[str, str], timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TLTRAIN, *args], env=env, capture_output=True, text=True, timeout=timeout_s)


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in: {text[-2000:]}")


def _wait_for(ok: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = ok()
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")


@pytest.mark.integration
@pytest.mark.slow
def test_submit_two_node_job_end_to_end(
    two_nodes: LocalRayCluster,
    s3_bucket: str,
    fashion_folders: tuple[str, str],
    tmp_path: Path,
) -> None:
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    from tltrain import storage

    assert TLTRAIN, "the tltrain console script is installed (pip install -e .)"
    train_dir, val_dir = fashion_folders
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    spec = tmp_path / "job.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "model": {"name": "test_resnet", "weights": None},
                "data": {"train": train_dir, "val": val_dir, "image_size": 32, "loader_workers": 0},
                "optim": {"name": "adamw", "lr": 1.0e-3},
                "loop": {"epochs": 2, "precision": "fp32", "max_steps_per_epoch": 3},
                # 1 CPU per node, 0.25 for the driver, 0.25 per worker: both workers would fit on one node, so
                # only scaling.placement_strategy puts one on each (Ray's default, PACK, would not).
                "scaling": {
                    "num_workers": 2,
                    "use_gpu": False,
                    "batch_size_per_worker": 8,
                    "cpus_per_worker": 0.25,
                    "placement_strategy": "STRICT_SPREAD",
                },
                "storage": {"uri": f"{s3_bucket}/runs", "keep": 1},
                "tracking": {"enabled": False},
            }
        )
    )
    secret_key, key_id = f"e2e-secret-{uuid.uuid4().hex}", f"e2e-key-{uuid.uuid4().hex}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "AWS_SECRET_ACCESS_KEY": secret_key, "AWS_ACCESS_KEY_ID": key_id}
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"  # `ray` for the printed Ray CLI line
    staging = tmp_path / "staging"
    common = ["--address", two_nodes.address, "--entrypoint-num-cpus", "0.25", "--staging-dir", str(staging)]
    client = JobSubmissionClient(two_nodes.address)

    # A local checkpoint root is refused on this multi-node cluster, before anything is submitted.
    refused = _cli(["submit", str(spec), *common, "--set", f"storage.uri={tmp_path / 'ckpts'}"], env)
    assert refused.returncode == submit.EXIT_INVALID, refused.stderr
    assert "storage.uri" in refused.stderr and "2 nodes" in refused.stderr
    assert client.list_jobs() == []

    # 1. Submit and follow: logs stream, the command exits with the job's status.
    done = _cli(["submit", str(spec), *common, "--follow", "--json"], env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    job_id = summary["submission_id"]
    assert summary["status"] == "SUCCEEDED"
    assert "epoch 2/2" in done.stdout
    assert sorted(summary["shipped"]) == ["data.train", "data.val"]
    # Credentials went to the job by name only.
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(summary["env_vars"])
    assert secret_key not in out and key_id not in out
    assert summary["ray_job_submit"].startswith("ray job submit --address")

    # The two Train workers ran on both nodes (STRICT_SPREAD).
    info = client.get_job_info(job_id)
    workers = list_actors(
        address=two_nodes.address,
        filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", info.job_id)],
        detail=True,
        raise_on_missing_output=False,
    )
    nodes = {n["node_id"] for n in two_nodes.alive_nodes()}
    assert len(workers) == 2 and {w.node_id for w in workers} == nodes, [(w.node_id, w.state) for w in workers]

    # Checkpoints are in the S3 server (no shared disk between the nodes).
    files = storage.list_files(f"{s3_bucket}/runs/{name}")
    manifests = [f for f in files if f.endswith("MANIFEST.json") and "checkpoint_" in f]
    assert manifests, files

    # jobs logs / status / list see it.
    logs = _cli(["jobs", "logs", job_id, "--address", two_nodes.address], env)
    assert logs.returncode == 0 and "epoch 1/2" in logs.stdout and "epoch 2/2" in logs.stdout
    status = _cli(["jobs", "status", job_id, "--address", two_nodes.address, "--json"], env)
    assert json.loads(status.stdout)["status"] == "SUCCEEDED"
    listed = _cli(["jobs", "list", "--address", two_nodes.address, "--json"], env)
    assert job_id in {r["submission_id"] for r in json.loads(listed.stdout)}

    # 2. Ray's own CLI runs the line tltrain printed for it (same working_dir, env, resources,
    # entrypoint). Same run name: it resumes the finished run from its S3 checkpoint and succeeds.
    ray_line = summary["ray_job_submit"]
    before = {j.submission_id for j in client.list_jobs()}
    ran = subprocess.run(["bash", "-c", ray_line], env=env, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, (ran.stdout + ran.stderr)[-4000:]
    (by_ray,) = {j.submission_id for j in client.list_jobs()} - before
    assert client.get_job_info(by_ray).entrypoint == "tltrain train spec.yaml --json"
    assert str(client.get_job_status(by_ray).value) == "SUCCEEDED"
    resumed = _last_json(client.get_job_logs(by_ray))  # worker log lines may follow the driver's summary
    assert (resumed["run_name"], resumed["epochs_completed"]) == (name, 2)

    # 3. A long second job, submitted without --follow, is ended by `jobs stop`.
    started = _cli(
        [
            "submit",
            str(spec),
            *common,
            "--json",
            "--set",
            f"name={name}-long",
            "--set",
            "loop.epochs=500",
            "--set",
            "loop.max_steps_per_epoch=null",
        ],
        env,
    )
    assert started.returncode == 0, started.stderr
    long_id = json.loads(started.stdout.strip().splitlines()[-1])["submission_id"]
    assert f"tltrain jobs logs {long_id} --follow" in started.stderr
    _wait_for(lambda: "epoch 1/500" in client.get_job_logs(long_id), 300, "the long job to train")
    assert str(client.get_job_status(long_id).value) == "RUNNING"
    stopped = _cli(["jobs", "stop", long_id, "--address", two_nodes.address], env)
    assert stopped.returncode == 0, stopped.stderr
    assert f"{long_id}: STOPPED" in stopped.stdout
    assert str(client.get_job_status(long_id).value) == "STOPPED"
    # Its exit status is the job's: `jobs logs --follow` on a stopped job returns EXIT_STOPPED.
    followed = _cli(["jobs", "logs", long_id, "--follow", "--address", two_nodes.address], env)
    assert followed.returncode == submit.EXIT_STOPPED and "epoch 1/500" in followed.stdout
