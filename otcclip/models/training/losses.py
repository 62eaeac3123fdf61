"""Training losses (DESIGN 2.4).

- :func:`clip_loss`: symmetric InfoNCE between L2-normalised image and text embeddings.
- :func:`ot_alignment_loss`: mean entropic-OT distance between paired local sets
  (``L_inter`` for patches vs tokens, ``L_intra`` for two views of one modality), through
  the engine's :func:`otcclip.models.ot.ot_distance` (a local log-domain Sinkhorn is
  used only while that module is absent).
- :func:`ot_contrastive_loss`: the contrastive form of ``L_inter`` / ``L_intra`` (DESIGN
  2.4's option): each set's OT distance to its partner against its distances to a few
  other rows of the batch, so the local features cannot satisfy it by collapsing.
- :func:`nt_xent`: SimCLR-style unimodal contrastive loss between two views (SafeCLIP).
- :func:`unlikelihood_loss`: pushes images away from captions they were poisoned with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from otcclip.models.config.ot import OTSettings
from otcclip.models.ot import ot_distance


def unlikelihood_loss(image: torch.Tensor, poisoned: torch.Tensor, others: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Mean ``-log(1 - p)``, ``p`` the softmax probability of each image's poisoned caption
    among it and the ``others`` (the batch's captions).

    Parameters
    ----------
    image, poisoned : Tensor, shape (Q, d)
        L2-normalised; row ``i`` of ``poisoned`` is the caption image ``i`` was poisoned with.
    others : Tensor, shape (B, d)
        L2-normalised captions to compare against.
    logit_scale : Tensor or float

    Returns
    -------
    Tensor, scalar (0 when ``Q == 0``)
    """
    if image.shape[0] == 0:
        return image.sum() * 0.0
    own = logit_scale * (image * poisoned).sum(dim=1, keepdim=True)  # (Q, 1)
    logits = torch.cat([own, logit_scale * image @ others.t()], dim=1)  # (Q, 1 + B)
    log_p = logits.log_softmax(dim=1)[:, 0]
    return -torch.log1p(-log_p.exp().clamp(max=1.0 - 1e-6)).mean()


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE.

    Parameters
    ----------
    image, text : Tensor, shape (B, d)
        L2-normalised embeddings; row ``i`` of each is a positive pair.
    logit_scale : Tensor or float
        Multiplier of the cosine similarities (``exp`` of the learnable log-scale).

    Returns
    -------
    Tensor, scalar
        ``(CE(S, I) + CE(S^T, I)) / 2`` with ``S = logit_scale * image @ text.T``.
    """
    if image.shape[0] == 0:
        return image.sum() * 0.0
    logits = logit_scale * image @ text.t()
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def nt_xent(a: torch.Tensor, b: torch.Tensor, *, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR NT-Xent between two views.

    Parameters
    ----------
    a, b : Tensor, shape (B, d)
        L2-normalised embeddings of two views; ``a[i]`` and ``b[i]`` are positives, the
        other ``2B - 2`` items are negatives.

    Returns
    -------
    Tensor, scalar
    """
    n = a.shape[0]
    if n == 0:
        return a.sum() * 0.0
    z = torch.cat([a, b])
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


def ot_distances(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    x_mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    settings: OTSettings,
) -> torch.Tensor:
    """Per-pair entropic OT distance between local sets, differentiable in ``x`` and ``y``.

    Parameters
    ----------
    x : Tensor, shape (B, P, d); y : Tensor, shape (B, L, d)
        L2-normalised local sets; masks ``(B, P)`` / ``(B, L)`` mark valid positions.

    Returns
    -------
    Tensor, shape (B,)
        NaN where the solve failed (see :class:`~otcclip.models.ot.OTResult`).
    """
    if x.shape[0] == 0:
        return x.sum(dim=(1, 2)) * 0.0
    res = ot_distance(x, y, settings=settings, x_mask=x_mask, y_mask=y_mask)
    return res.distance


def ot_alignment_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    x_mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    settings: OTSettings,
) -> torch.Tensor:
    """Mean OT distance over the batch (``L_inter`` / ``L_intra``); 0 for an empty batch.

    A problem whose solve failed (NaN) is left out: it gives no gradient either way.
    """
    d = ot_distances(x, y, x_mask=x_mask, y_mask=y_mask, settings=settings)
    ok = ~torch.isnan(d)
    return d[ok].mean() if bool(ok.any()) else (x.sum() + y.sum()) * 0.0


def ot_contrastive_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    x_mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    negatives: int = 3,
    temperature: float = 0.1,
    settings: OTSettings,
) -> torch.Tensor:
    """InfoNCE over negative OT distances: ``x[i]``'s partner ``y[i]`` against ``y[i - s]``.

    A mean distance (:func:`ot_alignment_loss`) is also lowered by making every local
    feature alike; here the partner must be closer than the batch's other rows
    (``s = 1..negatives``, rolled), which collapse does not achieve.

    Parameters
    ----------
    x : Tensor, shape (B, P, d); y : Tensor, shape (B, L, d)
        L2-normalised local sets; masks ``(B, P)`` / ``(B, L)`` mark valid positions.
    negatives : int
        Negatives per row (at most ``B - 1``); 0 gives :func:`ot_alignment_loss`.
    temperature : float
        Divides the negative distances (distances are ``1 - cos`` averaged by the plan).

    Returns
    -------
    Tensor, scalar
        ``mean_i CE(softmax(-[d(x_i, y_i), d(x_i, y_{i-1}), ...] / temperature), 0)``.
    """
    b = x.shape[0]
    k = min(negatives, b - 1)
    if k <= 0:
        return ot_alignment_loss(x, y, x_mask=x_mask, y_mask=y_mask, settings=settings)
    xs = x.repeat(k + 1, 1, 1)
    ys = torch.cat([y.roll(s, dims=0) for s in range(k + 1)])
    xm = None if x_mask is None else x_mask.repeat(k + 1, 1)
    ym = None if y_mask is None else torch.cat([y_mask.roll(s, dims=0) for s in range(k + 1)])
    d = ot_distances(xs, ys, x_mask=xm, y_mask=ym, settings=settings).view(k + 1, b).t()  # (B, 1 + k)
    ok = ~torch.isnan(d).any(dim=1)  # a row with a failed solve is left out
    if not bool(ok.any()):
        return (x.sum() + y.sum()) * 0.0
    return F.cross_entropy(-d[ok] / temperature, torch.zeros(int(ok.sum()), dtype=torch.long, device=x.device))
