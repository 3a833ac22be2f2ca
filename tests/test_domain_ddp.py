"""Domain adaptation's step under DDP: two gloo ranks with gradient accumulation take the same
update as one process on the global batch (MMD through the all-gather; DANN with its
discriminator in its own DDP wrapper and param group)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_nodes import free_port
from tltrain.core import loop
from tltrain.core.domain import DomainDiscriminator
from tltrain.core.model import layer_groups
from tltrain.core.steps import DISCRIMINATOR_STATE
from tltrain.spec.load import parse_spec

torch.set_num_threads(1)
WORLD, MICRO, ACCUM, STEPS = 2, 4, 2, 2  # per rank: 2 optimizer steps of 2 micro-batches of 4


def _spec(method: str, grad_accum: int) -> Any:
    return parse_spec({
        "name": "t",
        "model": {"name": "test_vit"},  # LayerNorm only: per-sample, so splitting a batch changes nothing
        "data": {"train": "unused", "val_fraction": 0.2, "target_unlabelled": "unused"},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
        "strategy": {"domain_adaptation": {"method": method, "weight": 1.0, "discriminator_hidden": 16}},
        "loop": {"epochs": 1, "precision": "fp32", "grad_accum": grad_accum, "max_steps_per_epoch": STEPS},
        "tracking": {"enabled": False},
    })  # fmt: skip


class _Sampler:
    def set_epoch(self, epoch: int) -> None:
        pass


class _Target(list):
    """A target loader: batches of (images, unused labels) with the sampler the stream re-seeds."""

    sampler = _Sampler()


def _micro(rank: int, k: int, seed: int) -> torch.Tensor:
    """Rank `rank`'s k-th micro-batch of images (source seed 0, target seed 1)."""
    g = torch.Generator().manual_seed(1000 * seed + 10 * rank + k)
    return torch.randn(MICRO, 3, 32, 32, generator=g) + (1.5 if seed else 0.0)


def _labels(rank: int, k: int) -> torch.Tensor:
    return torch.randint(0, 4, (MICRO,), generator=torch.Generator().manual_seed(50 + 10 * rank + k))


def _batches(ranks: list[int]) -> tuple[list, _Target]:
    """Micro-batch k of these ranks, concatenated in rank order (what the all-gather sees)."""
    n = STEPS * ACCUM
    source = [
        (torch.cat([_micro(r, k, 0) for r in ranks]), torch.cat([_labels(r, k) for r in ranks])) for k in range(n)
    ]
    target = _Target((torch.cat([_micro(r, k, 1) for r in ranks]), torch.zeros(0)) for k in range(n))
    return source, target


def _run(method: str, ranks: list[int], out: Path | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=4, img_size=32)
    source, target = _batches(ranks)
    saved: dict[str, torch.Tensor] = {}

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None:
            state = torch.load(Path(checkpoint_dir) / "train_state.pt", weights_only=True)
            saved.update({f"disc.{k}": v for k, v in state.get(DISCRIMINATOR_STATE, {}).items()})

    # Dropout in the discriminator draws per rank: off, so the two runs can agree exactly.
    loop.DomainDiscriminator = functools.partial(DomainDiscriminator, dropout=0.0)  # type: ignore[misc]
    loop.train(_spec(method, ACCUM), model, layer_groups(model), source, [source[0]], device=torch.device("cpu"),
               num_classes=4, report=report, target_loader=target)  # fmt: skip
    result = {**{k: v.detach().clone() for k, v in model.state_dict().items()}, **saved}
    if out is not None:
        torch.save(result, out)
    return result


METHODS = ("mmd", "dann")


def _worker(rank: int, port: int, out: str) -> None:
    """Both methods in one pair of spawned ranks (a spawn costs more than the runs): rank 0 saves
    each method's result as <out>/<method>.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for method in METHODS:
            _run(method, [rank], Path(out) / f"{method}.pt" if rank == 0 else None)
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_with_accumulation_match_one_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(loop, "DomainDiscriminator", loop.DomainDiscriminator)  # restored after the test
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    torch.manual_seed(0)
    start = timm.create_model("test_vit", num_classes=4, img_size=32).state_dict()
    for method in METHODS:
        single = _run(method, list(range(WORLD)), None)
        distributed = torch.load(tmp_path / f"{method}.pt", weights_only=True)
        moved = [k for k in start if not k.startswith("head.") and not torch.equal(single[k], start[k])]
        assert moved, f"{method}: backbone unmoved"
        if method == "dann":
            assert any(k.startswith("disc.") for k in single)
        assert set(distributed) == set(single), method
        for k in single:
            torch.testing.assert_close(distributed[k], single[k], rtol=1e-4, atol=1e-6, msg=f"{method}: {k}")
