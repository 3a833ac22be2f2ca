"""`tltrain tune`: a real sweep on local Ray over S3 (moto), ASHA, best checkpoint, kill + resume,
and validation before anything starts.

Tiny model (timm test_resnet, 32 px, 15 steps of 16 images per epoch) on real Fashion-MNIST images,
so a trial trains in seconds; the cost is Ray's process start-up (each trial starts a Tune actor, a
Train controller and a worker, each importing torch/timm), and trials run 2 at a time on 2 CPUs.

Ray: the tests start their own 2-CPU cluster (`ray start --head --block`, private RAY_TMPDIR and
ports) rather than `ray.init(address="local")`: Train V2's detached PlacementGroupCleaner looks its
cluster up by address file / local GCS processes, and with any other Ray running on the machine it
cannot, so the placement group of a trial that ASHA stops would never be freed. The cluster also
outlives the driver the resume test SIGKILLs, and is torn down by its own process group only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tltrain.spec.load import parse_spec
from tltrain.spec.schema import SpecError
from tltrain.spec.search import validate_space
from tltrain.spec.space import Dist

pytestmark = pytest.mark.integration

EPOCHS = 4


def _tree(fashion: tuple[str, str], storage_uri: str, name: str, space: dict[str, Any], **tune: Any) -> dict[str, Any]:
    train, val = fashion
    return {
        "name": name,
        "model": {"name": "test_resnet"},
        "data": {"train": train, "val": val, "image_size": 32, "loader_workers": 0},
        "optim": {"lr": 1.0e-3},
        "loop": {"epochs": EPOCHS, "precision": "fp32", "max_steps_per_epoch": 15, "seed": 0},
        "scaling": {"num_workers": 1, "batch_size_per_worker": 16},
        "storage": {"uri": storage_uri, "keep": 1},
        "tracking": {"enabled": False},
        "tune": {
            "num_samples": 6, "metric": "val/acc", "mode": "max", "searcher": "random", "seed": 0,
            "scheduler": {"kind": "asha", "grace_epochs": 1, "reduction_factor": 2},
            "space": space, **tune,
        },
    }  # fmt: skip


SPACE = {
    "strategy.freeze_depth": "auto",
    "optim.lr": {"loguniform": [1.0e-3, 1.0e-2]},
    "strategy.layer_decay": {"uniform": [0.5, 1.0]},
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(s3_server: str) -> Iterator[dict[str, str]]:
    """A 2-CPU Ray cluster of our own (`ray start --head --block` in its own session), outliving
    the drivers the tests kill. Its private RAY_TMPDIR holds its sessions and address file, so
    Ray's own processes (Train's PlacementGroupCleaner finds "the" cluster by that file) never
    mistake another cluster on this machine for it. Yields the env for drivers (RAY_ADDRESS set).
    Torn down by signalling only the process group it started."""
    tmp = tempfile.mkdtemp(prefix="tlr", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    port = _free_port()
    env = {**os.environ, "RAY_TMPDIR": tmp, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    ports = {
        "--port": port, "--dashboard-port": _free_port(), "--dashboard-agent-listen-port": _free_port(),
        "--ray-client-server-port": _free_port(), "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2",
           "--include-dashboard", "true", "--disable-usage-stats",
           *(str(x) for kv in ports.items() for x in kv)]  # fmt: skip
    log = open(Path(tmp) / "ray-start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address_file = Path(tmp) / "ray" / "ray_current_cluster"  # where Ray looks, given RAY_TMPDIR
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: {(Path(tmp) / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(0.5)
        env["RAY_ADDRESS"] = address_file.read_text().strip()
        yield env
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # --block stops the cluster it started on SIGTERM
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the rest of the session we started, at once
        except ProcessLookupError:
            pass
        proc.wait()
        # Anything of this cluster that left the process group still names its private temp dir.
        assert not _reap(_processes_mentioning(tmp), timeout_s=10), "Ray processes outlived the test cluster"
        log.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _processes_mentioning(text: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


@pytest.fixture
def ray_driver(ray_cluster: dict[str, str]) -> Iterator[None]:
    """This test process as a driver of the test cluster."""
    import ray

    assert not ray.is_initialized()
    ray.init(address=ray_cluster["RAY_ADDRESS"], logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


# --- validation: before any trial (and before Ray) ---------------------------------------------


@pytest.mark.parametrize(
    "space, key, message",
    [
        ({"optim.lrr": {"loguniform": [1e-4, 1e-2]}}, "optim.lrr", "not a spec field"),
        ({"optimizer.lr": {"loguniform": [1e-4, 1e-2]}}, "optimizer.lr", "not a spec field"),
        ({"optim.lr.x": {"choice": [1]}}, "optim.lr.x", "not a spec field"),
        ({"optim": {"choice": [{}]}}, "optim", "is a section"),
        ({"name": {"choice": ["a", "b"]}}, "name", "cannot be searched"),
        ({}, "tune.space", "empty"),
        ({"optim.lr": {"normal": [0, 1]}}, "optim.lr", "unknown distribution"),
        ({"optim.lr": {"uniform": [1e-3]}}, "optim.lr", "exactly"),
        ({"optim.lr": {"uniform": [1e-3, 1e-4]}}, "optim.lr", "low < high"),
        ({"optim.lr": {"loguniform": [0.0, 1e-3]}}, "optim.lr", "0 < low"),
        ({"optim.lr": {"choice": []}}, "optim.lr", "at least one"),
        ({"optim.lr": {"randint": [0.5, 2]}}, "optim.lr", "integers"),
        ({"optim.lr": {"uniform": [1e-4, 1e-2], "choice": [1]}}, "optim.lr", "one distribution"),
        ({"optim.lr": "auto"}, "optim.lr", "only for strategy.freeze_depth"),
        ({"strategy.layer_decay": {"uniform": [0.5, 1.5]}}, "strategy.layer_decay", "not a valid value"),
        ({"strategy.freeze_depth": {"uniform": [0, 3]}}, "strategy.freeze_depth", "not a valid value"),
        (
            {"strategy.freeze_depth": {"randint": [0, 6]}},
            "strategy.freeze_depth",
            "beyond test_resnet's 5 layer groups",
        ),
        ({"strategy.freeze_depth": {"choice": [1, "all", 9]}}, "strategy.freeze_depth", "beyond"),
        ({"strategy.unfreeze.2": {"randint": [0, 7]}}, "strategy.unfreeze.2", "beyond"),
        ({"strategy.unfreeze.9": {"randint": [0, 2]}}, "strategy.unfreeze.9", "loop.epochs"),
    ],
)
def test_bad_space_fails_before_any_trial(
    fashion_folders: tuple[str, str], tmp_path: Path, space: dict[str, Any], key: str, message: str
) -> None:
    import ray

    from tltrain.execution.tune import run_tune

    storage_uri = str(tmp_path / "runs")
    with pytest.raises(SpecError) as info:
        run_tune(parse_spec(_tree(fashion_folders, storage_uri, "bad", space)))
    text = str(info.value)
    assert key in text and message in text, text
    assert not ray.is_initialized(), "Ray was started before the space was validated"
    assert not (tmp_path / "runs" / "bad").exists(), "the sweep wrote to storage before validation"


def test_auto_and_inclusive_randint(fashion_folders: tuple[str, str], tmp_path: Path) -> None:
    from tltrain.execution.tune import _ray_domain

    spec = parse_spec(
        _tree(fashion_folders, str(tmp_path), "s", {"strategy.freeze_depth": "auto", "optim.lr": {"randint": [1, 2]}})
    )
    space = validate_space(spec, num_layer_groups=5)
    assert space["strategy.freeze_depth"] == Dist("randint", (0, 5))
    drawn = {_ray_domain(space["strategy.freeze_depth"]).sample() for _ in range(300)}
    assert drawn == {0, 1, 2, 3, 4, 5}, "randint must include both ends"


def test_depths_fit_every_searched_model(fashion_folders: tuple[str, str], tmp_path: Path) -> None:
    from tltrain.core.plan import count_layer_groups

    tree = _tree(fashion_folders, str(tmp_path), "m", {
        "model.name": {"choice": ["test_vit", "test_resnet"]}, "strategy.freeze_depth": "auto",
    })  # fmt: skip
    tree["model"]["name"] = "test_vit"  # 7 groups; test_resnet has 5
    spec = parse_spec(tree)

    def groups_of(variant: Any) -> int:
        return count_layer_groups(variant, 10)

    assert groups_of(spec) == 7
    space = validate_space(spec, num_layer_groups=7, groups_of=groups_of)
    assert space["strategy.freeze_depth"] == Dist("randint", (0, 5)), "auto must fit the model with fewest groups"
    tree["tune"]["space"]["strategy.freeze_depth"] = {"choice": [0, 6]}
    with pytest.raises(
        SpecError, match=r"tune.space.strategy.freeze_depth: depth 6 is beyond test_resnet \(coarse\)'s 5"
    ):
        validate_space(parse_spec(tree), num_layer_groups=7, groups_of=groups_of)


def test_unknown_metric_fails_before_any_trial(fashion_folders: tuple[str, str], tmp_path: Path) -> None:
    from tltrain.execution.tune import run_tune

    with pytest.raises(SpecError, match="tune.metric"):
        run_tune(parse_spec(_tree(fashion_folders, str(tmp_path), "m", SPACE, metric="val/accuracy")))


def test_no_tune_section(fashion_folders: tuple[str, str], tmp_path: Path) -> None:
    from tltrain.execution.tune import run_tune

    tree = _tree(fashion_folders, str(tmp_path), "n", SPACE)
    del tree["tune"]
    with pytest.raises(SpecError, match="tune"):
        run_tune(parse_spec(tree))


# --- a real sweep ------------------------------------------------------------------------------


def test_relative_paths_mean_the_drivers_directory_in_every_trial(
    fashion_folders: tuple[str, str], tmp_path: Path
) -> None:
    """Tune moves each trial process into its trial folder unless told not to; a relative
    storage.uri or data path must mean the driver's directory there too (local Ray, whose workers
    start in the driver's directory). Before the fix the runs landed under Ray's session folder
    and the sweep ended with "no trial produced a checkpoint"."""
    import shutil

    work = tmp_path / "work"
    for split, src in zip(("train", "val"), fashion_folders):
        shutil.copytree(src, work / "data" / split)
    tree = _tree(("data/train", "data/val"), "runs", "rel", {"optim.lr": {"choice": [1.0e-3, 3.0e-3]}}, num_samples=2)
    tree["loop"].update(epochs=1, max_steps_per_epoch=3)
    tree["tune"]["scheduler"] = {"kind": "fifo"}
    tree["scaling"]["address"] = "local"
    (work / "spec.yaml").write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    res = subprocess.run([sys.executable, "-m", "tltrain.cli", "tune", "spec.yaml", "--json"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert [t["epochs"] for t in summary["trials"]] == [1, 1], summary["trials"]
    best = Path(summary["best_checkpoint"])
    assert best.is_relative_to(work / "runs" / "rel" / "runs") and (best / "MANIFEST.json").is_file(), best


def _evaluate_checkpoint(checkpoint_uri: str, tmp: Path) -> tuple[float, dict[str, Any]]:
    """Load a checkpoint from storage and evaluate it exactly as ray_train.worker_fn builds val."""
    import torch

    from tltrain import storage
    from tltrain.core.checkpoint import load_meta, load_model_state, verify_checkpoint
    from tltrain.core.loop import evaluate
    from tltrain.core.model import build_model
    from tltrain.data.loaders import build_eval_loader, build_transform
    from tltrain.execution.preflight import build_plan
    from tltrain.spec.schema import JobSpec

    local = tmp / "best"
    storage.download_tree(checkpoint_uri, str(local))
    verify_checkpoint(local)
    meta = load_meta(local)
    spec = JobSpec.model_validate(meta.spec)
    plan = build_plan(spec)
    model = build_model(spec.model.model_copy(update={"weights": None}), len(plan.class_names))
    model.load_state_dict(load_model_state(local))
    loader = build_eval_loader(
        plan.val, build_transform(plan.data_config, False), spec.scaling.batch_size_per_worker, 0, 1, 0
    )
    val = evaluate(model, loader, torch.device("cpu"), len(plan.class_names), spec.loop.precision, False)
    return val["val/acc"], meta


def test_sweep_asha_best_checkpoint_and_tracking(
    fashion_folders: tuple[str, str], s3_bucket: str, tmp_path: Path, ray_driver: None
) -> None:
    from mlflow import MlflowClient

    from tltrain import storage
    from tltrain.execution.tune import run_tune

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tree = _tree(fashion_folders, f"{s3_bucket}/sweeps", "sweep", SPACE)
    tree["tracking"] = {"enabled": True, "uri": db, "experiment": "tune-test"}
    spec = parse_spec(tree)
    t0 = time.monotonic()
    summary = run_tune(spec)
    print(f"sweep took {time.monotonic() - t0:.0f}s")
    json.dumps(summary)  # the --json object

    trials = summary["trials"]
    assert len(trials) == 6 and summary["num_trials"] == 6
    assert all(t["status"] == "TERMINATED" for t in trials), trials
    for key in ("metric", "best_metric", "best_checkpoint", "best_config", "cost_worker_s", "trials"):
        assert key in summary
    for t in trials:
        assert set(t) >= {"trial_id", "config", "best_metric", "epochs", "stopped_early", "cost_worker_s", "pareto"}
        assert set(t["config"]) == set(SPACE)
        assert 0 <= t["config"]["strategy.freeze_depth"] <= 5
        assert 1 <= t["epochs"] <= EPOCHS and t["cost_worker_s"] > 0
    # ASHA stopped at least one trial before its last epoch.
    stopped = [t for t in trials if t["stopped_by"] == "asha"]
    assert stopped and all(t["epochs"] < EPOCHS and t["stopped_early"] for t in stopped), trials
    assert any(t["epochs"] == EPOCHS for t in trials)
    # Best is the max over trials, listed first; cost adds up; a pareto front exists.
    assert summary["best_metric"] == max(t["best_metric"] for t in trials) == trials[0]["best_metric"]
    assert summary["best_config"] == trials[0]["config"]
    assert summary["cost_worker_s"] == pytest.approx(sum(t["cost_worker_s"] for t in trials))
    assert trials[0]["pareto"]

    # The best checkpoint exists in storage (keep=1 deleted the others), loads and reproduces the metric.
    best_uri = summary["best_checkpoint"]
    assert best_uri.startswith(f"{s3_bucket}/sweeps/sweep/runs/sweep-{summary['best_trial_id']}/checkpoint_")
    acc, meta = _evaluate_checkpoint(best_uri, tmp_path)
    assert acc == pytest.approx(summary["best_metric"], abs=1e-9)
    assert meta.metrics["val/acc"] == pytest.approx(summary["best_metric"], abs=1e-9)
    for key, value in summary["best_config"].items():
        section, field = key.split(".")
        assert meta.spec[section][field] == pytest.approx(value)

    # MLflow: a parent run for the sweep and one finished child per trial with per-epoch metrics.
    client = MlflowClient(tracking_uri=db)
    exp = client.get_experiment_by_name("tune-test")
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.metrics["best/val/acc"] == pytest.approx(summary["best_metric"])
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == sorted(f"sweep-{t['trial_id']}" for t in trials)
    assert all(c.info.status == "FINISHED" for c in children)
    by_name = {c.info.run_name: c for c in children}
    for t in trials:
        history = client.get_metric_history(by_name[f"sweep-{t['trial_id']}"].info.run_id, "val/acc")
        assert sorted(m.step for m in history) == list(range(1, t["epochs"] + 1))
        # Each trial's best is the best epoch it reported (its best checkpoint, not its last).
        assert t["best_metric"] == pytest.approx(max(m.value for m in history)), (t, [m.value for m in history])

    # Never overwrite: the same name again without --resume is refused before anything runs.
    with pytest.raises(SpecError, match="--resume"):
        run_tune(spec)
    assert storage.exists(best_uri)


# --- kill the driver, then --resume ------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _reap(pids: set[int], timeout_s: float = 60.0) -> set[int]:
    """Wait for processes we started (a killed driver's Ray) to exit; SIGKILL stragglers by pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.5)
    left = {p for p in pids if _alive(p)}
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _cli(spec_path: Path, *extra: str, env: dict[str, str], stderr: Any) -> subprocess.Popen:
    # stdout: our progress lines and, last, the --json summary; Ray's own logs go to stderr.
    cmd = [sys.executable, "-m", "tltrain.cli", "tune", str(spec_path), "--json", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, bufsize=1)


def _epochs_of(tid: str, text: str) -> list[int]:
    return [int(x.split("epoch ")[1].split("/")[0]) for x in text.splitlines() if x.startswith(f"[{tid}] epoch ")]


def _done_of(text: str) -> list[str]:
    return [x.split("]")[0].lstrip("[") for x in text.splitlines() if x.startswith("[") and "] done:" in x]


@pytest.mark.parametrize("stop", ["sigkill", "ctrl-c"])
def test_stop_driver_then_resume(
    fashion_folders: tuple[str, str], s3_bucket: str, tmp_path: Path, ray_cluster: dict[str, str], stop: str
) -> None:
    """SIGKILL: the driver dies at once. Ctrl-C (SIGINT): Tune saves its state and stops the running
    trials, marking them TERMINATED; tltrain must not take those as finished. Either way --resume
    keeps the finished trials and continues the others from their checkpoints."""
    from tltrain import storage
    from tltrain.execution.sweep_store import sweep_paths
    from tltrain.spec.load import load_spec

    num_samples = 4
    # ASHA's first rung at epoch 2: a trial that has reported epoch 1 cannot have been stopped yet.
    tree = _tree(fashion_folders, f"{s3_bucket}/sweeps", stop, SPACE, num_samples=num_samples, seed=1)
    tree["tune"]["scheduler"]["grace_epochs"] = 2
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tree))
    paths = sweep_paths(load_spec(spec_path))
    env = ray_cluster  # drivers attach to the test's cluster via RAY_ADDRESS; it outlives them
    log_lines: list[str] = []

    # Stop the driver once a trial has finished while another has checkpointed epoch 1 only (so
    # --resume has a trial to keep and one to continue from its checkpoint).
    err_log = open(tmp_path / "driver-stderr.log", "w")
    proc = _cli(spec_path, env=env, stderr=err_log)
    done: list[str] = []
    partway: set[str] = set()
    deadline = time.monotonic() + 400
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            log_lines.append(line)
            tid = line.split("]")[0].lstrip("[") if line.startswith("[") else None
            if tid and "] done:" in line:
                done.append(tid)
            if tid and "] epoch " in line:
                (partway.add if line.startswith(f"[{tid}] epoch 1/") else partway.discard)(tid)
            if (done and partway - set(done)) or time.monotonic() > deadline:
                break
        assert done and partway - set(done), "".join(log_lines)
        children = _descendants(proc.pid)
    finally:
        if stop == "ctrl-c":
            proc.send_signal(signal.SIGINT)
            try:
                rest, _ = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                rest, _ = proc.communicate()
            log_lines.append(rest)
        else:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            proc.stdout.close()
    assert not _reap(children), "processes outlived the stopped driver"
    before_stop = "".join(log_lines)
    if stop == "ctrl-c":
        assert proc.returncode == 130, before_stop
        assert "interrupted:" in before_stop and "--resume" in before_stop, before_stop
    # A trial that printed "done" before the driver stopped is finished; one that had not reached
    # its last epoch is not, and must have no record (or --resume would take it as done).
    done = _done_of(before_stop)
    partway = {t for t in partway if t not in done and max(_epochs_of(t, before_stop)) < EPOCHS}
    assert len(done) < num_samples and partway, before_stop
    assert not any(storage.exists(paths.done_uri(tid)) for tid in partway), before_stop

    # Snapshot what the finished trials left in storage; --resume must not touch it.
    before = {tid: storage.list_files(paths.run_uri(tid)) for tid in done}
    records_before = {tid: storage.list_files(paths.done_uri(tid)) for tid in done}
    assert all(any(f.startswith("checkpoint_") for f in files) for files in before.values()), before

    # A plain re-run is refused (exit 2, before anything runs); --resume continues the same search.
    refused = subprocess.run(
        [sys.executable, "-m", "tltrain.cli", "tune", str(spec_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert refused.returncode == 2 and "--resume" in refused.stderr, refused.stderr

    resumed = _cli(spec_path, "--resume", env=env, stderr=err_log)
    out, _ = resumed.communicate(timeout=500)
    err_log.close()
    (tmp_path / "driver.log").write_text(before_stop + "--- resume ---\n" + out)
    assert resumed.returncode == 0, before_stop + "--- resume ---\n" + out
    summary = json.loads(out.strip().splitlines()[-1])

    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert len(trials) == num_samples, before_stop
    brief = "; ".join(f"{tid} {t['status']} {t['epochs']} {t['stopped_by']} {t['error']}" for tid, t in trials.items())
    assert all(t["status"] == "TERMINATED" and t["epochs"] >= 1 for t in trials.values()), (
        f"{brief} (driver output: {tmp_path / 'driver.log'})"
    )
    assert set(done) <= set(trials)
    for tid in done:
        assert storage.list_files(paths.run_uri(tid)) == before[tid], f"trial {tid} trained again after --resume"
        assert storage.list_files(paths.done_uri(tid)) == records_before[tid]
        assert f"[{tid}] epoch" not in out, f"trial {tid} trained again after --resume"
    # Trials that had reported (so checkpointed) an epoch when the driver stopped continued from it.
    for tid in set(trials) - set(done):
        before_epochs, after_epochs = _epochs_of(tid, before_stop), _epochs_of(tid, out)
        if tid in partway:
            assert after_epochs and min(after_epochs) > 1, f"trial {tid} did not go on from epoch 1: {after_epochs}"
        if before_epochs and after_epochs:
            assert min(after_epochs) > max(before_epochs), (
                f"trial {tid} repeated epochs: {before_epochs} then {after_epochs}"
            )
    assert summary["best_metric"] == max(t["best_metric"] for t in trials.values())
    assert storage.exists(summary["best_checkpoint"] + "/MANIFEST.json")


def test_optuna_searcher_is_seeded_and_inclusive(fashion_folders: tuple[str, str], tmp_path: Path) -> None:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from tltrain.execution.tune import _ray_domain

    spec = parse_spec(_tree(fashion_folders, str(tmp_path), "o", SPACE))
    param_space = {k: _ray_domain(d) for k, d in validate_space(spec, num_layer_groups=5).items()}

    def draws(seed: int, n: int) -> list[dict[str, Any]]:
        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))
        assert searcher.set_search_properties("val/acc", "max", param_space)
        return [searcher.suggest(f"t{i}") for i in range(n)]

    first = draws(0, 60)
    assert first[:8] == draws(0, 8), "the same seed must repeat the same samples"
    assert first[:8] != draws(1, 8)
    assert {d["strategy.freeze_depth"] for d in first} == {0, 1, 2, 3, 4, 5}
    assert all(1.0e-3 <= d["optim.lr"] <= 1.0e-2 and 0.5 <= d["strategy.layer_decay"] <= 1.0 for d in first)


def test_summary_orders_best_first_and_marks_the_cost_front(fashion_folders: tuple[str, str], tmp_path: Path) -> None:
    from tltrain.reports.sweep import summarize

    spec = parse_spec(_tree(fashion_folders, str(tmp_path), "s", SPACE))

    def rec(tid: str, best: float | None, cost: float, stopped: str | None = None) -> dict[str, Any]:
        return {
            "trial_id": tid, "config": {"optim.lr": 1e-3}, "status": "TERMINATED" if best is not None else "ERROR",
            "error": None, "best_metric": best, "best_checkpoint": f"/ckpt/{tid}" if best is not None else None,
            "epochs": 2 if stopped else 4, "stopped_early": stopped is not None, "stopped_by": stopped,
            "cost_worker_s": cost, "gpu_hours": 0.0, "history": [],
        }  # fmt: skip

    summary = summarize(spec, "s3://b/sweeps/x", [rec("a", 0.5, 10.0), rec("b", 0.7, 40.0), rec("c", 0.6, 5.0, "asha"),
                               rec("d", 0.4, 20.0), rec("e", None, 1.0)])  # fmt: skip
    assert [t["trial_id"] for t in summary["trials"]] == ["b", "c", "a", "d", "e"]
    assert summary["best_metric"] == 0.7 and summary["best_checkpoint"] == "/ckpt/b" and summary["best_trial_id"] == "b"
    assert {t["trial_id"] for t in summary["trials"] if t["pareto"]} == {"b", "c"}
    assert summary["cost_worker_s"] == 76.0 and summary["num_stopped_early"] == 1 and summary["num_errored"] == 1
    assert all("history" not in t for t in summary["trials"])

    # The printed table: best first, and a GPU-hours column only when trials used GPUs.
    import io

    from tltrain.reports.sweep import print_table

    table = io.StringIO()
    print_table(summary, ["optim.lr"], table)
    lines = table.getvalue().splitlines()
    assert lines[0].split() == ["trial", "optim.lr", "val/acc", "epochs", "stop", "worker-s", "pareto"]
    assert [line.split()[0] for line in lines[1:6]] == ["b", "c", "a", "d", "e"]
    on_gpu = [{**rec("a", 0.5, 7200.0), "gpu_hours": 2.0}, rec("b", 0.7, 40.0)]
    table = io.StringIO()
    print_table(summarize(spec, "s3://b/sweeps/x", on_gpu), ["optim.lr"], table)
    header, first = table.getvalue().splitlines()[:2]
    assert "GPU-h" in header.split() and first.split()[0] == "b" and "2.000 GPU-hours" in table.getvalue()
