"""Small trials on a shared GPU: the packing arithmetic, the spec's refusals, the trainer's resources,
and a sweep on a local Ray with a fake GPU whose trials share it two at a time.

The sweep runs on a machine without CUDA: its local Ray is started as `tltrain` starts one, its node
told it has 1 GPU (RAY_OVERRIDE_RESOURCES, Ray's own switch) and TLTRAIN_FAKE_GPUS=1 set, so Ray
schedules GPU shares as on a real GPU while each trial's worker trains on CPU with gloo. How many trials ran at once is counted twice: from when each trial's GPU share
was held (its worker group's placement group, polled during the sweep), and from the trials' own
training times (each Train run's last checkpoint is named by the time of its last report, and its
epochs' wall times, set-up included, sum back to when its worker started).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tltrain.spec import packing
from tltrain.spec.load import parse_spec
from tltrain.spec.schema import SpecError

GIB = 1024**3


def _tree(**sections: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "name": "pack",
        "model": {"name": "test_resnet"},
        "data": {"train": "/nowhere/train", "val_fraction": 0.2},
    }
    for name, fields in sections.items():
        tree[name] = {**tree.get(name, {}), **fields}
    return tree


def _refused(tree: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(tree)
    return str(info.value)


# --- the arithmetic -------------------------------------------------------------------------------


def test_the_granularity_is_rays() -> None:
    from ray._private.ray_constants import MIN_RESOURCE_GRANULARITY

    assert packing.GPU_GRANULARITY == MIN_RESOURCE_GRANULARITY


def test_a_share_of_1_over_k_lets_exactly_k_trials_onto_a_gpu() -> None:
    assert [packing.gpu_fraction(k) for k in (1, 2, 3, 4, 8)] == [1.0, 0.5, 0.3333, 0.25, 0.125]
    units = round(1 / packing.GPU_GRANULARITY)
    for k in range(1, packing.MAX_TRIALS_PER_GPU + 1):
        share = packing.gpu_fraction(k)
        # Ray keeps resources in whole units of its granularity; rounded or truncated, k fit and k + 1 do not.
        for held in (int(share * units), round(share * units)):
            assert k * held <= units < (k + 1) * held, (k, share, held)
    for bad in (0, packing.MAX_TRIALS_PER_GPU + 1):
        with pytest.raises(ValueError):
            packing.gpu_fraction(bad)


def test_trials_per_gpu_from_the_measured_peak() -> None:
    total = 1000
    # 90 % of 1000 = 900; a peak of 360 x 1.25 safety = 450 per trial: exactly 2, one byte more: 1.
    assert packing.trials_per_gpu_for(360, total) == 2
    assert packing.trials_per_gpu_for(361, total) == 1
    assert packing.trials_per_gpu_for(240, total) == 3  # 300 per trial
    # What the process holds outside the allocator counts per trial: 240 x 1.25 + 60 = 360 -> 2.
    assert packing.trials_per_gpu_for(240, total, context_bytes=60) == 2
    # A peak above 90 % of the device (or above the device) still runs, alone.
    assert packing.trials_per_gpu_for(950, total) == 1
    assert packing.trials_per_gpu_for(5000, total) == 1
    # A small model on a big GPU: 1.1 GiB peak + 0.5 GiB context on 140 GiB would be 68; capped.
    assert packing.trials_per_gpu_for(int(1.1 * GIB), 140 * GIB, int(0.5 * GIB)) == packing.MAX_AUTO_TRIALS_PER_GPU
    # H200-sized: 30 GiB peak -> 37.5 + 0.5 GiB each in 126 GiB -> 3.
    assert packing.trials_per_gpu_for(30 * GIB, 140 * GIB, GIB // 2) == 3
    for peak, size in ((0, total), (100, 0), (-1, total)):
        with pytest.raises(ValueError):
            packing.trials_per_gpu_for(peak, size)


def test_trials_that_fit_and_run_at_once() -> None:
    fit = packing.trials_that_fit
    assert fit(8, 0, 2, 1.0, 0.0) == 4  # CPU trials: CPUs / (workers x cpus)
    assert fit(16, 4, 2, 1.0, 1.0) == 2  # 2-worker trials, a GPU each
    assert fit(16, 1, 1, 1.0, 0.5) == 2  # k = 2 on G = 1
    assert fit(16, 2, 1, 1.0, packing.gpu_fraction(3)) == 6  # k x G
    assert fit(64, 8, 1, 1.0, packing.gpu_fraction(8)) == 64
    assert fit(16, 2, 1, 1.0, 0.4) == 4  # a share never spans two GPUs: 2 x floor(2.5), not floor(5)
    assert fit(3, 1, 1, 1.0, 0.25) == 3  # the CPUs bind before the GPU's 4 slots
    assert fit(16, 0, 1, 1.0, 0.5) == 0  # no GPU: nothing fits now
    assert fit(0.5, 1, 1, 1.0, 0.5) == 0
    at_once = packing.trials_at_once
    assert at_once(6, 8, None) == 6
    assert at_once(10, 4, None) == 4  # never more than the trials there are
    assert at_once(0, 4, None) == 1  # a cluster that holds none now may grow: one at a time
    assert at_once(6, 8, 3) == 3  # tune.max_concurrent_trials wins
    assert at_once(2, 4, 10) == 4


def test_the_measurement_line_says_what_was_measured_and_k() -> None:
    line = packing.describe_measurement(
        int(1.1 * GIB), GIB // 2, 140 * GIB, 8, "tf_efficientnet_lite0 at batch 256", "H200"
    )
    assert line.startswith("tune.trials_per_gpu auto: two training steps of tf_efficientnet_lite0 at batch 256")
    assert "1.10 GiB" in line and "140.0 GiB" in line and "8 trial(s) per GPU (capped at 8)" in line
    assert "0.125 GPU each" in line
    assert "capped" not in packing.describe_measurement(30 * GIB, GIB // 2, 140 * GIB, 3, "m", "H200")


# --- the spec refuses what cannot work -------------------------------------------------------------


@pytest.mark.parametrize(
    "sections, needles",
    [
        ({"scaling": {"gpus_per_worker": 0.5}}, ["scaling.gpus_per_worker 0.5", "scaling.use_gpu is false"]),
        ({"scaling": {"use_gpu": True, "gpus_per_worker": 2}}, ["scaling.gpus_per_worker 2", "scaling.num_workers"]),
        (
            {"scaling": {"use_gpu": True, "gpus_per_worker": 0.5, "num_workers": 2}},
            ["scaling.gpus_per_worker 0.5", "only a 1-worker run", "scaling.num_workers 1"],
        ),
        ({"scaling": {"use_gpu": True, "gpus_per_worker": 0}}, ["scaling.gpus_per_worker 0", "0.0001"]),
        ({"scaling": {"use_gpu": True, "gpus_per_worker": 0.00001}}, ["scaling.gpus_per_worker 1e-05", "0.0001"]),
        ({"tune": {"trials_per_gpu": 2}}, ["tune.trials_per_gpu 2", "scaling.use_gpu true"]),
        (
            {"scaling": {"use_gpu": True, "num_workers": 2}, "tune": {"trials_per_gpu": 2}},
            ["tune.trials_per_gpu 2", "scaling.num_workers is 2", "scaling.num_workers 1"],
        ),
        (
            {"scaling": {"use_gpu": True, "num_workers": 2}, "tune": {"trials_per_gpu": "auto"}},
            ["tune.trials_per_gpu auto", "scaling.num_workers is 2"],
        ),
        (
            {"scaling": {"use_gpu": True, "gpus_per_worker": 0.5}, "tune": {"trials_per_gpu": 2}},
            ["tune.trials_per_gpu 2 and scaling.gpus_per_worker 0.5", "keep one"],
        ),
        ({"scaling": {"use_gpu": True}, "tune": {"trials_per_gpu": 0}}, ["tune.trials_per_gpu", "use 1..64"]),
        ({"scaling": {"use_gpu": True}, "tune": {"trials_per_gpu": 65}}, ["tune.trials_per_gpu", "use 1..64"]),
        ({"scaling": {"use_gpu": True}, "tune": {"trials_per_gpu": "half"}}, ["tune.trials_per_gpu", "'auto'"]),
    ],
)
def test_bad_gpu_shares_are_refused_naming_the_field(sections: dict[str, Any], needles: list[str]) -> None:
    text = _refused(_tree(**sections))
    assert all(n in text for n in needles), text


def test_good_gpu_shares_parse() -> None:
    spec = parse_spec(_tree(scaling={"use_gpu": True, "gpus_per_worker": 0.25}))
    assert spec.scaling.gpus_per_worker == 0.25
    spec = parse_spec(_tree(scaling={"use_gpu": True}, tune={"trials_per_gpu": "auto"}))
    assert spec.tune is not None and spec.tune.trials_per_gpu == "auto" and spec.scaling.gpus_per_worker is None
    assert parse_spec(_tree(scaling={"use_gpu": True, "num_workers": 4})).scaling.gpus_per_worker is None


def test_a_searched_worker_count_cannot_break_the_packing() -> None:
    from tltrain.spec.search import validate_space

    spec = parse_spec(
        _tree(
            scaling={"use_gpu": True},
            tune={"trials_per_gpu": 2, "space": {"scaling.num_workers": {"choice": [1, 2]}}},
        )
    )
    with pytest.raises(SpecError) as info:
        validate_space(spec, 5)
    assert "tune.space.scaling.num_workers: 2 is not a valid value" in str(info.value)
    assert "tune.trials_per_gpu 2 packs 1-worker trials" in str(info.value)


def test_auto_is_refused_on_a_cluster_without_gpus() -> None:
    from tltrain.execution.packing import require_gpus_for_auto

    with pytest.raises(SpecError) as info:
        require_gpus_for_auto({"CPU": 16.0})
    text = str(info.value)
    assert "tune.trials_per_gpu auto" in text and "has none" in text and "set tune.trials_per_gpu to a number" in text
    require_gpus_for_auto({"CPU": 16.0, "GPU": 1.0})


# --- what the sweep and the trainer ask Ray for ----------------------------------------------------


def test_concurrency_is_k_trials_per_gpu_times_the_gpus() -> None:
    from tltrain.execution.tune import _max_concurrent
    from tltrain.spec.space import Dist

    def spec(**tune: Any) -> Any:
        return parse_spec(_tree(scaling={"use_gpu": True}, tune={"num_samples": 20, **tune}))

    cluster = {"CPU": 64.0, "GPU": 2.0}
    assert _max_concurrent(spec(), {}, cluster) == 2  # one whole GPU per trial
    assert _max_concurrent(spec(trials_per_gpu=4), {}, cluster, 4) == 8
    assert _max_concurrent(spec(trials_per_gpu=3), {}, cluster, 3) == 6
    assert _max_concurrent(spec(trials_per_gpu=4, max_concurrent_trials=3), {}, cluster, 4) == 3
    assert _max_concurrent(spec(trials_per_gpu=8), {}, {"CPU": 5.0, "GPU": 2.0}, 8) == 5  # CPUs bind
    assert _max_concurrent(spec(trials_per_gpu="auto"), {}, {"CPU": 64.0, "GPU": 1.0}, 7) == 7  # auto measured 7
    # A searched share: the largest candidate bounds what fits.
    space = {"scaling.gpus_per_worker": Dist("choice", (0.25, 0.5))}
    assert _max_concurrent(spec(), space, cluster) == 4


def test_the_trainer_asks_for_the_share_and_fake_gpus_train_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tltrain.execution.packing import FAKE_GPUS_ENV, _on_cpu
    from tltrain.execution.trainer import build_trainer

    monkeypatch.delenv(FAKE_GPUS_ENV, raising=False)
    storage_uri = str(tmp_path / "runs")

    def trainer(**scaling: Any) -> Any:
        return build_trainer(parse_spec(_tree(scaling=scaling, storage={"uri": storage_uri})), None, [])

    shared = trainer(use_gpu=True, gpus_per_worker=0.25)
    assert shared.scaling_config.resources_per_worker == {"CPU": 1.0, "GPU": 0.25}
    assert shared.backend_config.backend == "nccl"  # real GPUs: nothing changes without the variable
    assert trainer(use_gpu=True, num_workers=2).scaling_config.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert trainer().scaling_config.resources_per_worker == {"CPU": 1.0}

    monkeypatch.setenv(FAKE_GPUS_ENV, "1")
    fake = trainer(use_gpu=True, gpus_per_worker=0.5)
    assert fake.backend_config.backend == "gloo"
    assert fake.train_loop_per_worker.func is _on_cpu
    assert trainer().train_loop_per_worker.__name__ == "worker_fn"  # CPU runs are never wrapped

    # With the variable set, a worker that does see CUDA refuses rather than train on the CPU.
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    ran: list[dict[str, Any]] = []
    with pytest.raises(RuntimeError) as info:
        _on_cpu(ran.append, {})
    assert f"{FAKE_GPUS_ENV}=1" in str(info.value) and "NVIDIA H200" in str(info.value)
    assert f"unset {FAKE_GPUS_ENV}" in str(info.value) and ran == []


def test_auto_measures_the_largest_batch_lowest_depth_and_every_model() -> None:
    from tltrain.execution.packing import measured_variants
    from tltrain.spec.space import Dist

    spec = parse_spec(
        _tree(
            scaling={"use_gpu": True, "batch_size_per_worker": 16},
            strategy={"freeze_depth": 3, "unfreeze": {2: 1}},
            tune={"trials_per_gpu": "auto"},
        )
    )
    space = {
        "scaling.batch_size_per_worker": Dist("choice", (16, 64, 32)),
        "strategy.freeze_depth": Dist("randint", (2, 4)),
        "model.name": Dist("choice", ("test_resnet", "test_vit")),
        "optim.lr": Dist("loguniform", (1e-4, 1e-2)),
    }
    variants = measured_variants(spec, space)
    assert sorted(v.model.name for v in variants) == ["test_resnet", "test_vit"]
    for v in variants:
        assert v.scaling.batch_size_per_worker == 64
        assert v.strategy.freeze_depth == 1 and v.strategy.unfreeze == {}  # the unfreeze step trains most
        assert v.tune is None


def test_the_measured_steps_run_and_need_cuda_to_measure() -> None:
    import torch

    from tltrain.execution.packing import _measure, train_steps

    spec = parse_spec(
        _tree(
            data={"image_size": 32},
            loop={"precision": "fp32", "ema_decay": 0.9},
            optim={"name": "sgd"},
            strategy={"freeze_depth": 2},
            scaling={"batch_size_per_worker": 4},
        )
    )
    assert train_steps(spec, 10, torch.device("cpu")) == "test_resnet at batch 4, 32 px, fp32"
    measured = _measure([spec.to_dict()], 10)
    if torch.cuda.is_available():
        assert measured is not None and measured[0]["peak"] > 0 and measured[0]["total"] > measured[0]["peak"]
    else:
        assert measured is None  # the driver turns this into a refusal of auto


# --- a sweep on a fake GPU ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_gpu_ray() -> Iterator[None]:
    """This process as the driver of a local Ray started the way `tltrain` starts one
    (`ensure_ray("local")`), its node given 4 logical CPUs (so the CPUs never bind) and 1 fake GPU
    through Ray's RAY_OVERRIDE_RESOURCES, and TLTRAIN_FAKE_GPUS=1 in the environment its processes
    (every trial, every worker) inherit."""
    import ray

    from tltrain.execution.packing import FAKE_GPUS_ENV
    from tltrain.execution.trainer import ensure_ray

    if ray.is_initialized():  # an earlier test's driver connection
        ray.shutdown()
    with pytest.MonkeyPatch.context() as env:
        env.delenv("RAY_ADDRESS", raising=False)
        env.setenv("RAY_OVERRIDE_RESOURCES", json.dumps({"CPU": 4, "GPU": 1}))
        env.setenv(FAKE_GPUS_ENV, "1")
        ensure_ray("local")
        try:
            assert ray.cluster_resources().get("GPU") == 1.0
            yield
        finally:
            ray.shutdown()


def _sweep_tree(fashion: tuple[str, str], storage_uri: str, name: str, **tune: Any) -> dict[str, Any]:
    train, val = fashion
    return {
        "name": name,
        "model": {"name": "test_resnet"},
        "data": {"train": train, "val": val, "image_size": 32, "loader_workers": 0},
        "loop": {"epochs": 2, "precision": "fp32", "max_steps_per_epoch": 15, "seed": 0},
        "scaling": {"num_workers": 1, "batch_size_per_worker": 16, "use_gpu": True, "address": "local"},
        "storage": {"uri": storage_uri, "keep": 1},
        "tracking": {"enabled": False},
        "tune": {
            "num_samples": 3, "metric": "val/acc", "mode": "max", "searcher": "random", "seed": 0,
            "scheduler": {"kind": "fifo"}, "space": {"optim.lr": {"choice": [1e-3, 2e-3, 3e-3]}}, **tune,
        },
    }  # fmt: skip


def _interval(trial_run: Path, history: list[dict[str, Any]]) -> tuple[float, float]:
    """(start, end) of a trial's training: its last report (the newest checkpoint's name) minus the
    wall time of all its epochs (the first includes the worker's set-up). Inside the time its GPU
    share is held (the worker process starts before, and is torn down after)."""
    from tltrain.spec.metrics import EPOCH_WALL_S

    last = max(p.name for p in trial_run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    end = datetime.strptime(last.removeprefix("checkpoint_"), "%Y-%m-%d_%H-%M-%S.%f").timestamp()
    return end - sum(float(h[EPOCH_WALL_S]) for h in history), end


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda ev: (ev[0], ev[1]))
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


class _ShareHolders(threading.Thread):
    """Polls Ray's placement groups while a sweep runs: when each trial's GPU share was held
    (its worker group's placement group created, until removed)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.held: dict[str, tuple[float, float]] = {}  # placement group -> (first, last) seen held
        self.stop = threading.Event()

    def run(self) -> None:
        import ray

        while not self.stop.wait(0.2):
            now = time.time()
            for pg_id, pg in ray.util.placement_group_table().items():
                if pg["state"] == "CREATED" and any("GPU" in b for b in pg["bundles"].values()):
                    self.held[pg_id] = (self.held.get(pg_id, (now, now))[0], now)


@pytest.mark.integration
def test_auto_with_fake_gpus_is_refused_before_any_trial(
    fake_gpu_ray: None, fashion_folders: tuple[str, str], tmp_path: Path
) -> None:
    from tltrain.execution.tune import run_tune

    tree = _sweep_tree(fashion_folders, str(tmp_path / "runs"), "auto", trials_per_gpu="auto")
    with pytest.raises(SpecError) as info, open(tmp_path / "sweep.out", "w") as out:
        run_tune(parse_spec(tree), out=out)
    text = str(info.value)
    assert "tune.trials_per_gpu auto" in text and "no CUDA device" in text and "to a number" in text, text
    assert not (tmp_path / "runs" / "auto" / "runs").exists(), "a trial started"
    assert not (tmp_path / "runs" / "auto" / "tltrain" / "spec.json").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_two_trials_share_the_fake_gpu_and_never_three(
    fake_gpu_ray: None,
    fashion_folders: tuple[str, str],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    import ray

    from tltrain.execution.sweep_store import read_json
    from tltrain.execution.tune import run_tune

    # Tune may start all 3 trials at once: only the GPU share (0.5 each, 1 GPU) holds the third back.
    tree = _sweep_tree(fashion_folders, str(tmp_path / "runs"), "packed", trials_per_gpu=2, max_concurrent_trials=3)
    holders = _ShareHolders()
    holders.start()
    try:
        with open(tmp_path / "sweep.out", "w") as out:
            summary = run_tune(parse_spec(tree), out=out)
    finally:
        holders.stop.set()
        holders.join(timeout=10)
    groups = ray.util.placement_group_table().values()
    shares = [b["GPU"] for pg in groups for b in pg["bundles"].values() if "GPU" in b]
    printed = (tmp_path / "sweep.out").read_text()
    logs = printed + "".join(capfd.readouterr())
    assert summary["num_trials"] == 3 and summary["num_errored"] == 0, logs[-3000:]
    assert "tune.trials_per_gpu 2: each trial reserves 0.5 GPU, up to 2 per GPU" in printed
    assert len(shares) >= 3 and set(shares) == {0.5}, shares  # each trial's worker asked Ray for half the GPU
    # The fake-GPU fallback says so: once on the driver, and in each worker's log.
    assert "TLTRAIN_FAKE_GPUS=1: GPU workers hold fake GPU shares and train on CPU with gloo" in printed
    assert "training on CPU with gloo" in logs, logs[-3000:]
    # Each trial held its share once, two at a time, for a while (seconds, not one poll), never three.
    held = sorted(holders.held.values())
    print(
        "GPU shares held (s from the first):", [(round(a - held[0][0], 1), round(b - held[0][0], 1)) for a, b in held]
    )
    assert len(held) == 3, held
    assert _most_at_once(held) == 2, held
    assert min(held[0][1], held[1][1]) - held[1][0] > 2.0, held
    # The trials' own times agree: the third trained only after one of the first two had finished.
    sweep = tmp_path / "runs" / "packed"
    intervals = []
    for trial in summary["trials"]:
        record = read_json(str(sweep / "tltrain" / "done" / f"{trial['trial_id']}.json"))
        assert record is not None and record["epochs"] == 2, record
        intervals.append(_interval(sweep / "runs" / record["run_name"], record["history"]))
    first, second, third = sorted(intervals)
    assert _most_at_once(intervals) <= 2, intervals
    assert third[0] >= min(first[1], second[1]), intervals
