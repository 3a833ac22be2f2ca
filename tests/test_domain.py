"""core/domain.py: gradient reversal, the DANN schedule and loss, MMD, CORAL, and their all-gathered
form under a real 2-process gloo group (each rank half the batch) against one process on the whole."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ray_nodes import free_port
from tltrain.core.domain import (
    DomainDiscriminator,
    alignment_loss,
    coral_loss,
    dann_loss,
    gather_features,
    grl_lambda,
    mmd_loss,
)

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_gradient_reversal_flips_the_feature_gradient_and_scales_it_by_lambda() -> None:
    disc = DomainDiscriminator(4, hidden=8).double().eval()  # eval: no dropout, both passes alike
    source = torch.randn(6, 4, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    target = torch.randn(5, 4, dtype=torch.float64, generator=_gen(1))
    lam = 0.3

    loss = dann_loss(source, target, disc, lam)
    (g_rev,) = torch.autograd.grad(loss, source, retain_graph=True)
    d_rev = torch.autograd.grad(loss, list(disc.parameters()))

    logits = disc(torch.cat([source, target]))
    labels = torch.cat([torch.ones(6), torch.zeros(5)]).double()
    plain = nn.functional.binary_cross_entropy_with_logits(logits, labels)
    (g_plain,) = torch.autograd.grad(plain, source, retain_graph=True)
    d_plain = torch.autograd.grad(plain, list(disc.parameters()))

    torch.testing.assert_close(loss, plain)  # identity forward
    assert g_plain.abs().max() > 1e-6, "vacuous: no gradient reached the features"
    assert float((g_rev * g_plain).sum()) < 0  # opposite direction
    torch.testing.assert_close(g_rev.norm() / g_plain.norm(), torch.tensor(lam, dtype=torch.float64))
    torch.testing.assert_close(g_rev, -lam * g_plain)
    for a, b in zip(d_rev, d_plain):  # the discriminator itself still descends on the domain loss
        torch.testing.assert_close(a, b)


def test_grl_lambda_rises_from_zero_to_one() -> None:
    assert grl_lambda(0.0) == 0.0
    values = [grl_lambda(p) for p in np.linspace(0.0, 1.0, 21)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert 0.999 < grl_lambda(1.0) < 1.0
    assert grl_lambda(1.5) == grl_lambda(1.0) and grl_lambda(-0.1) == 0.0  # progress clamped to [0, 1]
    assert grl_lambda(0.5, gamma=1.0) < grl_lambda(0.5)  # smaller gamma: slower rise


def test_discriminator_gives_one_logit_per_sample() -> None:
    disc = DomainDiscriminator(16)
    assert disc(torch.randn(3, 16)).shape == (3,)
    assert sum(p.numel() for p in disc.parameters()) == 16 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 + 1


def test_mmd_is_near_zero_for_one_distribution_and_large_for_a_shifted_one() -> None:
    a = torch.randn(256, 16, generator=_gen(0))
    b = torch.randn(256, 16, generator=_gen(1))
    shifted = b + 1.0
    same, moved = float(mmd_loss(a, b)), float(mmd_loss(a, shifted))
    assert abs(same) < 5e-3, same
    assert moved > 0.1 and moved > 50 * abs(same), (same, moved)
    torch.testing.assert_close(mmd_loss(a, shifted), mmd_loss(shifted, a))
    torch.testing.assert_close(mmd_loss(a[:100], shifted), mmd_loss(shifted, a[:100]))  # unequal sizes
    biased = float(mmd_loss(a, b, unbiased=False))
    assert biased > 0 and biased > same  # the V-statistic carries the positive 1/n bias


def _numpy_mmd(s: np.ndarray, t: np.ndarray, unbiased: bool) -> float:
    x = np.concatenate([s, t])
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    n = len(x)
    base = d2.sum() / (n * n - n)
    k = np.mean([np.exp(-d2 / (base * 2.0**u)) for u in (-2, -1, 0, 1, 2)], axis=0)
    m = len(s)
    kss, ktt, kst = k[:m, :m], k[m:, m:], k[:m, m:]
    if unbiased:
        ss = (kss.sum() - np.trace(kss)) / (m * (m - 1))
        tt = (ktt.sum() - np.trace(ktt)) / ((n - m) * (n - m - 1))
        return float(ss + tt - 2 * kst.mean())
    return float(kss.mean() + ktt.mean() - 2 * kst.mean())


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd_matches_a_hand_computation(unbiased: bool) -> None:
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 3)), rng.normal(loc=0.5, size=(4, 3))
    got = mmd_loss(torch.from_numpy(s), torch.from_numpy(t), unbiased=unbiased)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_numpy_mmd(s, t, unbiased), rel=1e-10, abs=1e-12)


def test_mmd_is_stable_far_from_the_origin_in_low_precision_and_for_identical_points() -> None:
    a = torch.randn(64, 32, generator=_gen(0))
    b = torch.randn(64, 32, generator=_gen(1)) + 0.5
    ref = mmd_loss(a, b)
    # A large common offset: ||x||^2 ~ 3e7 would swamp the distances without the centring.
    torch.testing.assert_close(mmd_loss(a + 1000.0, b + 1000.0), ref, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(mmd_loss(10.0 * a, 10.0 * b), ref, rtol=1e-4, atol=1e-5)  # scale-free
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = mmd_loss(a.bfloat16(), b.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0.05, atol=5e-3)
    same = torch.ones(8, 4, requires_grad=True)
    loss = mmd_loss(same, same.detach().clone())
    loss.backward()
    assert same.grad is not None and torch.isfinite(same.grad).all() and abs(loss.item()) < 1e-6


def test_coral_matches_a_hand_computation_and_is_zero_for_identical_inputs() -> None:
    s = np.array([[1.0, 2.0], [2.0, 0.0], [4.0, 1.0], [0.0, 3.0]])
    t = np.array([[0.0, 0.0], [1.0, 1.0], [3.0, -1.0]])
    cs, ct = np.cov(s, rowvar=False), np.cov(t, rowvar=False)  # (n - 1) covariances
    expected = ((cs - ct) ** 2).sum() / (4 * 2**2)
    got = coral_loss(torch.from_numpy(s), torch.from_numpy(t))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    x = torch.randn(10, 6, generator=_gen(0))
    assert float(coral_loss(x, x.clone())) == 0.0
    # A mean shift alone is invisible to CORAL (second-order statistics only).
    assert float(coral_loss(x, x + 3.0)) < 1e-10


def test_alignment_loss_dispatches_by_name_and_rejects_what_it_cannot_run() -> None:
    s = torch.randn(8, 4, generator=_gen(0))
    t = torch.randn(8, 4, generator=_gen(1))
    torch.testing.assert_close(alignment_loss("mmd", s, t), mmd_loss(s, t))
    torch.testing.assert_close(alignment_loss("coral", s, t), coral_loss(s, t))
    disc = DomainDiscriminator(4, hidden=8).eval()
    torch.testing.assert_close(alignment_loss("dann", s, t, disc, 0.5), dann_loss(s, t, disc, 0.5))
    assert gather_features(s) is s  # no process group: identity
    with pytest.raises(ValueError, match="needs a discriminator"):
        alignment_loss("dann", s, t)
    with pytest.raises(ValueError, match="unknown alignment method"):
        alignment_loss("mdd", s, t)
    with pytest.raises(ValueError, match="per domain"):
        mmd_loss(s[:1], t)
    with pytest.raises(ValueError, match="one D"):
        coral_loss(s, t[:, :3])


# ---- two gloo ranks, each with half of the global batch ----

WORLD, PER_RANK, DIM, OUT_DIM = 2, 6, 5, 3


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(WORLD * PER_RANK, DIM, dtype=torch.float64, generator=_gen(10)),
            torch.randn(WORLD * PER_RANK, DIM, dtype=torch.float64, generator=_gen(11)) + 0.3)  # fmt: skip


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(DIM, OUT_DIM).double()


def _discriminator() -> nn.Module:
    torch.manual_seed(1)
    return DomainDiscriminator(OUT_DIM, hidden=4, dropout=0.0).double()


def _step_loss(backbone: nn.Module, disc: nn.Module, xs: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    # As the training step would: one forward over source + target, then split the pooled features.
    feats = backbone(torch.cat([xs, xt]))
    fs, ft = feats[: len(xs)], feats[len(xs) :]
    return sum((alignment_loss(m, fs, ft, disc, 0.7) for m in ("mmd", "coral", "dann")), torch.zeros(()))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        xs, xt = (x[rank * PER_RANK : (rank + 1) * PER_RANK] for x in _global_batch())
        out: dict[str, torch.Tensor] = {}
        for name, fn in (("mmd", mmd_loss), ("coral", coral_loss)):
            s, t = xs.clone().requires_grad_(), xt.clone().requires_grad_()
            loss = fn(gather_features(s), gather_features(t))
            loss.backward()
            assert s.grad is not None and t.grad is not None
            out.update({f"{name}/loss": loss.detach(), f"{name}/gs": s.grad, f"{name}/gt": t.grad})
        backbone, disc = DDP(_backbone()), DDP(_discriminator())
        _step_loss(backbone, disc, xs, xt).backward()
        for prefix, module in (("backbone", backbone), ("disc", disc)):
            for k, p in module.module.named_parameters():
                assert p.grad is not None
                out[f"{prefix}.{k}"] = p.grad
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_losses_on_two_ranks_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    xs, xt = _global_batch()
    # float64 throughout: the same arithmetic on the same global batch, so agreement is to rounding.
    tol = {"rtol": 1e-9, "atol": 1e-12}
    for name, fn in (("mmd", mmd_loss), ("coral", coral_loss)):
        s, t = xs.clone().requires_grad_(), xt.clone().requires_grad_()
        loss = fn(s, t)
        loss.backward()
        assert s.grad is not None and t.grad is not None and s.grad.abs().max() > 1e-8
        for r, got in enumerate(ranks):
            rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
            torch.testing.assert_close(got[f"{name}/loss"], loss.detach(), **tol)  # every rank: the global value
            # The all-gather's backward sums the W ranks' identical gradients: W x the local slice.
            torch.testing.assert_close(got[f"{name}/gs"], WORLD * s.grad[rows], **tol)
            torch.testing.assert_close(got[f"{name}/gt"], WORLD * t.grad[rows], **tol)
    # ... which DDP's 1/W average cancels: parameter gradients equal one process's on the global batch,
    # for the gathered MMD/CORAL and for the ungathered, per-sample DANN loss alike.
    backbone, disc = _backbone(), _discriminator()
    _step_loss(backbone, disc, xs, xt).backward()
    for prefix, module in (("backbone", backbone), ("disc", disc)):
        for k, p in module.named_parameters():
            assert p.grad is not None
            for got in ranks:
                torch.testing.assert_close(got[f"{prefix}.{k}"], p.grad, **tol, msg=f"{prefix}.{k}")
