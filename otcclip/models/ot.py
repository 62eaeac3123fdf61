"""Batched entropic optimal transport between local feature sets (DESIGN 2.2).

Every problem in a batch compares one image's patch set ``x`` (``P`` points) with one
caption's token set ``y`` (``L`` points) under the cost ``C_kl = 1 - <x_k, y_l>``.
Problems are solved together by POT's batched solver :func:`ot.batch.solve_batch` on the
torch backend (so on the GPU when the tensors live there). Padded positions get zero
marginal mass, never an infinite cost, so every padded problem has the same solution as
its unpadded original.

The returned distance ``<T*, C>`` is differentiable with respect to ``x`` and ``y`` by
the envelope theorem: the plan is computed without a graph and treated as a constant,
and the gradient flows through the cost only. This keeps memory at one cost tensor per
batch however many Sinkhorn iterations run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ot.batch
import torch

from otcclip.models.config.ot import OTSettings

log = logging.getLogger(__name__)

#: Total plan mass further than this from 1 marks a failed solve (underflow, NaN).
MASS_TOL = 0.05
#: At or above this ``reg`` (in float32/64, on the CPU) the plain-domain Sinkhorn is used.
PLAIN_DOMAIN_MIN_REG = 0.1


@dataclass(frozen=True)
class OTResult:
    """Result of :func:`ot_distance`.

    Attributes
    ----------
    distance : Tensor, shape (B,)
        ``<T*, C>`` per problem (linear OT cost of the entropic plan), in ``[0, 2]``;
        with ``debias`` the Sinkhorn divergence (about 0 for identical sets). NaN where
        the solve failed (non-finite plan or plan mass not ~1): callers treat it as no
        evidence. Differentiable w.r.t. the input features (envelope gradient).
    plan : Tensor, shape (B, P, L) or None
        The detached transport plans when ``return_plan`` was True.
    n_iter : int
        Sinkhorn iterations run (the batch stops when all problems converged).
    """

    distance: torch.Tensor
    plan: torch.Tensor | None
    n_iter: int

    @property
    def score(self) -> torch.Tensor:
        """``s_OT = 1 - d_OT``, shape (B,) (NaN where the solve failed)."""
        return 1.0 - self.distance

    @property
    def failed(self) -> torch.Tensor:
        """(B,) bool: problems whose solve failed (distance NaN)."""
        return torch.isnan(self.distance)


def _marginal(
    mask: torch.Tensor, feats: torch.Tensor, other_global: torch.Tensor | None, mode: str, temp: float
) -> torch.Tensor:
    """Marginal weights (B, n) summing to 1 over valid positions, 0 at pads."""
    maskf = mask.to(torch.float32)
    if mode == "uniform":
        return maskf / maskf.sum(dim=1, keepdim=True)
    if mode != "relevance":
        raise ValueError(f"marginals must be 'uniform' or 'relevance', got {mode!r}")
    if other_global is None:
        raise ValueError("relevance-weighted marginals need x_global and y_global")
    rel = torch.einsum("bnd,bd->bn", feats.detach().float(), other_global.detach().float()) / temp
    rel = rel.masked_fill(~mask, float("-inf"))
    return torch.softmax(rel, dim=1)


def _relative_cost(cost: torch.Tensor, x_mask: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
    """Each problem's cost shifted to min 0 and divided by its spread (max - min) over
    valid entries: solving it with ``reg`` is solving the original with ``reg * spread``
    (a constant shift does not change the plan under fixed marginals)."""
    valid = x_mask[:, :, None] & y_mask[:, None, :]
    lo = cost.masked_fill(~valid, float("inf")).amin(dim=(1, 2), keepdim=True)
    hi = cost.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    return ((cost - lo) / (hi - lo).clamp_min(1e-6)).masked_fill(~valid, 0.0)


def _failed(plan: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the plan has a non-finite entry or its mass is not ~1."""
    finite = torch.isfinite(plan).all(dim=2).all(dim=1)
    mass = torch.nan_to_num(plan, nan=0.0, posinf=0.0, neginf=0.0).sum(dim=(1, 2))
    return ~finite | ((mass - 1.0).abs() > MASS_TOL)


def ot_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    settings: OTSettings = OTSettings(),
    x_mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    x_global: torch.Tensor | None = None,
    y_global: torch.Tensor | None = None,
    return_plan: bool = False,
) -> OTResult:
    """Entropic OT distance between batched local sets.

    Parameters
    ----------
    x : Tensor, shape (B, P, d)
        L2-normalised local set per problem (image patches), any float dtype.
    y : Tensor, shape (B, L, d)
        L2-normalised local set per problem (caption tokens).
    settings : OTSettings
        ``reg``: entropic regularisation; ``iters``, ``tol``: Sinkhorn iteration cap and
        marginal-error tolerance (checked every 10 steps); ``marginals``: uniform over
        valid positions, or ``relevance``, a softmax of each local feature's similarity to
        the other side's global vector (``x_global`` (B, d) and ``y_global`` (B, d)) at
        temperature ``relevance_temp``; ``method``: ``auto`` solves in the log domain
        unless ``reg >= 0.1``, inputs are float32/64 and the problems are on the CPU;
        ``debias``: return the debiased Sinkhorn divergence
        ``OT(X, Y) - (OT(X, X) + OT(Y, Y)) / 2`` (each self term with its side's
        marginals on both sides); ``reg_relative``: ``reg`` is a share of each problem's
        cost spread, so a model whose costs all lie close together still gets a plan that
        is not near uniform.
    x_mask, y_mask : Tensor, shape (B, P) / (B, L), bool, optional
        True at valid positions; pads get zero mass. Every problem needs at least one
        valid position on each side.
    return_plan : bool
        Also return the detached plans (B, P, L).

    Returns
    -------
    OTResult
    """
    if x.ndim != 3 or y.ndim != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"expected x (B,P,d) and y (B,L,d), got {tuple(x.shape)} and {tuple(y.shape)}")
    reg, method = settings.reg, settings.method
    bsz, p, n_l = x.shape[0], x.shape[1], y.shape[1]
    dev = x.device
    if x_mask is None:
        x_mask = torch.ones(bsz, p, dtype=torch.bool, device=dev)
    if y_mask is None:
        y_mask = torch.ones(bsz, n_l, dtype=torch.bool, device=dev)
    x_mask = x_mask.to(device=dev, dtype=torch.bool)
    y_mask = y_mask.to(device=dev, dtype=torch.bool)
    if bsz == 0:
        zero = (x.sum() + y.sum()) * 0.0
        return OTResult(distance=zero.reshape(1)[:0].float(), plan=None, n_iter=0)
    if not bool(x_mask.any(dim=1).all()) or not bool(y_mask.any(dim=1).all()):
        raise ValueError("every OT problem needs at least one valid position in x and in y")
    reduced = x.dtype in (torch.float16, torch.bfloat16) or y.dtype in (torch.float16, torch.bfloat16)
    xf, yf = x.float(), y.float()
    cost = 1.0 - torch.bmm(xf, yf.transpose(1, 2))  # (B, P, L), carries the graph
    a = _marginal(x_mask, xf, y_global, settings.marginals, settings.relevance_temp)
    b = _marginal(y_mask, yf, x_global, settings.marginals, settings.relevance_temp)
    if method == "auto":
        plain_ok = reg >= PLAIN_DOMAIN_MIN_REG and not reduced and dev.type == "cpu"
        method = "sinkhorn" if plain_ok else "log_sinkhorn"
    def solve(c: torch.Tensor, ma: torch.Tensor, mb: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Detached plan of cost ``c`` with marginals ``wa``/``wb`` (valid positions ``ma``/``mb``),
        which problems failed, and the iterations run."""
        with torch.no_grad():
            cd = _relative_cost(c.detach(), ma, mb) if settings.reg_relative else c.detach()
            res = ot.batch.solve_batch(cd, reg=reg, a=wa, b=wb, max_iter=settings.iters, tol=settings.tol, method=method, grad="detach")
            pl = res.plan.masked_fill(~(ma[:, :, None] & mb[:, None, :]), 0.0)
            failed = _failed(pl)
            pl = torch.nan_to_num(pl, nan=0.0, posinf=0.0, neginf=0.0).masked_fill(failed[:, None, None], 0.0)
        k = int(res.log.get("n_iter", 0)) + 1 if isinstance(res.log, dict) else settings.iters
        return pl, failed, k

    plan, failed, n_iter = solve(cost, x_mask, y_mask, a, b)
    distance = (plan * cost).sum(dim=(1, 2))
    if settings.debias:
        # Sinkhorn divergence (Feydy et al., AISTATS 2019): the entropic plan of a set with
        # itself is not the identity, so OT(X, X) > 0; subtracting the self terms makes
        # the distance vanish for identical sets and stops it from rewarding collapsed sets
        cxx = 1.0 - torch.bmm(xf, xf.transpose(1, 2))
        cyy = 1.0 - torch.bmm(yf, yf.transpose(1, 2))
        pxx, fxx, _ = solve(cxx, x_mask, x_mask, a, a)
        pyy, fyy, _ = solve(cyy, y_mask, y_mask, b, b)
        distance = distance - 0.5 * ((pxx * cxx).sum(dim=(1, 2)) + (pyy * cyy).sum(dim=(1, 2)))
        failed = failed | fxx | fyy
    # a failed solve is no evidence: NaN, never the 0 of a perfect match
    distance = distance.masked_fill(failed, float("nan"))
    if failed.any():
        log.warning("OT: %d of %d problems failed to solve (reg %g, method %s); their distance is NaN",
                    int(failed.sum()), bsz, reg, method)
    return OTResult(distance=distance, plan=plan if return_plan else None, n_iter=n_iter)


def ot_scores_chunked(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    x_mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
    settings: OTSettings = OTSettings(),
    batch_size: int = 256,
    x_global: torch.Tensor | None = None,
    y_global: torch.Tensor | None = None,
) -> torch.Tensor:
    """``s_OT = 1 - d_OT`` for many problems, solved ``batch_size`` at a time, no graph.

    Shapes as in :func:`ot_distance`; returns a float32 Tensor of shape (B,) on ``x``'s
    device.
    """
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            e = s + batch_size
            res = ot_distance(
                x[s:e],
                y[s:e],
                x_mask=None if x_mask is None else x_mask[s:e],
                y_mask=None if y_mask is None else y_mask[s:e],
                settings=settings,
                x_global=None if x_global is None else x_global[s:e],
                y_global=None if y_global is None else y_global[s:e],
            )
            out.append(res.score)
    if not out:
        return torch.zeros(0, device=x.device)
    return torch.cat(out)
