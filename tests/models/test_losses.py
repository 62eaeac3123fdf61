"""Losses on constructed inputs with known values."""

from __future__ import annotations

import math

import pytest
import torch

from otcclip.models.config import OTSettings
from otcclip.models.training.losses import (
    clip_loss,
    nt_xent,
    ot_alignment_loss,
    ot_contrastive_loss,
    ot_distances,
    unlikelihood_loss,
)


def test_clip_loss_matched_and_mismatched() -> None:
    eye = torch.eye(2)
    s = 3.0
    # matched: logits rows [s, 0] -> CE = log(1 + e^-s), both directions
    assert clip_loss(eye, eye, s).item() == pytest.approx(math.log1p(math.exp(-s)), rel=1e-6)
    # swapped captions: positives have logit 0, the negative s -> CE = log(1 + e^s)
    assert clip_loss(eye, eye.flip(0), s).item() == pytest.approx(math.log1p(math.exp(s)), rel=1e-6)


def test_clip_loss_uniform_is_log_b() -> None:
    img = torch.nn.functional.normalize(torch.ones(4, 3), dim=-1)
    assert clip_loss(img, img, 10.0).item() == pytest.approx(math.log(4), rel=1e-6)


def test_clip_loss_is_symmetric_in_modalities() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    assert clip_loss(a, b, 7.0).item() == pytest.approx(clip_loss(b, a, 7.0).item(), rel=1e-6)


def test_nt_xent_known_value() -> None:
    eye = torch.eye(2)
    t = 0.5
    # each anchor: positive sim 1/t, two negatives with sim 0
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert nt_xent(eye, eye, temperature=t).item() == pytest.approx(expected, rel=1e-6)


def _sets() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.eye(3)[:2].unsqueeze(0)  # patches e1, e2
    y = torch.stack([torch.eye(3)[0], torch.zeros(3)]).unsqueeze(0)  # token e1 + a pad
    return x, y


def test_ot_distance_known_values() -> None:
    x, y = _sets()
    ymask = torch.tensor([[True, False]])

    def dist(a: torch.Tensor, b: torch.Tensor, bm: torch.Tensor | None) -> float:
        return float(ot_distances(a, b, y_mask=bm, settings=OTSettings(iters=200))[0])

    # identical sets of orthogonal vectors: the plan is the diagonal, distance 0
    assert dist(x, x, None) == pytest.approx(0.0, abs=1e-4)
    # all mass of e1, e2 must go to the single valid token e1: 0.5 * 0 + 0.5 * 1
    assert dist(x, y, ymask) == pytest.approx(0.5, abs=1e-4)


def test_ot_loss_has_gradient_towards_alignment() -> None:
    x, y = _sets()
    y = y.clone().requires_grad_(True)
    loss = ot_alignment_loss(x, y, y_mask=torch.tensor([[True, False]]), settings=OTSettings(iters=100))
    loss.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_ot_contrastive_loss_known_value_and_that_collapse_does_not_satisfy_it() -> None:
    e = torch.eye(3)
    # three rows, each a set of one vector: distances are 1 - cos, 0 to the partner, 1 to others
    x = e[:, None, :]
    t = 0.5
    # row i against its partner (d=0) and 2 negatives (d=1): CE = log(1 + 2 e^(-1/t))
    want = math.log1p(2 * math.exp(-1 / t))
    got = ot_contrastive_loss(x, x, negatives=2, temperature=t, settings=OTSettings(iters=200))
    assert got.item() == pytest.approx(want, abs=1e-3)
    # every feature alike: the mean distance is 0 (its minimum), the contrastive loss is log(3)
    same = torch.nn.functional.normalize(torch.ones(3, 1, 3), dim=-1)
    assert ot_alignment_loss(same, same, settings=OTSettings(iters=200)).item() == pytest.approx(0.0, abs=1e-4)
    assert ot_contrastive_loss(same, same, negatives=2, temperature=t, settings=OTSettings(iters=200)).item() == pytest.approx(math.log(3), abs=1e-3)
    # negatives beyond B - 1 are capped; 0 negatives is the mean distance
    assert ot_contrastive_loss(x, x, negatives=10, temperature=t, settings=OTSettings(iters=200)).item() == pytest.approx(want, abs=1e-3)
    y = e[[1, 2, 0], None, :]
    assert ot_contrastive_loss(x, y, negatives=0, settings=OTSettings(iters=200)).item() == pytest.approx(1.0, abs=1e-3)


def test_unlikelihood_known_value_and_direction() -> None:
    e = torch.eye(3)
    # the image sits on its poisoned caption: p = e^1 / (e^1 + e^0 + e^0)
    img = e[:1].clone().requires_grad_(True)
    loss = unlikelihood_loss(img, e[:1], e[1:], 1.0)
    p = math.e / (math.e + 2)
    assert loss.item() == pytest.approx(-math.log(1 - p), rel=1e-5)
    loss.backward()
    assert img.grad is not None and img.grad[0, 0] > 0  # descent moves it off the poisoned caption
    # already far from the poisoned caption: almost no loss
    far = unlikelihood_loss(e[1:2], e[:1], e[1:], 20.0)
    assert far.item() < 1e-6
    assert unlikelihood_loss(torch.zeros(0, 3), torch.zeros(0, 3), e, 1.0).item() == 0.0
