"""Batched OT against POT's single-problem reference, masks, gradients, the constructed case."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from otcclip.models.config import OTSettings
from otcclip.models.ot import ot_distance
from otcclip.models.scoring import fuse


def _problems(seed: int, b: int = 5, p: int = 9, length: int = 7, d: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, p, d, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(b, length, d, generator=g, dtype=torch.float64), dim=-1)
    xm = torch.rand(b, p, generator=g) > 0.3
    ym = torch.rand(b, length, generator=g) > 0.4
    xm[:, 0] = True
    ym[:, 0] = True
    return x, y, xm, ym


def _reference(x, y, xm, ym, reg, a=None, b=None):
    out = []
    for i in range(x.shape[0]):
        xi, yi = x[i][xm[i]].numpy(), y[i][ym[i]].numpy()
        ai = np.full(len(xi), 1 / len(xi)) if a is None else a[i][xm[i]].numpy()
        bi = np.full(len(yi), 1 / len(yi)) if b is None else b[i][ym[i]].numpy()
        out.append(ot.sinkhorn2(ai, bi, 1 - xi @ yi.T, reg, method="sinkhorn_log", numItermax=20000, stopThr=1e-12))
    return np.array(out)


@pytest.mark.parametrize("reg,method", [(0.05, "auto"), (0.2, "auto"), (0.2, "log_sinkhorn"), (0.5, "sinkhorn")])
def test_matches_pot_sinkhorn2_with_masks(reg: float, method: str) -> None:
    x, y, xm, ym = _problems(0)
    res = ot_distance(x, y, x_mask=xm, y_mask=ym, settings=OTSettings(reg=reg, iters=5000, tol=1e-10, method=method))
    ref = _reference(x, y, xm, ym, reg)
    np.testing.assert_allclose(res.distance.numpy(), ref, atol=1e-6)


def test_padding_does_not_change_the_result() -> None:
    x, y, xm, ym = _problems(1)
    base = ot_distance(x, y, x_mask=xm, y_mask=ym, settings=OTSettings(iters=500)).distance
    junk = F.normalize(torch.randn(x.shape[0], 4, x.shape[2], dtype=x.dtype), dim=-1)
    x2 = torch.cat([x, junk], dim=1)
    xm2 = torch.cat([xm, torch.zeros(x.shape[0], 4, dtype=torch.bool)], dim=1)
    padded = ot_distance(x2, y, x_mask=xm2, y_mask=ym, settings=OTSettings(iters=500))
    assert torch.isfinite(padded.distance).all()
    torch.testing.assert_close(padded.distance, base, atol=1e-6, rtol=0)


def test_relevance_marginals_match_pot() -> None:
    x, y, xm, ym = _problems(2)
    xg = F.normalize(torch.randn(x.shape[0], x.shape[2], dtype=x.dtype), dim=-1)
    yg = F.normalize(torch.randn(x.shape[0], x.shape[2], dtype=x.dtype), dim=-1)
    res = ot_distance(x, y, x_mask=xm, y_mask=ym, x_global=xg, y_global=yg, return_plan=True,
                      settings=OTSettings(marginals="relevance", relevance_temp=0.1, iters=5000, tol=1e-10))
    a = torch.softmax((torch.einsum("bpd,bd->bp", x, yg) / 0.1).masked_fill(~xm, -np.inf), dim=1)
    b = torch.softmax((torch.einsum("bld,bd->bl", y, xg) / 0.1).masked_fill(~ym, -np.inf), dim=1)
    np.testing.assert_allclose(res.distance.numpy(), _reference(x, y, xm, ym, 0.05, a, b), atol=1e-6)
    assert res.plan is not None
    torch.testing.assert_close(res.plan.sum(dim=2).to(a.dtype), a, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="x_global and y_global"):
        ot_distance(x, y, settings=OTSettings(marginals="relevance"))


def test_gradient_is_the_envelope_gradient_of_pots_plan() -> None:
    """d<T*, C>/dx with T* held constant (the envelope theorem applied to the entropic
    objective), T* from POT's single-problem solver."""
    x, y, _, ym = _problems(3, b=3)
    x.requires_grad_(True)
    ot_distance(x, y, y_mask=ym, settings=OTSettings(reg=0.1, iters=3000, tol=1e-12)).distance.sum().backward()
    assert x.grad is not None
    for i in range(x.shape[0]):
        yi = y[i][ym[i]]
        m = (1 - x[i] @ yi.T).detach().numpy()
        t = ot.sinkhorn(np.full(m.shape[0], 1 / m.shape[0]), np.full(m.shape[1], 1 / m.shape[1]), m, 0.1,
                        method="sinkhorn_log", numItermax=20000, stopThr=1e-12)
        np.testing.assert_allclose(x.grad[i].numpy(), -t @ yi.numpy(), atol=1e-6)


def test_reduced_precision_is_finite_and_close() -> None:
    x, y, xm, ym = _problems(4)
    full = ot_distance(x.float(), y.float(), x_mask=xm, y_mask=ym, settings=OTSettings(reg=0.01, iters=300)).distance
    half = ot_distance(x.half(), y.half(), x_mask=xm, y_mask=ym, settings=OTSettings(reg=0.01, iters=300)).distance
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, full, atol=5e-3, rtol=0)


def test_empty_sets_and_bad_shapes_are_refused() -> None:
    x, y, xm, ym = _problems(5)
    ym[0] = False
    with pytest.raises(ValueError, match="at least one valid position"):
        ot_distance(x, y, x_mask=xm, y_mask=ym)
    with pytest.raises(ValueError, match="expected x"):
        ot_distance(x[0], y)
    with pytest.raises(ValueError, match="reg"):
        OTSettings(reg=0)
    empty = ot_distance(x[:0], y[:0])
    assert empty.distance.shape == (0,)


def test_ot_picks_the_right_caption_when_globals_tie() -> None:
    """Two captions with the same global embedding but different token sets: the global
    score ties, the OT score (and so the fused score) prefers the caption whose tokens
    match the image's patches."""
    d = 8
    e = torch.eye(d, dtype=torch.float64)
    patches = torch.stack([e[0], e[1], e[0], e[1]])  # image regions: "dog" and "grass"
    right = torch.stack([e[0], e[1], F.normalize(e[0] + e[1], dim=0)])  # tokens about dog and grass
    wrong = torch.stack([e[2], e[3], F.normalize(e[2] + e[3], dim=0)])  # tokens about other things
    caption_global = F.normalize(e[4] + e[5], dim=0)  # identical for both captions
    image_global = F.normalize(e[4] + 0.5 * e[5], dim=0)
    g = torch.stack([image_global @ caption_global, image_global @ caption_global]).numpy()
    res = ot_distance(torch.stack([patches, patches]), torch.stack([right, wrong]), settings=OTSettings(reg=0.05))
    fused = fuse(g, res.score.numpy(), 0.5)
    assert g[0] == g[1]  # the global-only score cannot tell them apart
    assert res.score[0] > res.score[1] + 0.5
    assert fused[0] > fused[1]


def test_plain_and_log_domains_agree_and_auto_picks_by_range() -> None:
    x, y, xm, ym = _problems(6, b=64, p=16, length=10, d=32)
    x, y = x.float(), y.float()
    runs = {m: ot_distance(x, y, x_mask=xm, y_mask=ym, settings=OTSettings(reg=0.05, iters=2000, tol=1e-7, method=m))
            for m in ("auto", "sinkhorn", "log_sinkhorn")}
    torch.testing.assert_close(runs["sinkhorn"].distance, runs["log_sinkhorn"].distance, atol=2e-5, rtol=0)
    torch.testing.assert_close(runs["auto"].distance, runs["log_sinkhorn"].distance, atol=2e-5, rtol=0)
    # cosine costs span < 2, so 2 / 0.05 = 40 <= PLAIN_MAX_RANGE_OVER_REG: all plain
    assert runs["auto"].log_domain is not None and not bool(runs["auto"].log_domain.any())
    # a tiny reg against the same costs: the log domain, and finite results
    tiny = ot_distance(x, y, x_mask=xm, y_mask=ym, settings=OTSettings(reg=0.005, iters=300))
    assert tiny.log_domain is not None and bool(tiny.log_domain.all())
    assert torch.isfinite(tiny.distance).all()
    forced = ot_distance(x, y, x_mask=xm, y_mask=ym, settings=OTSettings(reg=0.005, iters=300, method="log_sinkhorn"))
    torch.testing.assert_close(tiny.distance, forced.distance)


def test_each_problem_stops_when_it_has_converged() -> None:
    """In a batch an easy problem gets exactly the iterations it gets alone (POT's batched
    solver would run it until the hardest problem converged)."""
    x, y, _, _ = _problems(7, b=2, p=12, length=8, d=16)
    x, y = x.clone(), y.clone()
    x[0] = F.normalize(x[0] * 0.3 + y[0, :1], dim=-1)  # patches near one token: a flatter cost, easier
    st = OTSettings(reg=0.05, iters=2000, tol=1e-4, method="sinkhorn")
    both = ot_distance(x, y, settings=st)
    alone = [ot_distance(x[i:i + 1], y[i:i + 1], settings=st) for i in range(2)]
    assert alone[0].n_iter < alone[1].n_iter == both.n_iter
    longer = ot_distance(x[:1], y[:1], settings=OTSettings(reg=0.05, iters=both.n_iter, tol=0, method="sinkhorn"))
    assert abs(float(longer.distance[0] - alone[0].distance[0])) > 1e-7  # more iterations would change it
    for i in range(2):
        torch.testing.assert_close(both.distance[i], alone[i].distance[0], atol=1e-12, rtol=0)
