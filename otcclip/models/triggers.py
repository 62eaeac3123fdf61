"""Trigger templates: the one pattern shared by the images a trigger detector flags.

A backdoor works because every poisoned image carries the *same* trigger. The
trigger-sensitivity detector (:mod:`otcclip.models.decisions`) only sees, pair by pair,
that a model's score rests on what a purifier removes; a model still in training sees
it on part of the poisoned images and on some clean ones. This module turns those
flags into seeds: what the purifier removes from the seed images is averaged (image
content averages out, a shared trigger adds up), and every image in the dataset is
matched against that template by normalised cross-correlation in pixel space. Images
that carry the trigger stand tens of robust standard deviations above the rest; seeds
that share no pattern give a template nothing matches, so nothing is flagged.

Two template kinds, one per purified view (:data:`otcclip.models.features.PURIFIERS`):

- ``additive`` (view ``low_pass``): a pattern over the whole image (blended noise). The
  template is the mean high-frequency residual ``x - low_pass(x)`` of the seeds; an
  image's match is the correlation of its residual with the template.
- ``patch`` (view ``fill_local``): a small pattern at any position (a noise patch). The
  template is the mean of the seeds' most high-frequency windows; an image's match is
  the best correlation of any of its windows with the template.

Estimates are cross-fitted (a seed is scored against the template of the other half of
the seeds, so a seed never matches itself) and refined: images above ``z_refine`` become
the next round's seeds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from otcclip.models.detectors import robust_z
from otcclip.models.features import PURIFIERS, low_pass

if TYPE_CHECKING:
    from otcclip.models.config.detectors import DecisionSettings
    from otcclip.models.decisions import Decisions

log = logging.getLogger(__name__)

#: Reason code of pairs whose image carries a found trigger template.
TEMPLATE_REASON = "trigger_template"

#: Template kind per purified view, in the order of ``PURIFIERS``.
TEMPLATE_KINDS: tuple[str, ...] = ("additive", "patch")
assert len(TEMPLATE_KINDS) == len(PURIFIERS)

ImageGetter = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TemplateConfig:
    """How templates are searched.

    Attributes
    ----------
    z_flag : float
        An image carries the trigger when its match is this many robust standard
        deviations (median / 1.4826 MAD over all images) above the median.
    z_refine : float
        Images above this become the seeds of the next refinement round.
    min_support : int
        Fewer images than this above ``z_flag`` (or as seeds) means no shared pattern.
    rounds : int
        Estimate-and-match rounds (the first from the detector's seeds).
    copy_ncc : float
        When the seeds' mean matches nothing, the rounds restart from the seeds that are
        near-copies of one another (correlation of their residuals or windows above this).
    max_cores : int
        Groups of near-copies tried, closest first, until one gives a template.
    patch_frac : float
        Side of a ``patch`` template as a share of the shorter image side (as
        :func:`~otcclip.models.features.fill_local`).
    chunk : int
        Images matched per step (memory bound).
    """

    z_flag: float = 12.0
    z_refine: float = 3.0
    min_support: int = 10
    rounds: int = 3
    copy_ncc: float = 0.9
    max_cores: int = 8
    patch_frac: float = 0.25
    chunk: int = 1024


@dataclass(frozen=True)
class TriggerTemplate:
    """A shared trigger pattern, in the normalised image space it was estimated in.

    Attributes
    ----------
    kind : {"additive", "patch"}
    pattern : Tensor
        ``additive``: shape (C, H, W), added to an image; ``patch``: shape (C, s, s),
        pasted over a window.
    support : int
        Images it was estimated from (the flagged ones).
    """

    kind: str
    pattern: torch.Tensor
    support: int


@dataclass(frozen=True)
class TemplateSearch:
    """Outcome of :func:`search_template` over N images.

    Attributes
    ----------
    kind : str
    z : ndarray, shape (N,)
        Robust z of each image's match with the final template (zeros when no seeds).
    flagged : ndarray of bool, shape (N,)
        ``z > z_flag``, or all False when fewer than ``min_support`` pass.
    template : TriggerTemplate or None
        None when no shared pattern was found.
    rounds : int
        Rounds run.
    """

    kind: str
    z: np.ndarray
    flagged: np.ndarray
    template: TriggerTemplate | None
    rounds: int


def _side(h: int, w: int, frac: float) -> int:
    return max(1, min(h, w, round(frac * min(h, w))))


def _seed_features(x: torch.Tensor, kind: str, side: int) -> torch.Tensor:
    """(n, D) what the purifier removes: the residual, or the most high-frequency window."""
    res = x - low_pass(x)
    if kind == "additive":
        return res.flatten(1)
    n, c = x.shape[:2]
    energy = res.abs().mean(dim=1, keepdim=True)
    win = F.avg_pool2d(energy, side, stride=1)  # (n, 1, H-s+1, W-s+1)
    pos = win.flatten(1).argmax(dim=1)
    y0, x0 = pos // win.shape[-1], pos % win.shape[-1]
    step = torch.arange(side, device=x.device)
    rows = (y0[:, None] + step)[:, None, :, None]  # (n, 1, s, 1)
    cols = (x0[:, None] + step)[:, None, None, :]  # (n, 1, 1, s)
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    out = x[torch.arange(n, device=x.device)[:, None, None, None], chans, rows, cols]  # (n, C, s, s)
    return out.flatten(1)  # the order of F.unfold's columns: channel, row, column


def _centred_unit(v: torch.Tensor) -> torch.Tensor:
    v = v - v.mean(dim=-1, keepdim=True)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _match(x: torch.Tensor, kind: str, templates: torch.Tensor, side: int) -> torch.Tensor:
    """(n,) normalised cross-correlation of each image with its row of ``templates`` (n, D)."""
    t = _centred_unit(templates)
    if kind == "additive":
        return (_centred_unit((x - low_pass(x)).flatten(1)) * t).sum(dim=1)
    # per window: <w, t> / ||w - mean(w)|| (t is zero-mean), by convolution
    n, c = x.shape[:2]
    dot = F.conv2d(
        x.reshape(1, n * c, *x.shape[-2:]), t.reshape(n * c, 1, side, side), groups=n * c
    )
    dot = dot.reshape(n, c, *dot.shape[-2:]).sum(dim=1)  # (n, H-s+1, W-s+1)
    d = c * side * side
    s1 = F.avg_pool2d(x, side, stride=1).sum(dim=1) * side * side
    s2 = F.avg_pool2d(x * x, side, stride=1).sum(dim=1) * side * side
    # a flat window (pixel std < 0.05 normalised units) correlates with nothing
    norm = (s2 - s1 * s1 / d).clamp_min(0.0025 * d).sqrt()
    return (dot / norm).flatten(1).amax(dim=1)


def _mean_features(
    images: ImageGetter, rows: np.ndarray, kind: str, side: int, chunk: int
) -> torch.Tensor:
    total: torch.Tensor | None = None
    for s in range(0, len(rows), chunk):
        f = _seed_features(images(torch.from_numpy(rows[s : s + chunk])).float(), kind, side).sum(
            dim=0
        )
        total = f if total is None else total + f
    assert total is not None
    return total / len(rows)


def search_template(
    images: ImageGetter,
    n: int,
    seeds: np.ndarray,
    *,
    kind: str,
    config: TemplateConfig | None = None,
    generator: torch.Generator | None = None,
) -> TemplateSearch:
    """Find the trigger the seed images share, and every image that carries it.

    Parameters
    ----------
    images : callable
        ``images(idx)`` -> Tensor of shape (len(idx), C, H, W): the normalised images of
        rows ``idx`` (int64), un-augmented.
    n : int
        Number of images.
    seeds : ndarray of bool, shape (N,)
        Images a detector flagged for this view (false alarms allowed).
    kind : {"additive", "patch"}
    config : TemplateConfig, optional
    generator : torch.Generator, optional
        Splits the seeds for cross-fitting.

    Returns
    -------
    TemplateSearch
    """
    cfg = config or TemplateConfig()
    if kind not in TEMPLATE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(TEMPLATE_KINDS)}, not {kind!r}")
    if seeds.shape != (n,):
        raise ValueError(f"seeds must have shape ({n},), got {seeds.shape}")
    none = TemplateSearch(kind, np.zeros(n), np.zeros(n, dtype=bool), None, 0)
    rows = np.flatnonzero(seeds)
    if len(rows) < max(2, cfg.min_support) or n < 2:
        return none
    shape = tuple(images(torch.arange(1)).shape[1:])
    side = _side(shape[-2], shape[-1], cfg.patch_frac)
    found = _refine(images, n, rows, kind, side, shape, cfg, generator)
    # a handful of trigger images among many false alarms: start from seeds whose
    # windows / residuals are near-copies of each other (the closest groups first)
    for core in [] if found.flagged.any() else _near_copy_cores(images, rows, kind, side, cfg):
        found = _refine(images, n, core, kind, side, shape, cfg, generator)
        if found.flagged.any():
            break
    return found


def search_templates(
    images: ImageGetter,
    n: int,
    seeds: np.ndarray,
    *,
    kind: str,
    config: TemplateConfig | None = None,
    generator: torch.Generator | None = None,
    max_templates: int = 3,
) -> list[TemplateSearch]:
    """:func:`search_template` repeated on the seeds the found templates do not explain.

    Two backdoors with the same kind of trigger give two templates. Returns the searches
    that found one (at most ``max_templates``), in the order found.
    """
    out: list[TemplateSearch] = []
    left = seeds.copy()
    for _ in range(max_templates):
        found = search_template(images, n, left, kind=kind, config=config, generator=generator)
        if found.template is None:
            break
        out.append(found)
        left &= ~found.flagged
    return out


def _near_copy_cores(
    images: ImageGetter, rows: np.ndarray, kind: str, side: int, cfg: TemplateConfig
) -> list[np.ndarray]:
    """Groups of seeds that are near-copies of one seed, closest groups first (at most
    ``cfg.max_cores``; each seed in one group at most).

    A shared trigger makes its images' residuals (or windows) near-copies of each other
    (correlation above ``copy_ncc``), which two natural images rarely are; copies of one
    whole image (a targeted attack repeats its target) do not count.
    """
    if len(rows) < 2:
        return []
    feats, whole = [], []
    for s in range(0, len(rows), cfg.chunk):
        x = images(torch.from_numpy(rows[s : s + cfg.chunk])).float()
        feats.append(_centred_unit(_seed_features(x, kind, side)))
        whole.append(_centred_unit(x.flatten(1)))
    f, w = torch.cat(feats), torch.cat(whole)
    gram = (f @ f.t()).cpu().numpy()
    gram[(w @ w.t()).cpu().numpy() > cfg.copy_ncc] = -np.inf  # includes the diagonal
    close = gram > cfg.copy_ncc
    count = close.sum(axis=1)
    strength = np.where(close, gram, 0.0).sum(axis=1)
    used = np.zeros(len(rows), dtype=bool)
    cores: list[np.ndarray] = []
    for i in np.lexsort((-strength, -count)).tolist():
        if count[i] < 1 or len(cores) >= cfg.max_cores:
            break
        if used[i]:
            continue
        members = np.flatnonzero(close[i] & ~used)
        if len(members) == 0:
            continue
        group = np.concatenate([[i], members])
        used[group] = True
        cores.append(np.sort(rows[group]))
    return cores


def _refine(
    images: ImageGetter,
    n: int,
    rows: np.ndarray,
    kind: str,
    side: int,
    shape: tuple[int, ...],
    cfg: TemplateConfig,
    generator: torch.Generator | None,
) -> TemplateSearch:
    """Estimate-and-match rounds from seed rows ``rows`` (images of shape ``(C, H, W)``)."""
    z = np.zeros(n)
    rounds = 0
    for _ in range(cfg.rounds):
        rounds += 1
        perm = torch.randperm(len(rows), generator=generator).numpy()
        half_a, half_b = (
            np.sort(rows[perm[: len(rows) // 2]]),
            np.sort(rows[perm[len(rows) // 2 :]]),
        )
        t_a = _mean_features(images, half_a, kind, side, cfg.chunk)
        t_b = _mean_features(images, half_b, kind, side, cfg.chunk)
        t_all = (len(half_a) * t_a + len(half_b) * t_b) / len(rows)
        # each seed is scored with the other half's template, everything else with all seeds'
        which = np.zeros(n, dtype=np.int64)
        which[half_a], which[half_b] = 2, 1
        bank = torch.stack([t_all, t_a, t_b])
        scores = np.empty(n)
        for s in range(0, n, cfg.chunk):
            idx = torch.arange(s, min(s + cfg.chunk, n))
            x = images(idx).float()
            scores[s : s + len(idx)] = (
                _match(x, kind, bank[torch.from_numpy(which[s : s + len(idx)])], side).cpu().numpy()
            )
        z = robust_z(scores)
        nxt = np.flatnonzero(z > cfg.z_refine)
        if len(nxt) < cfg.min_support or np.array_equal(nxt, rows):
            break
        rows = nxt
    flagged = z > cfg.z_flag
    if int(flagged.sum()) < cfg.min_support:
        return TemplateSearch(kind, z, np.zeros(n, dtype=bool), None, rounds)
    pattern = _mean_features(images, np.flatnonzero(flagged), kind, side, cfg.chunk)
    pshape = shape if kind == "additive" else (shape[0], side, side)
    template = TriggerTemplate(kind, pattern.reshape(pshape).cpu(), int(flagged.sum()))
    return TemplateSearch(kind, z, flagged, template, rounds)


def stamp(
    images: torch.Tensor, template: TriggerTemplate, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply a template to images as the attack would: add it, or paste it somewhere.

    Parameters
    ----------
    images : Tensor, shape (N, C, H, W)
        Normalised images (the space the template was estimated in).
    template : TriggerTemplate
    generator : torch.Generator, optional
        Draws the patch positions.

    Returns
    -------
    Tensor, shape (N, C, H, W)
        A new tensor.
    """
    pattern = template.pattern.to(images.device, images.dtype)
    if template.kind == "additive":
        return images + pattern
    n, _, h, w = images.shape
    side = pattern.shape[-1]
    if side > min(h, w):
        raise ValueError(f"patch of side {side} does not fit images of {h}x{w}")
    out = images.clone()
    ys = torch.randint(h - side + 1, (n,), generator=generator).tolist()
    xs = torch.randint(w - side + 1, (n,), generator=generator).tolist()
    for i, (y, x) in enumerate(zip(ys, xs, strict=True)):
        out[i, :, y : y + side, x : x + side] = pattern
    return out


def template_seeds(
    decisions: Decisions, view: int, *, pool: float, seed_z: float, mismatch_pool: float = 0.0
) -> np.ndarray:
    """(N,) bool seeds of the template search on purified view ``view``.

    Two kinds of evidence point at a backdoor's images, depending on whether the model
    learnt the trigger:

    - trigger sensitivity (a model that reacts to the trigger): the ``pool`` share of
      pairs most trigger-sensitive on that view, pairs whose sensitivity z there exceeds
      ``seed_z``, and pairs the detector flagged through it;
    - mismatch (a model that does not, e.g. one trained on the cleaned data or
      pretrained elsewhere): a backdoor pairs images of any content with the target's
      captions, so another caption describes them better than their own. The
      ``mismatch_pool`` share of pairs whose own fused score the best shortlisted
      caption beats by the widest margin (only pairs it beats at all).

    Either kind may be mostly false alarms: the search keeps only a pattern the seeds
    share. Image bursts and unreadable images are left out (their pattern is not a
    trigger's).
    """
    n = len(decisions)
    z = np.nan_to_num(np.asarray(decisions.sensitivity_z, dtype=np.float64), nan=-np.inf)
    on_view = np.where(np.asarray(decisions.purified_view) == view, z, -np.inf)
    seeds = on_view > seed_z
    top = np.argsort(-on_view, kind="stable")[: int(round(pool * n))]
    seeds[top[np.isfinite(on_view[top])]] = True
    flags = [str(f).split(",") for f in decisions.detectors.tolist()]
    seeds |= np.array(["trigger_sensitivity" in f for f in flags], dtype=bool) & (on_view > -np.inf)
    if mismatch_pool > 0:
        margin = np.asarray(decisions.best_fused_score, np.float64) - np.asarray(decisions.fused_score, np.float64)
        margin = np.where(np.isfinite(margin) & (margin > 0), margin, -np.inf)
        worst = np.argsort(-margin, kind="stable")[: int(round(mismatch_pool * n))]
        seeds[worst[np.isfinite(margin[worst])]] = True
    seeds &= ~np.array(["image_burst" in f for f in flags], dtype=bool)
    seeds &= decisions.reason != "unreadable_image"
    return seeds


def apply_templates(
    decisions: Decisions,
    images: ImageGetter,
    *,
    settings: DecisionSettings,
    seed: int = 0,
    config: TemplateConfig | None = None,
) -> tuple[Decisions, list[TemplateSearch]]:
    """Search the trigger templates behind the trigger-sensitivity evidence and drop every
    image that carries one (reason and detector ``trigger_template``).

    A template match is pixel evidence (tens of robust std above the rest of the data),
    independent of how well the model scores pairs, so it drops whatever the model
    verdict. Without purified views (``purified_view`` all -1) nothing is searched.

    Parameters
    ----------
    decisions : Decisions
        From :func:`~otcclip.models.decisions.decide_pairs` with ``trigger_sensitivity``.
    images : callable
        ``images(idx)`` -> normalised images (len(idx), C, H, W) of rows ``idx``.
    settings : DecisionSettings
        ``template_seed_z``, ``template_pool`` and ``template_mismatch_pool`` choose
        the seeds (:func:`template_seeds`).

    Returns
    -------
    (Decisions, list of TemplateSearch)
        New decisions (``template_z`` filled: the largest match z over the templates
        found) and the searches that found a template.
    """
    n = len(decisions)
    if n == 0 or not (np.asarray(decisions.purified_view) >= 0).any():
        return decisions, []
    gen = torch.Generator().manual_seed(seed)
    found: list[TemplateSearch] = []
    best = np.zeros(n)
    for v, kind in enumerate(TEMPLATE_KINDS):
        seeds = template_seeds(decisions, v, pool=settings.template_pool, seed_z=settings.template_seed_z,
                               mismatch_pool=settings.template_mismatch_pool)
        for res in search_templates(images, n, seeds, kind=kind, config=config, generator=gen):
            log.info("%s trigger template matches %d images", kind, int(res.flagged.sum()))
            found.append(res)
            best = np.maximum(best, res.z)
    if not found:
        return replace(decisions, template_z=best.astype(np.float32)), []
    hit = np.logical_or.reduce([r.flagged for r in found]) & (decisions.reason != "unreadable_image")
    action, reason = decisions.action.copy(), decisions.reason.copy()
    det = decisions.detectors.copy()
    review, review_reason = decisions.review.copy(), decisions.review_reason.copy()
    new_idx = decisions.new_caption_index.copy()
    action[hit], reason[hit], new_idx[hit] = "drop", TEMPLATE_REASON, -1
    review[hit], review_reason[hit] = False, ""
    det[hit] = [",".join(x for x in (str(f), TEMPLATE_REASON) if x) for f in det[hit]]
    out = replace(decisions, action=action, reason=reason, detectors=det, new_caption_index=new_idx,
                  review=review, review_reason=review_reason, template_z=best.astype(np.float32))
    # a group of repeated images whose kept member carries the trigger keeps its best other member
    from otcclip.models.decisions import keep_best_survivor

    return keep_best_survivor(out), found
