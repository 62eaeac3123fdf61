"""Fused scores for shortlisted image-caption pairs (DESIGN 2.3 step 3).

``s(i, j) = alpha * <g_i, t_j> + (1 - alpha) * s_OT(i, j)``, computed only for the
``N * (k + 1)`` shortlisted pairs, never for all ``N^2``. Caption local sets may live in
several blocks (feature shards, loaded one at a time), so memory stays at one image
shard plus one caption block.

Only part of the shortlist goes to OT (:func:`ot_candidates`): the own caption always,
and the best ``k_ot`` other candidates whose global score is within ``margin`` of the
image's best. The others keep their global score and get a NaN OT (and fused) score, so
they are never chosen for a re-assignment. Each caption's token set is moved to the
solver's device and precision once per batch of problems and shared by every image that
shortlisted it; problems are ordered by caption length so that a batch pads little.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from otcclip.models.config.ot import OTSettings
from otcclip.models.ot import ot_scores_chunked
from otcclip.models.progress import ProgressFn, StopFn, check_stop

#: Loads a caption block: ``(local (n, L, d), mask (n, L) bool, global (n, d))``.
BlockLoader = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class CaptionBlock:
    """Caption rows ``[start, stop)`` of the whole dataset and how to load their features."""

    start: int
    stop: int
    load: BlockLoader


@dataclass(frozen=True)
class PairScores:
    """Scores of shortlisted pairs; entries where the candidate index is -1 are NaN.

    Attributes
    ----------
    global_, ot, fused : ndarray, shape (N, K), float32
    """

    global_: np.ndarray
    ot: np.ndarray
    fused: np.ndarray


def fuse(global_: np.ndarray, ot: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha * global + (1 - alpha) * ot`` (elementwise, float32).

    Where the OT solve failed (``ot`` NaN, ``global_`` finite) the OT score is no
    evidence: it is replaced by its least-squares prediction from the global score over
    the pairs that solved, so the fused score says what the global score alone says.
    """
    ot = np.asarray(ot, dtype=np.float64)
    g = np.asarray(global_, dtype=np.float64)
    miss = np.isnan(ot) & np.isfinite(g)
    if miss.any():
        both = np.isfinite(ot) & np.isfinite(g)
        if both.sum() >= 2 and np.ptp(g[both]) > 0:
            slope, icpt = np.polyfit(g[both], ot[both], 1)
        else:  # too few solved pairs to fit: the global score, shifted to the OT scores' level
            slope, icpt = 1.0, float(np.mean(ot[both] - g[both])) if both.any() else 0.0
        ot = np.where(miss, icpt + slope * g, ot)
    return (alpha * g + (1.0 - alpha) * ot).astype(np.float32)


def ot_candidates(candidates: np.ndarray, global_scores: np.ndarray, *, k_ot: int | None = None,
                  margin: float | None = None) -> np.ndarray:
    """Which shortlisted candidates get an OT score.

    Parameters
    ----------
    candidates : ndarray, shape (N, K), int64
        Column 0 is the own caption, the others best-first by global score; ``-1`` none.
    global_scores : ndarray, shape (N, K)
    k_ot : int, optional
        At most this many candidates besides column 0 (None: all).
    margin : float, optional
        Only candidates whose global score is at least the row's best minus ``margin``
        (None: no margin).

    Returns
    -------
    ndarray, shape (N, K), bool
        Column 0 is True wherever it holds a candidate.
    """
    sel = candidates >= 0
    if margin is not None:
        g = np.where(sel, global_scores, -np.inf)
        best = g.max(axis=1, keepdims=True)
        sel &= g >= best - margin
        sel[:, 0] = candidates[:, 0] >= 0
    if k_ot is not None:
        rank = np.cumsum(sel[:, 1:], axis=1)
        sel[:, 1:] &= rank <= k_ot
    return sel


def score_shortlist(
    image_local: torch.Tensor,
    candidates: np.ndarray,
    global_scores: np.ndarray,
    blocks: Sequence[CaptionBlock],
    *,
    alpha: float = 0.5,
    ot_settings: OTSettings = OTSettings(),
    batch_size: int = 256,
    k_ot: int | None = None,
    margin: float | None = None,
    image_global: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> PairScores:
    """OT and fused scores for each image's shortlisted captions.

    Parameters
    ----------
    image_local : Tensor, shape (N, P, d)
        Image patch sets of this shard (fp16 or fp32).
    candidates : ndarray, shape (N, K), int64
        Global caption row per candidate, ``-1`` for none.
    global_scores : ndarray, shape (N, K)
        ``<g_i, t_j>`` for each candidate (from the shortlist).
    blocks : sequence of CaptionBlock
        Caption features covering every candidate row.
    alpha : float
        Weight of the global cosine in the fused score.
    ot_settings : OTSettings
        The OT solver's settings.
    batch_size : int
        OT problems per solver call.
    k_ot, margin : optional
        Which candidates get an OT score (:func:`ot_candidates`); None: all.
    image_global : Tensor, shape (N, d), optional
        Needed for ``marginals="relevance"``.
    device
        Where the OT runs.

    Returns
    -------
    PairScores
        ``ot`` and ``fused`` are NaN where no OT ran (no candidate, or pruned).
    """
    n, kk = candidates.shape
    ot = np.full((n, kk), np.nan, dtype=np.float32)
    scored = ot_candidates(candidates, global_scores, k_ot=k_ot, margin=margin)
    rows, cols = np.nonzero(scored)
    cand = candidates[rows, cols]
    total, done = len(cand), 0
    dev = torch.device(device)
    for block in blocks:
        sel = np.nonzero((cand >= block.start) & (cand < block.stop))[0]
        if len(sel) == 0:
            continue
        cap_local, cap_mask, cap_global = block.load()
        # shortest captions first: each solver batch pads to its own longest caption
        lengths = cap_mask.sum(dim=1).numpy()
        sel = sel[np.argsort(lengths[cand[sel] - block.start], kind="stable")]
        for s in range(0, len(sel), batch_size * 8):
            check_stop(should_stop)
            part = sel[s : s + batch_size * 8]
            r = torch.from_numpy(rows[part])
            uniq, inv = np.unique(cand[part] - block.start, return_inverse=True)
            u = torch.from_numpy(uniq)
            length = int(lengths[uniq].max())
            # one copy per distinct caption, shared by every image that shortlisted it
            yu = cap_local[u][:, :length].to(dev)
            ymu = cap_mask[u][:, :length].to(dev)
            iv = torch.from_numpy(inv.reshape(-1)).to(dev)
            x = image_local[r].to(dev)
            xg = image_global[r].to(dev) if image_global is not None else None
            yg = cap_global[u].to(dev, torch.float32)[iv] if ot_settings.marginals == "relevance" else None
            s_ot = ot_scores_chunked(
                x, yu[iv], y_mask=ymu[iv], settings=ot_settings, batch_size=batch_size, x_global=xg, y_global=yg,
            )
            ot[rows[part], cols[part]] = s_ot.float().cpu().numpy()
            done += len(part)
            if progress is not None:
                progress("ot", done, total)
    if done != total:
        raise ValueError(f"{total - done} shortlisted captions lie outside every caption block")
    g = np.where(candidates >= 0, global_scores, np.nan).astype(np.float32)
    # a failed solve (NaN among the scored) is imputed by fuse; a pruned candidate has no
    # fused score, so it is never chosen
    fused = np.where(scored, fuse(g, ot, alpha), np.nan).astype(np.float32)
    return PairScores(global_=g, ot=ot, fused=fused)
