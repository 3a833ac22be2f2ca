"""The loop's arithmetic: gradient accumulation and DDP give the same update as one big batch."""

from __future__ import annotations

import math
import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_nodes import free_port
from tltrain.core.loop import train
from tltrain.core.model import layer_groups
from tltrain.spec.load import parse_spec

GLOBAL_BATCH = 16


def _spec(grad_accum: int, lora: bool = False):
    # test_vit has LayerNorm only (BatchNorm statistics would differ between batch sizes).
    return parse_spec(
        {
            "name": "t",
            "model": {"name": "test_vit"},
            "data": {"train": "unused", "val_fraction": 0.2},
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
            "strategy": {"layer_decay": 0.8, **({"lora": {"rank": 4, "alpha": 8}} if lora else {})},
            "loop": {"epochs": 1, "precision": "fp32", "grad_accum": grad_accum, "max_steps_per_epoch": 1},
            "tracking": {"enabled": False},
        }
    )


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)


def _model(lora: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=4, img_size=32)
    if lora:  # adapters on every Linear of the blocks; lora_A's init draws from the seeded RNG
        from tltrain.core.lora import adapt_model

        adapt_model(model, _spec(1, lora=True).strategy, coarse=True)
        # lora_B starts at zero, so the first step would move B only: start from a trained-looking B.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.02)
    return model


class Batches(list):
    pass


def _run(model: torch.nn.Module, batches: list, grad_accum: int, lora: bool = False) -> dict[str, torch.Tensor]:
    val = Batches([_data(1)])
    train(
        _spec(grad_accum, lora),
        model,
        layer_groups(model),
        Batches(batches),
        val,
        device=torch.device("cpu"),
        num_classes=4,
        report=lambda m, c: None,
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_grad_accumulation_matches_one_big_batch() -> None:
    x, y = _data()
    big = _run(_model(), [(x, y)], grad_accum=1)
    micro = 4
    chunks = [(x[i : i + micro], y[i : i + micro]) for i in range(0, GLOBAL_BATCH, micro)]
    accumulated = _run(_model(), chunks, grad_accum=GLOBAL_BATCH // micro)
    start = _model().state_dict()
    moved = [k for k in big if not torch.equal(big[k], start[k])]
    assert moved, "the step changed nothing; the comparison would be vacuous"
    for k in big:
        torch.testing.assert_close(accumulated[k], big[k], rtol=1e-4, atol=1e-6, msg=k)


def _ddp_worker(rank: int, world: int, port: int, grad_accum: int, out: str, lora: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _data()
        shard = GLOBAL_BATCH // world
        xs, ys = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        micro = shard // grad_accum
        batches = [(xs[i : i + micro], ys[i : i + micro]) for i in range(0, shard, micro)]
        state = _run(_model(lora), batches, grad_accum, lora)
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("grad_accum,lora", [(1, False), (2, False), (2, True)])
def test_two_ddp_workers_match_one_worker_with_the_global_batch(tmp_path, grad_accum: int, lora: bool) -> None:
    x, y = _data()
    single = _run(_model(lora), [(x, y)], grad_accum=1, lora=lora)
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(
        _ddp_worker, args=(2, free_port(), grad_accum, out, lora), nprocs=2, join=True, start_method="spawn"
    )
    distributed = torch.load(out, weights_only=True)
    for k in single:
        torch.testing.assert_close(distributed[k], single[k], rtol=1e-4, atol=1e-6, msg=k)
    if lora:  # what moved: the adapters (A and B) and the head; every base weight as it started
        start = _model(lora).state_dict()
        moved = {k for k in single if not torch.equal(single[k], start[k])}
        assert moved and all(".lora_" in k or k.startswith("head.") for k in moved), sorted(moved)
        assert any(".lora_A." in k for k in moved) and any(".lora_B." in k for k in moved)


def test_resuming_a_run_that_early_stopping_ended_trains_no_further() -> None:
    from tltrain.core.checkpoint import CheckpointMeta
    from tltrain.core.loop import LoopState, Resume

    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = _spec(1).model_copy(
        update={"loop": _spec(1).loop.model_copy(update={"epochs": 5, "early_stop_patience": 1})}
    )
    ended = LoopState(
        epoch=2,
        global_step=2,
        best_metric=0.5,
        evals_without_improvement=1,
        history=[{"epoch": 1, "stopped_early": False}, {"epoch": 2, "stopped_early": True}],
    )
    reports: list[dict] = []
    state = train(
        spec,
        model,
        layer_groups(model),
        Batches([_data()]),
        Batches([_data(1)]),
        device=torch.device("cpu"),
        num_classes=4,
        report=lambda m, c: reports.append(m),
        resume=Resume(train_state=None, meta=CheckpointMeta(loop_state=ended)),
    )
    assert reports == [] and state.epoch == 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a stopped run was trained further"


def test_a_diverging_run_stops_instead_of_failing() -> None:
    # An absurd LR: after the first step the weights (and so the val loss) are inf/NaN.
    spec = _spec(1)
    spec = spec.model_copy(update={
        "loop": spec.loop.model_copy(update={"epochs": 4}),
        "optim": spec.optim.model_copy(update={"lr": 1e38}),
        "storage": spec.storage.model_copy(update={"metric": "val/loss", "mode": "min"}),
    })  # fmt: skip
    model = _model()
    reports: list[dict] = []
    state = train(
        spec,
        model,
        layer_groups(model),
        Batches([_data()]),
        Batches([_data(1)]),
        device=torch.device("cpu"),
        num_classes=4,
        report=lambda m, c: reports.append(m),
    )
    assert len(reports) < 4 and reports[-1]["diverged"] and reports[-1]["stopped_early"], reports
    assert state.best_metric is None or math.isfinite(state.best_metric)
