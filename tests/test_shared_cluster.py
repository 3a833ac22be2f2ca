"""Safe on a shared machine: one writer per run and per sweep (the lease in the run's folder, on
local disk and on S3), and a sweep that runs to the end beside another Ray instance on the machine
with every placement group released."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ray_nodes import free_port
from tltrain import storage
from tltrain.storage.lease import LEASE_FILE, STALE_S, LeaseHeld, LeaseInfo, _store, acquire


def _tltrain(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tltrain.cli", *args], cwd=cwd, env=env or os.environ.copy(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


# ---- the lease itself: simultaneous starts, dead and foreign owners ---------------------------------


def _contend(folder: str, barrier, results) -> None:  # noqa: ANN001
    barrier.wait()  # every contender released at the same instant
    try:
        lease = acquire(folder, "same-name", "run", heartbeat=False)
    except LeaseHeld as err:
        results.put(("refused", str(err)))
        return
    results.put(("won", os.getpid()))
    time.sleep(2.0)  # still holding while the others decide
    lease.release()


def _race(folder: str, contenders: int = 4) -> list[tuple[str, object]]:
    ctx = mp.get_context("spawn")  # boto3 clients must not cross a fork
    barrier, results = ctx.Barrier(contenders), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(folder, barrier, results)) for _ in range(contenders)]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_of_simultaneous_starts_exactly_one_wins_and_the_others_name_it(where: str, tmp_path: Path, request) -> None:  # noqa: ANN001
    base = request.getfixturevalue("s3_bucket") + "/runs" if where == "s3" else str(tmp_path / "runs")
    for attempt in range(3):
        folder = f"{base}/race-{attempt}"
        out = _race(folder)
        winners = [pid for kind, pid in out if kind == "won"]
        assert len(winners) == 1, out
        for kind, message in out:
            if kind == "refused":
                assert f"pid {winners[0]} on {socket.gethostname()}" in str(message) and "--force-unlock" in str(
                    message
                )
        assert storage.read_lease(folder) is None  # released by the winner


def _plant(folder: str, **fields: object) -> None:
    now = time.time()
    info = LeaseInfo(name="planted", kind="run", host="other-host", pid=4242, pid_started="1", started_at=now - 600,
                     heartbeat_at=now, token="t-planted")  # fmt: skip
    for key, value in fields.items():
        setattr(info, key, value)
    store = _store(folder)
    with store.exclusive():
        store.write(info, store.read()[1])


def test_dead_owners_are_taken_over_and_live_foreign_ones_refuse(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    # Another host, fresh heartbeat: refused, even though no process of ours could check it.
    _plant(str(runs / "fresh"))
    with pytest.raises(LeaseHeld, match=r"pid 4242 on other-host, started .*, last heartbeat 0s ago"):
        acquire(str(runs / "fresh"), "fresh", "run", heartbeat=False)
    # Another host, heartbeat older than STALE_S: dead, taken over.
    _plant(str(runs / "stale"), heartbeat_at=time.time() - STALE_S - 5)
    acquire(str(runs / "stale"), "stale", "run", heartbeat=False).release()
    # This host, a pid that no longer runs (a SIGKILLed driver): free at once.
    gone = subprocess.Popen(["true"])
    gone.wait()
    _plant(str(runs / "killed"), host=socket.gethostname(), pid=gone.pid)
    lease = acquire(str(runs / "killed"), "killed", "run", heartbeat=False)
    assert storage.read_lease(str(runs / "killed")).token == lease.info.token  # type: ignore[union-attr]
    # `--force-unlock` takes even a live-looking one.
    acquire(str(runs / "fresh"), "fresh", "run", force=True, heartbeat=False).release()
    _plant(str(runs / "fresh"))

    listing = subprocess.run(
        [sys.executable, "-m", "tltrain.cli", "runs", str(runs), "--json"], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    rows = {r["name"]: r for r in json.loads(listing.stdout.strip().splitlines()[-1])["runs"]}
    assert rows["fresh"]["state"] == "live" and "other-host" in rows["fresh"]["owner"]
    assert rows["killed"]["state"] == "live" and f"pid {os.getpid()}" in rows["killed"]["owner"]  # ours, held
    assert rows["stale"]["state"] == "free"
    lease.release()


def test_a_heartbeat_keeps_the_lease_fresh_and_a_takeover_is_noticed(tmp_path: Path) -> None:
    folder = str(tmp_path / "beat")
    lease = acquire(folder, "beat", "run", heartbeat=False)
    before = storage.read_lease(folder).heartbeat_at  # type: ignore[union-attr]
    time.sleep(0.05)
    lease.refresh(ray_job_id="01000000")
    after = storage.read_lease(folder)
    assert after is not None and after.heartbeat_at > before and after.ray_job_id == "01000000"
    _plant(folder)  # another process forced it
    lease.refresh()
    assert lease.lost
    lease.release()
    assert storage.read_lease(folder).name == "planted"  # type: ignore[union-attr]  # not deleted by the loser


# ---- through the CLI and real Ray ------------------------------------------------------------------


def _spec(tmp_path: Path, fashion: tuple[str, str], name: str, storage_uri: str, **extra: object) -> Path:
    train, val = fashion
    tree = {
        "name": name,
        "model": {"name": "test_resnet"},
        "data": {"train": train, "val": val, "image_size": 32, "loader_workers": 0},
        "optim": {"lr": 3.0e-3},
        "loop": {"epochs": 2, "precision": "fp32", "max_steps_per_epoch": 6, "seed": 0},
        "scaling": {"num_workers": 1, "batch_size_per_worker": 16, "address": "local"},
        "storage": {"uri": storage_uri, "keep": 1},
        "tracking": {"enabled": False},
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.integration
def test_two_train_starts_of_one_name_on_s3_one_trains_the_other_is_refused(
    tmp_path: Path, fashion_folders: tuple[str, str], s3_bucket: str
) -> None:
    spec = _spec(tmp_path, fashion_folders, "twice", f"{s3_bucket}/runs")
    procs = [_tltrain("train", str(spec), "--json", cwd=tmp_path) for _ in range(2)]  # started together
    outs = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in outs)
    assert codes == [0, 3], [(rc, err[-2000:]) for rc, _, err in outs]
    (winner,) = [o for o in outs if o[0] == 0]
    (loser,) = [o for o in outs if o[0] == 3]
    winner_pid = next(p.pid for p, o in zip(procs, outs) if o[0] == 0)
    assert f"run 'twice' is in use: {s3_bucket}/runs/twice/{LEASE_FILE} is held by pid {winner_pid}" in loser[2]
    assert "epoch" not in loser[1] and "Traceback" not in loser[2]  # refused before Ray started anything
    # The folder holds one run's checkpoints (keep 1 = the best, plus the latest) and no lease.
    files = storage.list_files(f"{s3_bucket}/runs/twice")
    checkpoints = {f.split("/")[0] for f in files if f.startswith("checkpoint_")}
    assert 1 <= len(checkpoints) <= 2 and LEASE_FILE not in files
    assert json.loads(winner[1].strip().splitlines()[-1])["epochs_completed"] == 2


@pytest.fixture
def other_ray_instance() -> Iterator[None]:
    """A second Ray instance on this machine (a colleague's), started by `ray start` and stopped by its pid."""
    tmp = tempfile.mkdtemp(prefix="tlo", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": tmp}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "1",
           "--port", str(free_port()), "--dashboard-port", str(free_port()), "--disable-usage-stats"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (Path(tmp) / "ray" / "ray_current_cluster").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "ray start failed"
        time.sleep(0.5)
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.integration
def test_a_sweep_beside_another_ray_instance_finishes_and_frees_every_placement_group(
    tmp_path: Path, fashion_folders: tuple[str, str], other_ray_instance: None, capfd: pytest.CaptureFixture
) -> None:
    import ray

    from tltrain.execution.tune import run_tune
    from tltrain.spec import load_spec

    if ray.is_initialized():  # an earlier test's driver connection
        ray.shutdown()
    tune = {
        "num_samples": 4, "metric": "val/acc", "mode": "max", "searcher": "random", "seed": 0,
        "max_concurrent_trials": 2, "scheduler": {"kind": "asha", "grace_epochs": 1, "reduction_factor": 2},
        "space": {"optim.lr": {"loguniform": [1.0e-4, 3.0e-2]}},
    }  # fmt: skip
    path = _spec(tmp_path, fashion_folders, "beside", str(tmp_path / "runs"), tune=tune)
    path.write_text(path.read_text().replace("epochs: 2", "epochs: 3"))
    second = None
    try:
        with open(tmp_path / "sweep.out", "w") as out:
            import threading

            def start_second_once_held() -> None:
                nonlocal second
                while storage.read_lease(str(tmp_path / "runs" / "beside")) is None:
                    time.sleep(0.2)
                second = subprocess.run(
                    [sys.executable, "-m", "tltrain.cli", "tune", str(path)],
                    cwd=tmp_path, capture_output=True, text=True, timeout=300,
                )  # fmt: skip

            thread = threading.Thread(target=start_second_once_held)
            thread.start()
            summary = run_tune(load_spec(path), out=out)
            thread.join(timeout=300)
        assert summary["num_trials"] == 4 and summary["num_errored"] == 0
        assert summary["num_stopped_early"] >= 1  # ASHA stopped some (their groups must be freed too)
        time.sleep(3)  # the cleaners and controllers exit asynchronously
        table = ray.util.placement_group_table()
        assert table and all(pg["state"] == "REMOVED" for pg in table.values()), table
    finally:
        ray.shutdown()
    assert second is not None and second.returncode == 3, second
    assert "sweep 'beside' is in use" in second.stderr
    captured = capfd.readouterr()
    logs = captured.out + captured.err + (tmp_path / "sweep.out").read_text()
    assert "multiple active Ray instances" not in logs and "Traceback" not in logs, logs[-3000:]


@pytest.mark.integration
def test_a_sweep_that_cannot_get_its_workers_says_what_it_waits_for(
    tmp_path: Path, fashion_folders: tuple[str, str]
) -> None:
    from tltrain.execution.resource_watch import WAIT_WARN_S

    workers = (os.cpu_count() or 2) + 2  # more CPUs than this machine's local Ray has
    tune = {"num_samples": 2, "metric": "val/acc", "mode": "max", "space": {"optim.lr": {"choice": [1e-3, 3e-3]}}}
    path = _spec(tmp_path, fashion_folders, "starved", str(tmp_path / "runs"), tune=tune)
    path.write_text(path.read_text().replace("num_workers: 1", f"num_workers: {workers}"))
    proc = _tltrain("tune", str(path), cwd=tmp_path)
    assert proc.stdout is not None
    started, line = time.monotonic(), ""
    try:
        while "waiting" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the sweep ended without saying it waited"
            assert time.monotonic() - started < WAIT_WARN_S + 90, "no resource line in time"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as a user would once told
        out, err = proc.communicate(timeout=120)
    waited = time.monotonic() - started
    assert f"asks for {workers} bundle(s), CPU {workers:g} in all" in line, line
    assert "free of CPU" in line and "scaling.num_workers" in line, line
    assert waited >= WAIT_WARN_S
    assert proc.returncode == 130, err[-2000:]


def test_the_wait_line_names_the_request_what_is_free_and_who_holds_the_rest() -> None:
    from tltrain.execution.resource_watch import describe_wait

    table = {
        "a": {"placement_group_id": "aaaaaaaa11", "state": "PENDING", "strategy": "SPREAD",
              "bundles": {0: {"CPU": 1.0, "GPU": 1.0}, 1: {"CPU": 1.0, "GPU": 1.0}}},
        "t": {"placement_group_id": "tttttttt11", "state": "CREATED", "name": "", "bundles": {0: {"memory": 1.0}}},
        "h": {"placement_group_id": "hhhhhhhh11", "state": "CREATED", "name": "nb",
              "bundles": {0: {"CPU": 4.0, "GPU": 1.0}}},
    }  # fmt: skip
    line = describe_wait(table["a"], 31.2, table, {"CPU": 4.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0})
    assert line.startswith("waiting 31s for resources: placement group aaaaaaaa (SPREAD) asks for 2 bundle(s)")
    assert "CPU 2, GPU 2 in all; the cluster has CPU 4 free of CPU 8, GPU 1" in line
    assert "held by 1 placement group(s): hhhhhhhh nb: CPU 4, GPU 1." in line  # Tune's 0-CPU holder left out
