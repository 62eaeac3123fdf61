"""The OT solver's failure handling, the debiased Sinkhorn divergence and relative ``reg``."""

from __future__ import annotations

import numpy as np
import ot
import torch
import torch.nn.functional as F

from otcclip.models.config import OTSettings
from otcclip.models.ot import ot_distance
from otcclip.models.scoring import fuse
from otcclip.models.training.losses import ot_alignment_loss, ot_contrastive_loss


def _sets(seed: int, b: int = 6, p: int = 7, length: int = 5, d: int = 8, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, p, d, generator=g, dtype=dtype), dim=-1)
    y = F.normalize(torch.randn(b, length, d, generator=g, dtype=dtype), dim=-1)
    return x, y


def _pot(x: torch.Tensor, y: torch.Tensor, reg: float) -> float:
    xi, yi = x.numpy(), y.numpy()
    a, b = np.full(len(xi), 1 / len(xi)), np.full(len(yi), 1 / len(yi))
    return float(ot.sinkhorn2(a, b, 1 - xi @ yi.T, reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-10))


def test_a_failed_solve_is_nan_never_a_perfect_match() -> None:
    x, y = _sets(0, dtype=torch.float32)
    # the plain-domain solver underflows at this reg: exp(-C / reg) is 0 for every entry
    res = ot_distance(x, y, settings=OTSettings(reg=0.002, iters=50, method="sinkhorn"), return_plan=True)
    assert res.failed.any()
    assert torch.isnan(res.distance[res.failed]).all() and torch.isnan(res.score[res.failed]).all()
    assert not (res.distance == 0).any()
    # the log-domain solve of the same problems succeeds
    ok = ot_distance(x, y, settings=OTSettings(reg=0.002, iters=50, method="log_sinkhorn"))
    assert not ok.failed.any() and (ok.distance > 0).all()


def test_losses_leave_failed_problems_out() -> None:
    x, y = _sets(1, dtype=torch.float32)
    # the first three problems: tokens near one shared direction, so every cost lies close
    # together and the plain-domain solve works; the other three underflow at this reg
    z = F.normalize(torch.randn(3, 1, x.shape[2], generator=torch.Generator().manual_seed(5)), dim=-1)
    x = torch.cat([F.normalize(z.expand(3, x.shape[1], -1) + 1e-3 * x[:3], dim=-1), x[3:]])
    y = torch.cat([F.normalize(z.expand(3, y.shape[1], -1) + 1e-3 * y[:3], dim=-1), y[3:]])
    x.requires_grad_(True)
    bad = OTSettings(reg=0.002, iters=50, method="sinkhorn")
    d = ot_distance(x, y, settings=bad).distance
    fail = torch.isnan(d)
    assert fail.any() and not fail.all()
    loss = ot_alignment_loss(x, y, settings=bad)
    torch.testing.assert_close(loss, d[~fail].mean())
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[fail].abs().sum() == 0 and x.grad[~fail].abs().sum() > 0
    assert torch.isfinite(ot_contrastive_loss(x, y, negatives=2, settings=bad))


def test_fuse_treats_a_missing_ot_score_as_no_evidence() -> None:
    g = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, np.nan]], dtype=np.float32)
    o = (2.0 * g + 0.1).astype(np.float32)
    o[1, 0] = np.nan  # failed solve
    fused = fuse(g, o, 0.5)
    # the failed pair's OT score is what the global score predicts from the others
    np.testing.assert_allclose(fused[1, 0], 0.5 * 0.3 + 0.5 * (2 * 0.3 + 0.1), atol=1e-5)
    assert np.isnan(fused[2, 1])  # no candidate: still nothing
    np.testing.assert_allclose(fused[0], 0.5 * g[0] + 0.5 * o[0], atol=1e-6)


def test_debiased_divergence_is_the_three_term_sinkhorn_divergence_and_vanishes_on_identical_sets() -> None:
    x, y = _sets(2)
    kw = dict(reg=0.2, iters=300, tol=1e-9, method="log_sinkhorn")
    res = ot_distance(x, y, settings=OTSettings(**kw, debias=True))  # type: ignore[arg-type]
    plain = OTSettings(**kw)  # type: ignore[arg-type]
    dxy, dxx, dyy = (ot_distance(u, v, settings=plain).distance for u, v in ((x, y), (x, x.clone()), (y, y.clone())))
    torch.testing.assert_close(res.distance, dxy - 0.5 * (dxx + dyy), atol=1e-9, rtol=0)
    np.testing.assert_allclose(dxy[0].item(), _pot(x[0], y[0], 0.2), atol=1e-6)  # one term against POT
    same = ot_distance(x, x.clone(), settings=OTSettings(**kw, debias=True)).distance  # type: ignore[arg-type]
    assert same.abs().max() < 1e-9
    assert (dxx > 1e-3).all()  # the biased distance of a set to itself


def test_debiasing_stops_rewarding_collapsed_sets() -> None:
    # a large reg (a weak model's near-uniform plans): every local feature moved onto the
    # set's mean direction is closer, by the plain distance, than the set itself
    x, _ = _sets(3, b=4, p=8)
    collapsed = F.normalize(x.mean(dim=1, keepdim=True), dim=-1).expand(-1, 5, -1).contiguous()
    for debias, collapse_wins in ((False, True), (True, False)):
        s = OTSettings(reg=5.0, iters=100, tol=1e-9, method="log_sinkhorn", debias=debias)
        d_self = ot_distance(x, x.clone(), settings=s).distance
        d_collapsed = ot_distance(x, collapsed, settings=s).distance
        assert bool((d_collapsed < d_self).all()) is collapse_wins


def test_relative_reg_scales_with_the_cost_spread() -> None:
    x, y = _sets(4, b=1)
    cost = 1 - x[0] @ y[0].T
    spread = float(cost.max() - cost.min())
    rel = ot_distance(x, y, settings=OTSettings(reg=0.1, iters=5000, tol=1e-12, method="log_sinkhorn", reg_relative=True))
    ab = ot_distance(x, y, settings=OTSettings(reg=0.1 * spread, iters=5000, tol=1e-12, method="log_sinkhorn"))
    torch.testing.assert_close(rel.distance, ab.distance, atol=1e-7, rtol=0)


def test_relative_reg_gives_a_weak_models_close_costs_a_sharp_plan() -> None:
    # a weak model: every local feature near one direction, costs within ~1e-2 of each other
    g = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(1, 1, 8, generator=g, dtype=torch.float64), dim=-1)
    x = F.normalize(base + 0.05 * torch.randn(1, 6, 8, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(base + 0.05 * torch.randn(1, 6, 8, generator=g, dtype=torch.float64), dim=-1)
    kw = dict(reg=0.05, iters=5000, tol=1e-12, method="log_sinkhorn")
    uniform = 1 / 36
    flat = ot_distance(x, y, settings=OTSettings(**kw), return_plan=True).plan  # type: ignore[arg-type]
    sharp = ot_distance(x, y, settings=OTSettings(**kw, reg_relative=True), return_plan=True).plan  # type: ignore[arg-type]
    assert flat is not None and sharp is not None
    assert float(flat.max()) < 1.2 * uniform
    assert float(sharp.max()) > 3 * uniform
