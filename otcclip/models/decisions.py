"""Separation and per-pair decisions (DESIGN 2.3 steps 4-5; the detectors are in
:mod:`otcclip.models.detectors`).

Input: the shortlist scores of every pair (:class:`MatchScores`; column 0 of the
candidate arrays is the pair's own caption). Output: one :class:`Decisions` row per
pair, ``keep`` / ``reassign`` / ``drop`` with a reason code and every score. Nothing
here reads or writes files.

Reason codes
------------
keep      ``own_best`` (own caption scores best), ``clean_score`` (another caption scores
          higher, but not by an unusual margin, or the own score is clean-like)
reassign  to the best shortlisted caption when that caption's score is clean-like (GMM)
          and: ``low_own_score`` (own score not clean-like and the margin best - own has
          margin > ``low_margin_z`` robust std of the own scores), ``better_caption``
          (margin > ``margin_z`` of them), ``<detector>`` (a detector flagged the pair, any positive margin)
drop      ``unreadable_image``, ``no_plausible_caption`` (suspicious and no clean-like
          alternative), ``<detector>`` when a detector flagged it and nothing better exists,
          and ``trigger_sensitivity`` even when one does: the pair's score rests on a
          trigger (it collapses on a purified view of the image), so the captions the
          image scores best with are the trigger's as well (with ``abstain`` on, its flag
          needs calibrated score evidence like any detector outside
          ``weak_model_detectors``; the template search it seeds drops the triggered
          images); ``trigger_template``: the image carries a
          trigger pattern found by :func:`~otcclip.models.triggers.apply_templates`;
          ``duplicate``: a member of a group of repeated images that the ``duplicates``
          check's action removes (``keep_one``: every member but the one whose caption
          agrees best with the image; ``drop_all``: every member)
keep      ``review`` (with ``review=True`` and ``review_reason``): a change the engine is
          not sure of, see below

Knowing when it does not know (``DecisionSettings.abstain``)
-------------------------------------------------------------
Before deciding, :func:`assess_model` measures whether the model separates matched from
mismatched pairs *on this data*: a shuffled-caption control scores every image against
the caption of another, random pair, and the AUC of own-pair against shuffled-pair global
cosines is the probability that a true pair outscores a random one. That is the property
every score-based decision relies on, it needs no labels, and a minority of wrong
captions lowers it only in proportion to their share. The AUC alone lets a mediocre
model pass (on CIFAR-10 an ``otc-tiny`` at AUC 0.8 re-pairs 80 % of its proposals to a
wrong class, ``docs/benchmarks.md``), so the verdict also asks for a separation: the
median own and shuffled cosines ``min_control_separation`` pooled robust std apart (d',
unmoved by a minority of wrong captions). Below either (or with fewer than
``min_quality_pairs`` readable pairs) the model is *weak*: every
score-based change and every detector drop outside ``weak_model_detectors`` becomes
``review``. Otherwise a change needs calibrated evidence that the own caption is wrong,
else the pair is kept for review:

- the own fused score lies ``evidence_z`` robust std below the median own score (a tail
  event for a correctly captioned pair), and
- the own caption's global cosine is no higher than the control's median shuffled-caption
  cosine: the caption fits the image no better than a random caption typically does. A
  strong model also scores some true pairs far down the tail (hard images it misreads);
  their caption still fits better than a random one, and this keeps them. The price: a
  wrong caption that fits better than a typical random one (about half of them when
  wrong captions are random) is kept for review, not changed;
- a re-assignment also needs the new caption to beat the own one by ``evidence_z``
  robust std and to score at least as well as the median own pair (the new pair looks
  like a typical true one).

The same evidence is asked of a flag by a detector outside ``weak_model_detectors``
(``density``, ``caption_burst``, ``trigger_sensitivity``, ...): such a flag says the pair
is unusual, not that its caption is wrong. The trigger-template search
(:func:`~otcclip.models.triggers.apply_templates`) drops the images that carry a found
trigger whatever the verdict. The rules were chosen on the validation slices of
``bench/repair.py --dataset digits`` (docs/benchmarks.md section 4). The verdict, one
plain sentence and the metrics are ``Decisions.model_quality``.

``keep_one`` of the duplicates check picks a group's kept member before the
trigger-template search; when the search drops that member,
:func:`keep_best_survivor` gives the group back its best member that nothing but the
duplicates check dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.mixture import GaussianMixture

from otcclip.models.config.detectors import DecisionSettings, DuplicatesSettings
from otcclip.models.detectors import (
    DetectorEnv,
    DuplicateGroups,
    duplicate_flags,
    duplicate_groups,
    run_detectors,
    trigger_evidence,
    trigger_flags,
    typical_pairs_per_image,
)
from otcclip.models.scores import MatchScores
from otcclip.models.spill import copy_of as spill_copy
from otcclip.models.spill import empty as spill_empty
from otcclip.models.spill import full as spill_full
from otcclip.models.spill import median as spill_median
from otcclip.models.spill import median_abs_dev as spill_median_abs_dev
from otcclip.models.spill import nonzero as spill_nonzero
from otcclip.models.spill import select as spill_select

__all__ = ["ACTIONS", "DROP_DETECTORS", "DUPLICATE", "REVIEW", "DecisionSettings", "Decisions", "DetectorEnv", "MatchScores",
           "assess_model", "decide_pairs", "fit_p_clean", "keep_best_survivor"]

ACTIONS = ("keep", "reassign", "drop")
#: Detectors whose flagged pairs are dropped even when a clean-like alternative exists
#: (with ``abstain`` on, only with calibrated score evidence: see the module docstring).
DROP_DETECTORS = ("trigger_sensitivity",)
#: Reason code of a pair kept because the engine was not sure of the change it proposed.
REVIEW = "review"
#: Reason code of a pair removed by the ``duplicates`` check's action.
DUPLICATE = "duplicate"
#: Shuffled-caption draws of the model-quality control.
CONTROL_DRAWS = 3
#: Rows per block of the model-quality control's index work (memory, not results).
INDEX_BLOCK = 1 << 16


@dataclass(frozen=True)
class Decisions:
    """One decision per pair (rows in dataset order); build with :func:`decide_pairs`.

    Every array has shape (N,). ``new_caption_index`` is the caption row the pair keeps
    (own row for keep, the chosen row for reassign, -1 for drop). ``sensitivity_z`` is
    the largest trigger-sensitivity z over the purified views and ``purified_view`` the
    view that gave it (NaN / -1 without purified views); ``sensitivity_enrichment`` the
    largest z over the views of the share of sensitive pairs among the pair's nearest
    captions (:func:`sensitivity_enrichment`; NaN when that test is off). ``review`` marks
    pairs kept because the engine was not sure of the change it would have made
    (``review_reason``: ``"<action>/<reason>: <why>"``, empty elsewhere);
    ``model_quality`` is :func:`assess_model`'s verdict; ``template_z`` the largest match
    z with a found trigger template (0 until
    :func:`~otcclip.models.triggers.apply_templates` runs); ``dup_group`` the group of
    repeated images the pair belongs to (:func:`~otcclip.models.detectors.duplicate_groups`;
    -1 for none, null in :meth:`to_arrow`).
    """

    row: np.ndarray
    action: np.ndarray
    reason: np.ndarray
    detectors: np.ndarray
    caption_index: np.ndarray
    new_caption_index: np.ndarray
    global_score: np.ndarray
    ot_score: np.ndarray
    fused_score: np.ndarray
    best_caption_index: np.ndarray
    best_global_score: np.ndarray
    best_ot_score: np.ndarray
    best_fused_score: np.ndarray
    p_clean: np.ndarray
    sensitivity_z: np.ndarray
    purified_view: np.ndarray
    sensitivity_enrichment: np.ndarray
    review: np.ndarray
    review_reason: np.ndarray
    template_z: np.ndarray
    dup_group: np.ndarray
    gmm: dict[str, float] = field(default_factory=dict)
    model_quality: dict[str, Any] = field(default_factory=dict)
    #: ``keep_one``'s fall-back: the members it dropped, best first per group, with their
    #: state before (``rows``, ``action``, ``reason``, ``review``, ``review_reason``); read
    #: by :func:`keep_best_survivor`. Not a column of :meth:`to_arrow`.
    dup_fallback: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.row.shape[0])

    def to_arrow(self) -> pa.Table:
        """All per-pair columns as a pyarrow Table."""
        cols = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        return pa.table({k: pa.array(v.tolist() if v.dtype == object else v, mask=(v < 0) if k == "dup_group" else None)
                         for k, v in cols.items()})

    def counts(self) -> dict[str, dict[str, int]]:
        """``{"action": {...}, "reason": {"action/reason": n}}``."""
        acts = {a: int((self.action == a).sum()) for a in ACTIONS}
        reasons: dict[str, int] = {}
        for a, r in zip(self.action.tolist(), self.reason.tolist(), strict=True):
            reasons[f"{a}/{r}"] = reasons.get(f"{a}/{r}", 0) + 1
        return {"action": acts, "reason": dict(sorted(reasons.items()))}


def fit_p_clean(own: np.ndarray, *, sample: int = 200_000, seed: int = 0,
                spill: str | None = None) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, float]]:
    """Fit a 2-component GMM on own-pair scores.

    Returns ``(p_clean_fn, info)`` where ``p_clean_fn(scores)`` is the posterior of the
    higher-mean component. When one Gaussian explains the scores better (lower BIC) or
    there are fewer than 10 scores, every score counts as clean (``p_clean = 1``).
    With ``spill`` (a directory) the sorted scores are a memory-mapped file there
    (:mod:`otcclip.models.spill`): what stays in RAM is the ``sample``.
    """
    # sorted first: the sample and the fit depend on the scores, not on the rows' order
    x = spill_select(own, lambda s, e: np.isfinite(own[s:e]), spill, dtype=np.float64)
    x.sort()
    if len(x) > sample:
        x = np.random.default_rng(seed).choice(x, size=sample, replace=False)
    if len(x) < 10 or float(x.std()) < 1e-8:
        return (lambda s: np.ones(len(s), dtype=np.float32)), {"bimodal": 0.0}
    x2 = x[:, None]
    g1 = GaussianMixture(1, random_state=seed).fit(x2)
    g2 = GaussianMixture(2, random_state=seed, n_init=2).fit(x2)
    hi = int(np.argmax(g2.means_[:, 0]))
    info = {
        "bimodal": float(g2.bic(x2) < g1.bic(x2)),
        "mean_clean": float(g2.means_[hi, 0]),
        "mean_noisy": float(g2.means_[1 - hi, 0]),
        "weight_clean": float(g2.weights_[hi]),
        "std_clean": float(np.sqrt(g2.covariances_.reshape(-1)[hi])),
        "std_noisy": float(np.sqrt(g2.covariances_.reshape(-1)[1 - hi])),
        "bic_1": float(g1.bic(x2)),
        "bic_2": float(g2.bic(x2)),
    }
    if not info["bimodal"]:
        return (lambda s: np.ones(len(s), dtype=np.float32)), info

    def p_clean(s: np.ndarray) -> np.ndarray:
        s = np.asarray(s, dtype=np.float64)
        out = np.ones(len(s), dtype=np.float32)
        fin = np.isfinite(s)
        fin_rows = np.nonzero(fin)[0]
        for b in range(0, len(fin_rows), 65_536):  # row by row: blocks bound sklearn's (rows, 2) temporaries
            r = fin_rows[b : b + 65_536]
            post = g2.predict_proba(s[r][:, None])[:, hi]
            # above the clean mean is always clean (the GMM tail can flip there)
            out[r] = np.where(s[r] >= info["mean_clean"], 1.0, post)
        out[~fin] = 0.0
        return out

    return p_clean, info


def _own_cosine(m: MatchScores, *, block: int = 8192, start: int = 0, stop: int | None = None) -> np.ndarray:
    """(stop - start,) cosine of each image's global embedding with its own caption's
    (rows ``start:stop``, default all), the quantity the model-quality control measures;
    in row blocks, so the temporaries stay (block, d) whatever N."""
    stop = len(m) if stop is None else stop
    out = np.empty(stop - start, dtype=np.float32)
    for s in range(start, stop, block):
        e = min(s + block, stop)
        img = m.image_global[s:e].astype(np.float32)
        cap = m.caption_global[s:e].astype(np.float32)
        den = np.maximum(np.linalg.norm(img, axis=1) * np.linalg.norm(cap, axis=1), 1e-12)
        out[s - start : e - start] = (img * cap).sum(axis=1) / den
    return out


def _robust(x: np.ndarray, spill: str | None = None) -> tuple[float, float]:
    """``(median, 1.4826 MAD)`` of ``x`` (its order statistics on spilled copies with ``spill``)."""
    med = float(spill_median(x, spill))
    return med, float(spill_median_abs_dev(x, med, spill)) * 1.4826 + 1e-6


def _unit_f32(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` in float32, scaled to unit length."""
    v = x.astype(np.float32)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v


def _rank_sum(values: np.ndarray, n_first: int, *, spill: str | None = None, block: int = 1 << 16) -> float:
    """Sum of the ranks (1 = smallest; tied values share their average rank, NaNs tie and
    come last) of ``values[:n_first]`` among all ``values``, from one sort (of a spilled
    copy with ``spill``).

    A value ``v`` whose ties sit at sorted positions ``lo..hi-1`` has rank
    ``(lo + 1 + hi) / 2``. Exact: ranks are half-integers and their sums stay far below
    2**53.
    """
    srt = spill_copy(spill, values)
    srt.sort()  # NaNs last, as searchsorted expects
    total = 0.0
    for s in range(0, n_first, block):
        v = values[s : min(s + block, n_first)]
        lo = np.searchsorted(srt, v, side="left")
        hi = np.searchsorted(srt, v, side="right")
        total += float(((lo + 1 + hi) / 2.0).sum())
    return total


def _pair_cosine(m: MatchScores, img_rows: np.ndarray, cap_rows: np.ndarray, *, block: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """(R,) float32 cosine of image ``img_rows[j]``'s global with caption ``cap_rows[j]``'s,
    in blocks of ``block`` rows (the temporaries stay (block, d) whatever R), into
    ``out`` when given."""
    out = np.empty(len(img_rows), dtype=np.float32) if out is None else out
    for s in range(0, len(img_rows), block):
        out[s : s + block] = (_unit_f32(m.image_global[img_rows[s : s + block]])
                              * _unit_f32(m.caption_global[cap_rows[s : s + block]])).sum(axis=1)
    return out


def assess_model(m: MatchScores, *, settings: DecisionSettings = DecisionSettings(), seed: int = 0,
                 block: int = 8192, spill: str | None = None) -> dict[str, Any]:
    """Does the model separate matched from mismatched pairs on this data?

    A shuffled-caption control: every readable image is scored (global cosine) against
    its own caption and against the captions of ``CONTROL_DRAWS`` random other pairs
    (a derangement each; pairs whose captions share the text are left out).

    Parameters
    ----------
    m : MatchScores
        Uses ``image_global``, ``caption_global``, ``caption_hash``, ``ok`` and the
        fused shortlist scores.
    settings : DecisionSettings
        ``min_control_auc`` and ``min_quality_pairs`` decide the verdict.
    seed : int
        Seeds the shuffles.
    block : int
        Pairs whose cosines are computed at once (memory, not results).
    spill : str, optional
        A directory: the per-pair work arrays (cosines, permutations, the sort of the
        rank sum) are memory-mapped files there (:mod:`otcclip.models.spill`), so RAM
        holds (``block``, d) temporaries whatever N. Same results.

    Returns
    -------
    dict
        ``verdict`` (``"ok"`` or ``"weak"``), ``message`` (one plain sentence),
        ``pairs``, ``control_auc`` (share of (own, shuffled) score pairs where the own
        pair scores higher, ties half), ``control_d_prime`` (median gap between own
        and shuffled cosines over their pooled robust std), ``own_top1`` (share of
        pairs whose best-scored shortlisted caption has the own caption's text) and
        ``gmm_separation`` (filled in by :func:`decide_pairs`).
    """
    ok = spill_nonzero(len(m.ok), np.asarray(m.ok), spill)
    n = len(ok)
    out: dict[str, Any] = {"pairs": int(n), "min_control_auc": settings.min_control_auc,
                           "min_control_separation": settings.min_control_separation}
    big = INDEX_BLOCK
    if n >= 2:
        own = _pair_cosine(m, ok, ok, block=block, out=spill_empty(spill, n, np.float32))
        rng = np.random.default_rng(seed)
        # permute in id-key order, so the same pairs in any row order get the same control
        base = _id_order(m, ok, spill)
        chash = spill_empty(spill, n, np.asarray(m.caption_hash[:0]).dtype)  # the readable pairs' caption hashes
        for s in range(0, n, big):
            chash[s : s + big] = m.caption_hash[ok[s : s + big]]
        sh = spill_empty(spill, CONTROL_DRAWS * n, np.float32)
        n_sh = 0
        perm = spill_empty(spill, n, np.int64)
        p = spill_empty(spill, n, np.int64)
        q = spill_empty(spill, n, np.int64)
        for _ in range(CONTROL_DRAWS):
            for s in range(0, n, big):  # perm = rng.permutation(n), shuffled in place
                perm[s : s + big] = np.arange(s, min(s + big, n))
            rng.shuffle(perm)
            for s in range(0, n, big):
                p[s : s + big] = base[perm[s : s + big]]
            for s in range(0, n, big):  # a derangement: pair p[j] gets the caption of p[j+1]
                e = min(s + big, n)
                q[p[s:e]] = np.concatenate([p[s + 1 : e], p[:1]]) if e == n else p[s + 1 : e + 1]
            for s in range(0, n, big):
                e = min(s + big, n)
                keep = np.nonzero(chash[s:e] != chash[q[s:e]])[0]
                _pair_cosine(m, ok[s:e][keep], ok[q[s:e][keep]], block=block, out=sh[n_sh : n_sh + len(keep)])
                n_sh += len(keep)
        del perm, p, q, chash
        sh = sh[:n_sh]
        if len(sh):
            vals = spill_empty(spill, n + len(sh), np.float64)
            for s in range(0, n, big):
                vals[s : min(s + big, n)] = own[s : s + big]
            for s in range(0, len(sh), big):
                vals[n + s : n + s + big] = sh[s : s + big]
            r_own = _rank_sum(vals, n, spill=spill)
            del vals
            (mo, so), (ms, ss) = _robust(own, spill), _robust(sh, spill)
            out["control_auc"] = (r_own - len(own) * (len(own) + 1) / 2) / (len(own) * len(sh))
            out["own_cosine"] = [float(mo), float(so)]
            out["shuffled_cosine"] = [float(ms), float(ss)]
            out["control_d_prime"] = float((mo - ms) / np.sqrt((so**2 + ss**2) / 2))
        hits = 0
        for s in range(0, n, big):
            rows = ok[s : s + big]
            fused = np.where(m.candidates[rows] >= 0, m.fused[rows], -np.inf)
            fused = np.where(np.isfinite(fused), fused, -np.inf)
            best = m.candidates[rows, np.argmax(fused, axis=1)]
            hits += int((m.caption_hash[best] == m.caption_hash[rows]).sum())
        out["own_top1"] = hits / n
    auc = out.get("control_auc")
    if n < settings.min_quality_pairs or auc is None:
        out["verdict"] = "weak"
        out["message"] = (f"Too few readable pairs ({n}, at least {settings.min_quality_pairs} needed) to judge whether "
                          f"the model tells matched from mismatched pairs: no score-based change was made.")
    elif auc < settings.min_control_auc or out["control_d_prime"] < settings.min_control_separation:
        out["verdict"] = "weak"
        out["message"] = (f"The model is too weak for this data: it scores a true pair above a random one only "
                          f"{100 * auc:.0f} % of the time, with typical scores {out['control_d_prime']:.1f} std apart "
                          f"(at least {100 * settings.min_control_auc:.0f} % and {settings.min_control_separation:g} "
                          f"needed), so no caption was changed on its scores and its proposals are marked for review.")
    else:
        out["verdict"] = "ok"
        out["message"] = (f"The model separates matched from mismatched pairs on this data (a true pair scores above "
                          f"a random one {100 * auc:.0f} % of the time); captions were changed only on a calibrated "
                          f"margin, the rest marked for review.")
    return out


def _id_order(m: MatchScores, ok: np.ndarray, spill: str | None) -> np.ndarray:
    """``np.argsort(m.row_key[ok], kind="stable")`` (``arange`` without id keys), from a
    sort in place of (key, position) records (a spilled array with ``spill``)."""
    n = len(ok)
    if m.row_key is None:
        out = spill_empty(spill, n, np.int64)
        out[:] = np.arange(n)
        return out
    rec = spill_empty(spill, n, [("key", np.int64), ("pos", np.int64)])
    for s in range(0, n, 1 << 16):
        e = min(s + (1 << 16), n)
        rec["key"][s:e] = m.row_key[ok[s:e]]
        rec["pos"][s:e] = np.arange(s, e)
    rec.sort(order=["key", "pos"])  # ties by position: the stable order
    return rec["pos"]


def _object_array(items: list[str]) -> np.ndarray:
    """A 1-D object array of the strings ``items``."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _flag_labels(flags: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Which of ``flags`` (name -> (N,) bool) each row has, without a loop over rows.

    Returns
    -------
    names : ndarray, shape (N,), object
        The names of the row's flags joined by commas, in ``flags``' order ("" for none).
    code : ndarray, shape (N,), int64
        Index of the row's name in ``labels``.
    labels : list of str
        The distinct names.
    """
    bits = np.zeros(n, dtype=np.int64)
    for j, v in enumerate(flags.values()):
        bits |= np.asarray(v, dtype=bool).astype(np.int64) << j
    uniq, code = np.unique(bits, return_inverse=True)
    labels = [",".join(k for j, k in enumerate(flags) if c >> j & 1) for c in uniq.tolist()]
    code = code.reshape(-1)
    return _object_array(labels)[code], code, labels


def decide_pairs(m: MatchScores, *, settings: DecisionSettings = DecisionSettings(), env: DetectorEnv = DetectorEnv(),
                 block: int = 1 << 14) -> Decisions:
    """Decide keep / reassign / drop for every pair (see the module doc for the rules).

    Parameters
    ----------
    m : MatchScores
        Scores of all ``N`` pairs, rows in dataset order.
    settings : DecisionSettings
        Thresholds, enabled detectors and each detector's settings.
    env : DetectorEnv
        Neighbour-index settings and seed shared by the detectors and the GMM; with
        ``env.spill`` (a directory) the per-pair work arrays and the numeric columns of
        the result are memory-mapped files there (:mod:`otcclip.models.spill`).
    block : int
        Rows decided at once once the data-wide statistics are known (memory, not
        results).

    Returns
    -------
    Decisions
    """
    n = len(m)
    sp = env.spill
    ok = np.asarray(m.ok, dtype=bool)
    own_f = m.fused[:, 0]
    # the best-scored candidate of every pair, row block by row block
    best_col = spill_empty(sp, n, np.int64)
    best = spill_empty(sp, n, np.int64)
    best_f = spill_empty(sp, n, m.fused.dtype)
    for s in range(0, n, block):
        e = min(s + block, n)
        fused = np.where(m.candidates[s:e] >= 0, m.fused[s:e], -np.inf)
        fused = np.where(np.isfinite(fused), fused, -np.inf)
        bc = np.argmax(fused, axis=1)
        r = np.arange(e - s)
        best_col[s:e] = bc
        best[s:e] = m.candidates[s:e][r, bc]
        best_f[s:e] = m.fused[s:e][r, bc]
    p_fn, info = fit_p_clean(spill_select(own_f, ok, sp), sample=settings.gmm_sample, seed=env.seed, spill=sp)
    ts = settings.trigger_sensitivity
    ev = trigger_evidence(m, ts, env) if n else None
    known = {"trigger_sensitivity": trigger_flags(*ev, ts, spill=sp)} if ev is not None and ev[0].shape[1] else {}
    dup = duplicate_groups(m, settings.duplicates, env) if n and "duplicates" in settings.detectors else None
    if dup is not None:
        known["duplicates"] = duplicate_flags(m, dup, spill=sp)
    flags = run_detectors(m, settings, env=env, known=known) if n else {}
    # a duplicate is not a poisoning verdict: the group's action applies it, after the rest
    verdict_flags = {k: v for k, v in flags.items() if k != "duplicates"}
    # margins in units of the spread of own-pair scores (robust: MAD)
    scale: float | None = None
    med = sd = 0.0
    has_o = False
    if ok.any():
        o = spill_select(own_f, lambda s, e: ok[s:e] & np.isfinite(own_f[s:e]), sp)
        scale = float(spill_median_abs_dev(o, spill_median(o, sp), sp)) * 1.4826 + 1e-6 if len(o) else 1.0
        if len(o):
            med, sd = _robust(o, sp)
        has_o = bool(len(o))
        del o
    quality: dict[str, Any] = {}
    weak = False
    if settings.abstain:
        quality = assess_model(m, settings=settings, seed=env.seed, spill=sp)
        if info.get("bimodal"):
            quality["gmm_separation"] = float(abs(info["mean_clean"] - info["mean_noisy"])
                                              / np.sqrt((info["std_clean"] ** 2 + info["std_noisy"] ** 2) / 2 + 1e-12))
        weak = quality["verdict"] == "weak"
    shuffled_med = quality.get("shuffled_cosine", [-np.inf])[0]
    trusted_of: dict[str, str] = {}  # interned strings: one object per distinct value, not per row
    strings: dict[str, str] = {}

    def intern(values: list[str]) -> list[str]:
        return [strings.setdefault(v, v) for v in values]

    action = np.empty(n, dtype=object)
    reason = np.empty(n, dtype=object)
    flag_names = np.empty(n, dtype=object)
    review = spill_full(sp, n, False, bool)
    review_reason = np.empty(n, dtype=object)
    p_own = spill_empty(sp, n, np.float32)
    for s in range(0, n, block):
        e = min(s + block, n)
        bn = e - s
        own_b, best_b, bcol = own_f[s:e], best_f[s:e], best_col[s:e]
        ok_b = ok[s:e]
        p_own_b = p_fn(own_b)
        p_best = p_fn(best_b)
        _, code, labels = _flag_labels({k: v[s:e] for k, v in flags.items()}, bn)
        flag_names[s:e] = _object_array(intern(labels))[code]
        verdict_names, verdict_code, verdict_labels = _flag_labels({k: v[s:e] for k, v in verdict_flags.items()}, bn)
        any_flag = verdict_names != ""
        margin = best_b - own_b
        zm = np.zeros(bn) if scale is None else margin / scale
        low = p_own_b < settings.p_clean_threshold
        alt = (bcol != 0) & (p_best >= settings.p_clean_threshold)
        wide = zm > settings.margin_z
        re = alt & ((low & (zm > settings.low_margin_z)) | wide | (any_flag & (margin > 0)))
        act = action[s:e]
        rsn = reason[s:e]
        act[:] = "keep"
        rsn[:] = "own_best"
        rsn[bcol != 0] = "clean_score"
        act[re] = "reassign"
        rsn[re & wide] = "better_caption"
        rsn[re & any_flag] = intern([x.split(",")[0] for x in verdict_names[re & any_flag]])
        rsn[re & low] = "low_own_score"
        dr = (low | any_flag) & ~alt
        act[dr] = "drop"
        rsn[dr] = "no_plausible_caption"
        rsn[dr & any_flag] = intern([x.split(",")[0] for x in verdict_names[dr & any_flag]])
        for name in DROP_DETECTORS:
            if name in flags:
                hit = np.asarray(flags[name][s:e], dtype=bool)
                act[hit] = "drop"
                rsn[hit] = name
        rr = review_reason[s:e]
        rr[:] = ""
        if settings.abstain:
            own_z, best_z = np.zeros(bn), np.zeros(bn)
            if scale is not None and has_o:
                own_z, best_z = (own_b - med) / sd, (best_b - med) / sd
            score_based = (act != "keep") & ~any_flag
            # calibrated evidence that the own caption is wrong: its score is a tail event for a
            # true pair, and its cosine no higher than a random caption's typically is (the
            # control's median shuffled-pair cosine); a re-assignment also needs the new caption
            # to beat the own one by as many robust std and to score at least as well as the
            # median own pair (the new pair looks like a typical true one)
            random_like = _own_cosine(m, start=s, stop=e) <= shuffled_med
            strong = (own_z < -settings.evidence_z) & random_like
            strong &= (act != "reassign") | ((zm > settings.evidence_z) & (best_z >= 0))
            # a trusted detector's flag is its evidence whatever other detectors also flagged
            for f in verdict_labels:
                if f not in trusted_of:
                    trusted_of[f] = next((x for x in f.split(",") if x in settings.weak_model_detectors), "")
            first_trusted = _object_array(intern([trusted_of[f] for f in verdict_labels]))[verdict_code]
            trusted = first_trusted != ""
            if weak:
                unsure = score_based | ((act != "keep") & any_flag & ~trusted)
                why = "weak model"
                # a trusted detector still drops, but a weak model's best caption is no repair
                sure_flag = (act != "keep") & any_flag & trusted
                act[sure_flag & (act == "reassign")] = "drop"
                rsn[sure_flag] = first_trusted[sure_flag]
                whys = np.full(bn, why, dtype=object)
            else:
                # an untrusted detector's flag says the pair is unusual, not that its caption is
                # wrong: it changes the pair only with the calibrated score evidence
                flag_based = (act != "keep") & any_flag & ~trusted
                unsure = (score_based | flag_based) & ~strong
                whys = np.where(flag_based, "detector flag without calibrated score evidence",
                                "margin not calibrated-strong").astype(object)
            rr[unsure] = intern([f"{a}/{r}: {w}" for a, r, w in zip(act[unsure], rsn[unsure], whys[unsure], strict=True)])
            review[s:e][unsure] = True
            act[unsure] = "keep"
            rsn[unsure] = REVIEW
        p_own[s:e] = np.where(ok_b, p_own_b, 0.0).astype(np.float32)
    fallback: dict[str, np.ndarray] = {}
    if dup is not None:
        kept_score = spill_empty(sp, n, np.result_type(best_f.dtype, own_f.dtype))
        for s in range(0, n, block):
            kept_score[s : s + block] = np.where(action[s : s + block] == "reassign", best_f[s : s + block],
                                                 own_f[s : s + block])
        fallback = _apply_duplicates(m, dup, settings.duplicates, kept_score, action, reason, review, review_reason,
                                     weak=weak, spill=sp)
    enrich = spill_full(sp, n, np.nan, np.float32)
    if ev is None or ev[0].shape[1] == 0:
        sens, view = spill_full(sp, n, np.nan, np.float32), spill_full(sp, n, -1, np.int64)
    else:
        filled, crowd = ev
        view, sens = spill_empty(sp, n, np.int64), spill_empty(sp, n, np.float32)
        for s in range(0, n, block):
            fb = filled[s : s + block]
            view[s : s + block] = np.where(np.isfinite(fb).any(axis=1), fb.argmax(axis=1), -1)
            v = view[s : s + block]
            sens[s : s + block] = np.where(v >= 0, fb[np.arange(len(fb)), np.maximum(v, 0)], np.nan)
            if crowd is not None:
                enrich[s : s + block] = crowd[s : s + block].max(axis=1)
    cols = {k: spill_empty(sp, n, dt) for k, dt in (
        ("row", np.int64), ("caption_index", np.int64), ("new_caption_index", np.int64), ("global_score", np.float32),
        ("ot_score", np.float32), ("fused_score", np.float32), ("best_caption_index", np.int64),
        ("best_global_score", np.float32), ("best_ot_score", np.float32), ("best_fused_score", np.float32))}
    for s in range(0, n, block):
        e = min(s + block, n)
        bad = ~ok[s:e]
        action[s:e][bad] = "drop"
        reason[s:e][bad] = "unreadable_image"
        review[s:e][bad] = False
        review_reason[s:e][bad] = ""
        r, bc, act = np.arange(e - s), best_col[s:e], action[s:e]
        own_c = m.candidates[s:e, 0]
        cols["row"][s:e] = np.arange(s, e)
        cols["caption_index"][s:e] = own_c
        cols["new_caption_index"][s:e] = np.where(act == "keep", own_c, np.where(act == "reassign", best[s:e], -1))
        cols["global_score"][s:e] = m.global_[s:e, 0]
        cols["ot_score"][s:e] = m.ot[s:e, 0]
        cols["fused_score"][s:e] = own_f[s:e]
        cols["best_caption_index"][s:e] = best[s:e]
        cols["best_global_score"][s:e] = m.global_[s:e][r, bc]
        cols["best_ot_score"][s:e] = m.ot[s:e][r, bc]
        cols["best_fused_score"][s:e] = best_f[s:e]
    dup_group = spill_full(sp, n, -1, np.int64)
    if dup is not None:
        dup_group[:] = dup.group
    return Decisions(
        row=cols["row"],
        action=action,
        reason=reason,
        detectors=flag_names,
        caption_index=cols["caption_index"],
        new_caption_index=cols["new_caption_index"],
        global_score=cols["global_score"],
        ot_score=cols["ot_score"],
        fused_score=cols["fused_score"],
        best_caption_index=cols["best_caption_index"],
        best_global_score=cols["best_global_score"],
        best_ot_score=cols["best_ot_score"],
        best_fused_score=cols["best_fused_score"],
        p_clean=p_own,
        sensitivity_z=sens,
        purified_view=view,
        sensitivity_enrichment=enrich,
        review=review,
        review_reason=review_reason,
        template_z=spill_full(sp, n, 0.0, np.float32),
        dup_group=dup_group,
        gmm=info,
        model_quality=quality,
        dup_fallback=fallback,
    )


def keep_best_survivor(d: Decisions) -> Decisions:
    """``keep_one`` after later evidence: a group of repeated images whose every member is
    now dropped, some only as duplicates (the member ``keep_one`` kept was dropped since,
    e.g. by the trigger-template search), keeps again its best member that nothing but the
    duplicates check dropped, in the state it had before the check (keep, review or
    re-assign to its best caption). Groups with a surviving member are left as they are.

    Parameters
    ----------
    d : Decisions
        With ``dup_fallback`` from :func:`decide_pairs` (empty: returned unchanged).

    Returns
    -------
    Decisions
    """
    fb = d.dup_fallback
    if not fb or not len(fb["rows"]):
        return d
    grp = np.asarray(d.dup_group)
    alive = np.zeros(int(grp.max()) + 1, dtype=bool)
    alive[grp[(grp >= 0) & (d.action != "drop")]] = True
    rows = np.asarray(fb["rows"], dtype=np.int64)
    # only members that nothing but the duplicates check dropped, of groups left with none
    cand = np.nonzero((d.reason[rows] == DUPLICATE) & ~alive[grp[rows]])[0]
    if not len(cand):
        return d
    g = grp[rows[cand]]
    first = cand[np.r_[True, g[1:] != g[:-1]]]  # rows are best first within each group
    r = rows[first]
    action, reason = d.action.copy(), d.reason.copy()
    review, review_reason = d.review.copy(), d.review_reason.copy()
    new_idx = d.new_caption_index.copy()
    action[r], reason[r] = fb["action"][first], fb["reason"][first]
    review[r], review_reason[r] = fb["review"][first], fb["review_reason"][first]
    new_idx[r] = np.where(action[r] == "reassign", d.best_caption_index[r], d.caption_index[r])
    return replace(d, action=action, reason=reason, review=review, review_reason=review_reason,
                   new_caption_index=new_idx)


def _apply_duplicates(
    m: MatchScores,
    dup: DuplicateGroups,
    st: DuplicatesSettings,
    score: np.ndarray,
    action: np.ndarray,
    reason: np.ndarray,
    review: np.ndarray,
    review_reason: np.ndarray,
    *,
    weak: bool,
    spill: str | None = None,
) -> dict[str, np.ndarray]:
    """Apply each duplicate group's action in place (arrays of shape (N,)); returns
    ``keep_one``'s fall-back (:attr:`Decisions.dup_fallback`; empty for the other actions).
    The work is on the group members' rows only (M,), found in row blocks (``spill``: where
    :func:`~otcclip.models.detectors.typical_pairs_per_image` sorts): no work array of N
    pairs.

    Only groups of at least ``min_size`` images' worth of members are acted on:
    ``min_size`` x the data's typical pairs per image
    (:func:`~otcclip.models.detectors.typical_pairs_per_image`: 1 on single-caption data;
    on a COCO-style set each image's several correct captions are no burst of copies).
    Smaller groups stay whole (their ``dup_group`` still reports them). Members already
    dropped for another reason stay as they are. ``keep_one`` keeps, per group, the member whose caption agrees best with the image: the pairs are first
    pooled into units of identical content (image hash, caption text), a unit scores the
    mean fused score of the caption its pairs keep (``score``), rounded to 1e-4, and the
    best unit wins, ties going to the smaller image hash, then caption hash; within the
    unit the pair with the smallest id key (``row_key``) is kept. Nothing here depends on
    the rows' order. The other members (all of them with ``drop_all``) are dropped with
    reason ``duplicate``; under a ``weak`` model only exact copies are (of the kept member,
    or of another member for ``drop_all``): a near duplicate rests on the model's
    embeddings, so it is kept for review.
    """
    n = len(action)
    g_all = dup.group
    # the members' rows, ascending (few: groups of repeated images), found in row blocks
    mem = np.concatenate([np.zeros(0, dtype=np.int64)] + [np.flatnonzero(g_all[s : s + (1 << 16)] >= 0) + s
                                                          for s in range(0, n, 1 << 16)])
    grp = np.asarray(g_all[mem], dtype=np.int64)
    if len(mem):  # groups below the burst size are reported, not acted on
        sizes = np.bincount(grp)
        need = st.min_size * typical_pairs_per_image(m, spill=spill)
        big = sizes[grp] >= need
        mem, grp = mem[big], grp[big]
    if st.action == "keep_all" or not len(mem):
        return {}
    alive = action[mem] != "drop"
    ih = np.zeros(len(mem), dtype=np.int64) if m.image_hash is None else np.asarray(m.image_hash[mem], dtype=np.int64)
    ch = np.asarray(m.caption_hash[mem], dtype=np.int64)
    rk = mem if m.row_key is None else np.asarray(m.row_key[mem], dtype=np.int64)
    kept = np.zeros(len(mem), dtype=bool)
    kept_hash = np.zeros(int(grp.max()) + 1, dtype=np.int64)
    order = np.zeros(0, dtype=np.int64)  # positions in mem
    if st.action == "keep_one" and alive.any():
        cand = np.nonzero(alive)[0]
        _, unit, cnt = np.unique(np.stack([grp[cand], ih[cand], ch[cand]], axis=1), axis=0, return_inverse=True,
                                 return_counts=True)
        unit = unit.reshape(-1)
        sc = np.nan_to_num(np.asarray(score[mem[cand]], dtype=np.float64), nan=-1e9, neginf=-1e9, posinf=1e9)
        unit_score = np.round(np.bincount(unit, weights=sc) / cnt, 4)[unit]
        order = cand[np.lexsort((rk[cand], ch[cand], ih[cand], -unit_score, grp[cand]))]
        g = grp[order]
        best = order[np.r_[True, g[1:] != g[:-1]]]
        kept[best] = True
        kept_hash[grp[best]] = ih[best]
    target = alive & ~kept
    if st.action == "keep_one":
        has_kept = np.zeros(len(kept_hash), dtype=bool)
        has_kept[grp[kept]] = True
        certain = target & has_kept[grp] & (ih == kept_hash[grp]) & (m.image_hash is not None)
    else:
        certain = target & np.asarray(dup.exact[mem], dtype=bool)
    sure = target & (certain | (not weak))
    unsure = target & ~sure
    fb_rows = mem[order[sure[order]]]  # keep_one's members in preference order, best first per group
    fallback = {"rows": fb_rows, "action": action[fb_rows].copy(), "reason": reason[fb_rows].copy(),
                "review": np.asarray(review[fb_rows]).copy(), "review_reason": review_reason[fb_rows].copy()}
    sure_rows, unsure_rows = mem[sure], mem[unsure]
    action[sure_rows] = "drop"
    reason[sure_rows] = DUPLICATE
    review[sure_rows] = False
    review_reason[sure_rows] = ""
    why = "drop/duplicate: weak model (near duplicate)"
    review_reason[unsure_rows] = [f"{r}; {why}" if r else why for r in review_reason[unsure_rows]]
    review[unsure_rows] = True
    reason[unsure_rows[action[unsure_rows] == "keep"]] = REVIEW
    return fallback if st.action == "keep_one" else {}
