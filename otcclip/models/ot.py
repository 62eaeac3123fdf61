"""Batched entropic optimal transport between local feature sets (DESIGN 2.2).

Every problem in a batch compares one image's patch set ``x`` (``P`` points) with one
caption's token set ``y`` (``L`` points) under the cost ``C_kl = 1 - <x_k, y_l>``.
Problems are solved together by a batched Sinkhorn on torch (so on the GPU when the
tensors live there). Padded positions get zero marginal mass, never an infinite cost, so
every padded problem has the same solution as its unpadded original.

Domain and precision are chosen per problem by its numerical range: the plain-domain
Sinkhorn works on ``K = exp(-(C - r) / reg)`` with ``r`` the row-wise minimum of the
cost (a shift that leaves the plan unchanged), so every entry of ``K`` lies in
``[exp(-R / reg), 1]`` where ``R`` is the largest spread of a row of the cost (at most
its range). When ``R / reg`` is at
most :data:`PLAIN_MAX_RANGE_OVER_REG` the scalings stay far inside float32's range and the
problem is solved with two batched mat-vec products per iteration; above it (a small
``reg`` against a wide cost range) it is solved in the log domain with ``logsumexp``,
many times slower but exact at any ``reg``. Inputs in float16/bfloat16 are solved in
float32, float32 in float32 and float64 in float64. A plain solve that produces a
non-finite plan is redone in the log domain.

The convergence test (L2 norm of the row-marginal error below ``tol``, every
:data:`CHECK_EVERY` iterations) is per problem: a problem that has converged leaves the
batch, so easy problems do not pay for the hard ones. POT's batched solver
(:func:`ot.batch.solve_batch`) stops only when every problem of the batch has converged.

The returned distance ``<T*, C>`` is differentiable with respect to ``x`` and ``y`` by
the envelope theorem: the plan is computed without a graph and treated as a constant,
and the gradient flows through the cost only. This keeps memory at one cost tensor per
batch however many Sinkhorn iterations run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from otcclip.models.config.ot import OTSettings

log = logging.getLogger(__name__)

#: Total plan mass further than this from 1 marks a failed solve (underflow, NaN).
MASS_TOL = 0.05
#: Largest cost range over ``reg`` solved in the plain domain (``exp(-50)`` ~ 2e-22 is far
#: from float32's smallest normal, 1e-38, and the scalings stay below ``exp(50)``).
PLAIN_MAX_RANGE_OVER_REG = 50.0
#: Iterations between convergence checks.
CHECK_EVERY = 10


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
        Sinkhorn iterations run by the slowest problem.
    log_domain : Tensor, shape (B,), bool
        Which problems were solved in the log domain.
    """

    distance: torch.Tensor
    plan: torch.Tensor | None
    n_iter: int
    log_domain: torch.Tensor | None = None

    @property
    def score(self) -> torch.Tensor:
        """``s_OT = 1 - d_OT``, shape (B,) (NaN where the solve failed)."""
        return 1.0 - self.distance

    @property
    def failed(self) -> torch.Tensor:
        """(B,) bool: problems whose solve failed (distance NaN)."""
        return torch.isnan(self.distance)


def _converged(err: torch.Tensor, tol: float) -> torch.Tensor:
    """Problems whose marginal error is below ``tol``; a non-finite error also ends a problem."""
    return (err < tol) | ~torch.isfinite(err)


def _sinkhorn_plain(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float, iters: int,
                    tol: float) -> tuple[torch.Tensor, int]:
    """Plain-domain Sinkhorn with per-problem stopping; returns the plans and the iterations run.

    ``cost`` (B, P, L) must already be shifted so that every valid row's minimum is 0 and
    padded entries are 0; ``a`` (B, P) and ``b`` (B, L) are zero at pads.
    """
    kern = torch.exp(-cost / reg)
    tiny = torch.finfo(kern.dtype).tiny
    f_out, g_out = torch.zeros_like(a), torch.zeros_like(b)
    idx = torch.arange(kern.shape[0], device=kern.device)
    k_act, a_act, b_act = kern, a, b
    g = torch.ones_like(b)
    f = a
    done_iters = 0
    while idx.numel():
        steps = min(CHECK_EVERY, iters - done_iters)
        for _ in range(steps):
            f = a_act / (k_act * g[:, None, :]).sum(dim=2).clamp_min(tiny)
            g = b_act / (k_act * f[:, :, None]).sum(dim=1).clamp_min(tiny)
        done_iters += steps
        err = torch.linalg.vector_norm(f * (k_act * g[:, None, :]).sum(dim=2) - a_act, dim=1)
        fin = _converged(err, tol) if done_iters < iters else torch.ones_like(err, dtype=torch.bool)
        f_out[idx[fin]], g_out[idx[fin]] = f[fin], g[fin]
        keep = ~fin
        idx, k_act, a_act, b_act, g, f = idx[keep], k_act[keep], a_act[keep], b_act[keep], g[keep], f[keep]
    return f_out[:, :, None] * kern * g_out[:, None, :], done_iters


def _sinkhorn_log(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float, iters: int,
                  tol: float) -> tuple[torch.Tensor, int]:
    """Log-domain Sinkhorn with per-problem stopping (any ``reg``); same contract as the plain one."""
    lk = -cost / reg
    loga, logb = torch.log(a), torch.log(b)
    u_out, v_out = torch.zeros_like(a), torch.zeros_like(b)
    idx = torch.arange(lk.shape[0], device=lk.device)
    k_act, la, lb = lk, loga, logb
    v = torch.zeros_like(b)
    u = torch.zeros_like(a)
    done_iters = 0
    while idx.numel():
        steps = min(CHECK_EVERY, iters - done_iters)
        for _ in range(steps):
            u = la - torch.logsumexp(k_act + v[:, None, :], dim=2)
            v = lb - torch.logsumexp(k_act + u[:, :, None], dim=1)
        done_iters += steps
        row = torch.exp(u + torch.logsumexp(k_act + v[:, None, :], dim=2))
        err = torch.linalg.vector_norm(row - la.exp(), dim=1)
        fin = _converged(err, tol) if done_iters < iters else torch.ones_like(err, dtype=torch.bool)
        u_out[idx[fin]], v_out[idx[fin]] = u[fin], v[fin]
        keep = ~fin
        idx, k_act, la, lb, u, v = idx[keep], k_act[keep], la[keep], lb[keep], u[keep], v[keep]
    return torch.exp(lk + u_out[:, :, None] + v_out[:, None, :]), done_iters


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
        marginal-error tolerance (checked every :data:`CHECK_EVERY` steps, per problem);
        ``marginals``: uniform over valid positions, or ``relevance``, a softmax of each local feature's similarity to
        the other side's global vector (``x_global`` (B, d) and ``y_global`` (B, d)) at
        temperature ``relevance_temp``; ``method``: ``auto`` solves each problem in the
        plain domain when its cost range over ``reg`` is at most
        :data:`PLAIN_MAX_RANGE_OVER_REG` and in the log domain otherwise (see the module
        doc), ``sinkhorn`` / ``log_sinkhorn`` force one domain; ``debias``: return the
        debiased Sinkhorn divergence ``OT(X, Y) - (OT(X, X) + OT(Y, Y)) / 2`` (each self
        term with its side's marginals on both sides); ``reg_relative``: ``reg`` is a
        share of each problem's cost spread, so a model whose costs all lie close
        together still gets a plan that is not near uniform.
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
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    xf, yf = x.to(dtype), y.to(dtype)
    cost = 1.0 - torch.bmm(xf, yf.transpose(1, 2))  # (B, P, L), carries the graph
    a = _marginal(x_mask, xf, y_global, settings.marginals, settings.relevance_temp).to(dtype)
    b = _marginal(y_mask, yf, x_global, settings.marginals, settings.relevance_temp).to(dtype)

    def solve(c: torch.Tensor, ma: torch.Tensor, mb: torch.Tensor, wa: torch.Tensor,
              wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """Detached plans of costs ``c`` with marginals ``wa``/``wb`` (valid positions
        ``ma``/``mb``): plans, which problems failed, iterations run, which ran in the log domain."""
        with torch.no_grad():
            cd = _relative_cost(c.detach(), ma, mb) if settings.reg_relative else c.detach()
            nb = cd.shape[0]
            valid = ma[:, :, None] & mb[:, None, :]
            big = torch.finfo(dtype).max
            row_min = cd.masked_fill(~valid, big).amin(dim=2, keepdim=True)
            row_min = torch.where(ma[:, :, None], row_min, torch.zeros_like(row_min))
            shifted = (cd - row_min).masked_fill(~valid, 0.0)  # same plan; 0 at pads
            span = shifted.amax(dim=(1, 2))  # largest row spread of each problem (at most its cost range)
            if method == "sinkhorn":
                use_log = torch.zeros(nb, dtype=torch.bool, device=dev)
            elif method == "log_sinkhorn":
                use_log = torch.ones(nb, dtype=torch.bool, device=dev)
            else:
                use_log = span / reg > PLAIN_MAX_RANGE_OVER_REG
            pl = torch.zeros_like(shifted)
            n_it = 0
            plain = torch.nonzero(~use_log).squeeze(1)
            if plain.numel():
                t, n = _sinkhorn_plain(shifted[plain], wa[plain], wb[plain], reg=reg, iters=settings.iters, tol=settings.tol)
                pl[plain] = t
                n_it = max(n_it, n)
                if method == "auto":
                    bad = ~torch.isfinite(t).all(dim=2).all(dim=1)
                    use_log[plain[bad]] = True
            logs = torch.nonzero(use_log).squeeze(1)
            if logs.numel():
                t, n = _sinkhorn_log(shifted[logs], wa[logs], wb[logs], reg=reg, iters=settings.iters, tol=settings.tol)
                pl[logs] = t
                n_it = max(n_it, n)
            pl = pl.masked_fill(~valid, 0.0)
            failed = _failed(pl)
            pl = torch.nan_to_num(pl, nan=0.0, posinf=0.0, neginf=0.0).masked_fill(failed[:, None, None], 0.0)
        return pl, failed, n_it, use_log

    plan, failed, n_iter, log_domain = solve(cost, x_mask, y_mask, a, b)
    distance = (plan * cost).sum(dim=(1, 2))
    if settings.debias:
        # Sinkhorn divergence (Feydy et al., AISTATS 2019): the entropic plan of a set with
        # itself is not the identity, so OT(X, X) > 0; subtracting the self terms makes
        # the distance vanish for identical sets and stops it from rewarding collapsed sets
        cxx = 1.0 - torch.bmm(xf, xf.transpose(1, 2))
        cyy = 1.0 - torch.bmm(yf, yf.transpose(1, 2))
        pxx, fxx, _, _ = solve(cxx, x_mask, x_mask, a, a)
        pyy, fyy, _, _ = solve(cyy, y_mask, y_mask, b, b)
        distance = distance - 0.5 * ((pxx * cxx).sum(dim=(1, 2)) + (pyy * cyy).sum(dim=(1, 2)))
        failed = failed | fxx | fyy
    # a failed solve is no evidence: NaN, never the 0 of a perfect match
    distance = distance.masked_fill(failed, float("nan"))
    if failed.any():
        log.warning("OT: %d of %d problems failed to solve (reg %g, method %s); their distance is NaN",
                    int(failed.sum()), bsz, reg, method)
    return OTResult(distance=distance, plan=plan if return_plan else None, n_iter=n_iter, log_domain=log_domain)


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
