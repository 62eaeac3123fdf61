"""The detectors of poisoned pairs (DESIGN 2.3 step 4): each turns the scores of all
pairs into one (N,) bool flag per pair; :func:`~otcclip.models.decisions.decide_pairs`
turns flags and scores into decisions.

- ``image_burst``: near-duplicate images under many distinct captions (targeted poisoning).
- ``density``: outliers of the joint image-caption embedding.
- ``caption_burst``: a repeated caption whose images disagree.
- ``trigger_sensitivity``: the own-caption score collapses on a purified view of the
  image, optionally only inside caption neighbourhoods crowded with such pairs.
- ``spectral`` (off by default): spectral-signature outliers of the images within one
  caption cluster, whatever the trigger.
- ``collapse``: images of different content that the model maps
  abnormally close together under one caption class (a learnt backdoor, any trigger).
- ``fast_fit`` (off by default): pairs a model early in training already fits far better
  than the rest (Anti-Backdoor Learning's isolation, any trigger).
- ``duplicates``: groups of repeated images (exact and near duplicates); its flag marks
  the members, and :func:`~otcclip.models.decisions.decide_pairs` applies the group's
  action (:func:`duplicate_groups`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from otcclip.models.config.detectors import (
    DETECTOR_SETTINGS,
    DETECTORS,
    CaptionBurstSettings,
    CollapseSettings,
    DecisionSettings,
    DensitySettings,
    DuplicatesSettings,
    FastFitSettings,
    ImageBurstSettings,
    SpectralSettings,
    TriggerSensitivitySettings,
)
from otcclip.models.config.sanitize import IndexSettings
from otcclip.models.scores import MatchScores
from otcclip.models.shortlist import self_search
from otcclip.models.spill import empty as spill_empty
from otcclip.models.spill import full as spill_full
from otcclip.models.spill import median as spill_median
from otcclip.models.spill import median_abs_dev as spill_median_abs_dev
from otcclip.models.spill import nonzero as spill_nonzero
from otcclip.models.spill import select as spill_select

log = logging.getLogger(__name__)

__all__ = ["DETECTORS", "REGISTRY", "Detector", "DetectorEnv", "DuplicateGroups", "collapse_evidence", "unit_rows", "duplicate_flags", "duplicate_groups", "fit_loss",
           "nearest_distinct_distance", "typical_pairs_per_image", "typical_size",
           "run_detectors", "register"]


@dataclass(frozen=True)
class DetectorEnv:
    """What every detector shares: the neighbour index's settings, the seed and the
    spill directory (``spill``: when set, per-pair work arrays are memory-mapped files
    there, :mod:`otcclip.models.spill`; results are the same)."""

    index: IndexSettings = IndexSettings()
    seed: int = 0
    spill: str | None = None


DetectorFn = Callable[[MatchScores, Any, DetectorEnv], np.ndarray]


@dataclass(frozen=True)
class Detector:
    """A registered detector: its name, its settings class and its flag function
    ``fn(scores, settings, env) -> (N,) bool``."""

    name: str
    settings: type
    fn: DetectorFn


#: The registered detectors by name (:func:`register`); names and settings classes are
#: declared in :data:`otcclip.models.config.detectors.DETECTOR_SETTINGS`.
REGISTRY: dict[str, Detector] = {}


def register(name: str) -> Callable[[DetectorFn], DetectorFn]:
    """Register ``fn`` as detector ``name`` with the settings class declared for that name."""
    if name not in DETECTOR_SETTINGS:
        raise ValueError(f"detector {name!r} has no settings class in DETECTOR_SETTINGS")

    def deco(fn: DetectorFn) -> DetectorFn:
        REGISTRY[name] = Detector(name, DETECTOR_SETTINGS[name], fn)
        return fn

    return deco


#: Rows per block of the row-wise work in :func:`unit_rows` and :func:`_knn`.
ROW_BLOCK = 8192


def unit_rows(parts: np.ndarray | Sequence[np.ndarray], *, spill: str | None = None) -> np.ndarray:
    """The rows of ``parts`` side by side, in float32, each scaled to unit length.

    Built block by block: the temporaries are (``ROW_BLOCK``, d). When any part is
    memory-mapped (``np.memmap``: :func:`~otcclip.models.sanitize.decide` on saved
    shards), or with ``spill``, the result is as well, in an anonymous temporary file
    (in ``spill`` when given), so that an ``N x d`` work copy is not held in RAM.

    Parameters
    ----------
    parts : ndarray, shape (N, d), or sequence of ndarray, shapes (N, d_i)
    spill : str, optional
        Directory of the temporary file.

    Returns
    -------
    ndarray, shape (N, sum d_i), float32, C-contiguous
    """
    ps = [parts] if isinstance(parts, np.ndarray) else list(parts)
    n, d = len(ps[0]), sum(p.shape[1] for p in ps)
    if n and d and (spill is not None or any(isinstance(p, np.memmap) for p in ps)):
        with tempfile.TemporaryFile(prefix="otcclip-knn-", dir=spill) as f:  # unlinked: freed with the map
            v: np.ndarray = np.memmap(f, dtype=np.float32, mode="w+", shape=(n, d))
    else:
        v = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, ROW_BLOCK):
        b = np.concatenate([p[s : s + ROW_BLOCK] for p in ps], axis=1).astype(np.float32)
        b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        v[s : s + ROW_BLOCK] = b
    return v


def _knn(vectors: np.ndarray | Sequence[np.ndarray], k: int, env: DetectorEnv) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours by cosine (self excluded): (sims (N,k), idx (N,k)).

    ``vectors``: (N, d), or column blocks of it (:func:`unit_rows`). Exact up to
    ``env.index.exact_threshold`` rows; above it a list-by-list self-join
    (:func:`~otcclip.models.shortlist.self_search`) whose cost per row does not grow with N.
    """
    v = unit_rows(vectors, spill=env.spill)
    kk = min(k + 1, len(v))
    sims, idx = self_search(v, kk, settings=env.index, seed=env.seed, spill=env.spill)
    del v
    for s in range(0, len(idx), ROW_BLOCK):  # drop the row itself, best first, in place; temporaries (ROW_BLOCK, k)
        sb, ib = sims[s : s + ROW_BLOCK], idx[s : s + ROW_BLOCK]
        sb[ib == np.arange(s, s + len(ib))[:, None]] = -np.inf
        order = np.argsort(-sb, axis=1, kind="stable")
        sb[:] = np.take_along_axis(sb, order, axis=1)
        ib[:] = np.take_along_axis(ib, order, axis=1)
    return sims[:, : kk - 1], idx[:, : kk - 1]


def _take_rows(x: np.ndarray, rows: np.ndarray, spill: str | None) -> np.ndarray:
    """``x[rows]``; with ``spill``, gathered in row blocks into a memory-mapped file there."""
    if spill is None:
        return x[rows]
    out = spill_empty(spill, (len(rows), *x.shape[1:]), x.dtype)
    for s in range(0, len(rows), ROW_BLOCK):
        out[s : s + ROW_BLOCK] = x[rows[s : s + ROW_BLOCK]]
    return out


def _ok_rows(m: MatchScores, spill: str | None) -> np.ndarray:
    """``np.nonzero(m.ok)[0]`` (R,) int64, in a spilled array with ``spill``."""
    return spill_nonzero(len(m), lambda s, e: np.asarray(m.ok[s:e], dtype=bool), spill)


def _finite_median(x: np.ndarray, keep: np.ndarray | None, spill: str | None) -> float:
    """The median of the finite values of ``x[keep]`` (``x`` and ``keep`` (N,)), 0 when
    there are none, through a copy of the selected values (spilled with ``spill``). Rows
    without a value (NaN: a row whose neighbours are all copies of its image) do not
    count: a burst of copies leaves the data's scale as it is."""
    sel = spill_select(x, lambda s, e: np.isfinite(x[s:e]) & (True if keep is None else keep[s:e]), spill)
    return float(spill_median(sel, spill)) if len(sel) else 0.0


def robust_z(x: np.ndarray, *, spill: str | None = None) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)``: z-scores that a minority of outliers does not move.

    Computed in float64: with a MAD of about 0 (all values equal but a few) the quotient
    exceeds float32's range. The float64 copy, the order statistics' work and the result
    are built in row blocks (memory-mapped files in ``spill``, a directory, when given).
    """
    xs = spill_empty(spill, len(x), np.float64)
    for s in range(0, len(x), ROW_BLOCK):
        xs[s : s + ROW_BLOCK] = x[s : s + ROW_BLOCK]
    med = spill_median(xs, spill)
    mad = spill_median_abs_dev(xs, med, spill) * 1.4826 + 1e-12
    for s in range(0, len(x), ROW_BLOCK):
        xs[s : s + ROW_BLOCK] = (xs[s : s + ROW_BLOCK] - med) / mad
    return xs


def nearest_distinct_distance(sims: np.ndarray, idx: np.ndarray, hashes: np.ndarray | None, *,
                              spill: str | None = None) -> np.ndarray:
    """Cosine distance of each image to its nearest *distinct* image (not a copy).

    Row-wise, in blocks of ``ROW_BLOCK`` rows: the temporaries are (``ROW_BLOCK``, k).

    Parameters
    ----------
    sims, idx : ndarray, shape (N, k)
        Each row's neighbours among the same N rows (:func:`_knn`; ``-inf`` where none).
    hashes : ndarray, shape (N,), optional
        Decoded-pixel hash of each row's image: neighbours with the row's hash are copies.
    spill : str, optional
        Directory where the result is a memory-mapped file (:mod:`otcclip.models.spill`).

    Returns
    -------
    ndarray, shape (N,), float64
        NaN where no neighbour is distinct. Its median is the scale near duplicates are
        measured against: copies are skipped, so data where every image is repeated
        (several captions per image) keeps the scale of its distinct images.
    """
    out = spill_empty(spill, len(sims), np.float64)
    for s in range(0, len(sims), ROW_BLOCK):
        sb, ib = sims[s : s + ROW_BLOCK], idx[s : s + ROW_BLOCK]
        distinct = np.isfinite(sb) & (sb < 1.0 - 1e-6)
        if hashes is not None:
            distinct &= hashes[ib] != hashes[s : s + ROW_BLOCK, None]
        nearest = np.where(distinct, sb, -np.inf).max(axis=1).astype(np.float64)
        out[s : s + ROW_BLOCK] = np.where(np.isfinite(nearest), 1.0 - nearest, np.nan)
    return out


def typical_size(size: np.ndarray, ok: np.ndarray, ratio: float, floor: int, *, spill: str | None = None) -> int:
    """The smallest count that is a burst: at least ``floor`` and more than ``ratio`` x
    the median of ``size`` over the readable rows ``ok`` (shapes (N,)).

    Scale-free: on data with one caption per image the median is 1 and ``floor``
    decides; on data whose images each carry several correct captions (COCO: 5) a
    burst must stand out from them. The median is taken on a copy of the readable rows'
    sizes (spilled with ``spill``).
    """
    sel = spill_select(size, lambda s, e: np.asarray(ok[s:e], dtype=bool), spill)
    typical = float(spill_median(sel, spill)) if len(sel) else 1.0
    return max(int(floor), int(np.floor(ratio * typical)) + 1)


def _sorted_runs(x: np.ndarray, spill: str | None) -> np.ndarray:
    """(R,) int64: the first position of each run of equal values of a sorted 1-D ``x``
    (N,), found in row blocks (spilled with ``spill``)."""
    def starts(s: int, e: int) -> np.ndarray:
        b = x[s:e]
        new = np.empty(len(b), dtype=bool)
        new[1:] = b[1:] != b[:-1]
        if len(b):
            new[0] = s == 0 or bool(x[s - 1] != b[0])
        return new

    return spill_nonzero(len(x), starts, spill)


def typical_pairs_per_image(m: MatchScores, *, spill: str | None = None) -> int:
    """The median, over readable pairs, of the pairs showing the same image (the same
    decoded pixels, ``image_hash``): 1 on single-caption data, 5 on COCO-style data.
    1 without image hashes.

    Computed in row blocks (spilled with ``spill``): the readable rows' hashes sorted
    in place, their runs' lengths sorted in place, and the one or two middle entries of
    the per-pair counts (each run's length repeated that many times) read off their
    cumulative sum."""
    ok = np.asarray(m.ok, dtype=bool)
    if m.image_hash is None or not ok.any():
        return 1
    h = spill_select(m.image_hash, lambda s, e: ok[s:e], spill, dtype=np.int64)
    h.sort()
    total = len(h)
    runs = _sorted_runs(h, spill)
    del h
    length = spill_empty(spill, len(runs), np.int64)
    for s in range(0, len(runs), ROW_BLOCK):
        nxt = runs[s + 1 : s + ROW_BLOCK + 1]
        end = np.concatenate([nxt, [total]]) if s + ROW_BLOCK >= len(runs) else nxt
        length[s : s + ROW_BLOCK] = end - runs[s : s + ROW_BLOCK]
    length.sort()
    # the pair at sorted position p has count length[i] for the first i with cumsum(length)[i] > p
    want = sorted({(total - 1) // 2, total // 2})
    found: list[int] = []
    before = 0
    for s in range(0, len(length), ROW_BLOCK):
        c = np.cumsum(length[s : s + ROW_BLOCK]) + before
        while len(found) < len(want) and c[-1] > want[len(found)]:
            found.append(int(length[s + int(np.searchsorted(c, want[len(found)], side="right"))]))
        before = int(c[-1])
    a, b = found[0], found[-1]
    return max(1, int((a + b) / 2))


def _distinct_captions_per_hash(caption_hash: np.ndarray, hashes: np.ndarray, *,
                                spill: str | None = None) -> np.ndarray:
    """(N,) int64: distinct caption texts over all the rows with each row's pixel hash.

    From an in-place sort of (image hash, caption hash) records, scanned in row blocks
    (every array spilled with ``spill``)."""
    n = len(hashes)
    rec = spill_empty(spill, n, [("h", np.int64), ("c", np.int64)])
    for s in range(0, n, ROW_BLOCK):
        rec["h"][s : s + ROW_BLOCK] = hashes[s : s + ROW_BLOCK]
        rec["c"][s : s + ROW_BLOCK] = caption_hash[s : s + ROW_BLOCK]
    rec.sort(order=["h", "c"])
    h, c = rec["h"], rec["c"]
    # running count of distinct (image, caption) records up to each sorted position
    seen = spill_empty(spill, n, np.int64)
    before = 0
    for s in range(0, n, ROW_BLOCK):
        e = min(s + ROW_BLOCK, n)
        new = np.empty(e - s, dtype=bool)
        new[1:] = (h[s + 1 : e] != h[s : e - 1]) | (c[s + 1 : e] != c[s : e - 1])
        new[0] = s == 0 or bool(h[s - 1] != h[s] or c[s - 1] != c[s])
        seen[s:e] = np.cumsum(new) + before
        before = int(seen[e - 1])
    first = _sorted_runs(h, spill)  # (I,) first sorted position of each image hash
    img = spill_empty(spill, len(first), np.int64)
    per = spill_empty(spill, len(first), np.int64)
    for s in range(0, len(first), ROW_BLOCK):
        a = first[s : s + ROW_BLOCK]
        nxt = first[s + 1 : s + ROW_BLOCK + 1]
        end = np.concatenate([nxt, [n]]) if s + ROW_BLOCK >= len(first) else nxt
        img[s : s + ROW_BLOCK] = h[a]
        per[s : s + ROW_BLOCK] = seen[end - 1] - seen[a] + 1
    del rec, seen, first
    out = spill_empty(spill, n, np.int64)
    for s in range(0, n, ROW_BLOCK):
        out[s : s + ROW_BLOCK] = per[np.searchsorted(img, hashes[s : s + ROW_BLOCK])]
    return out


def _distinct_captions(caption_hash: np.ndarray, sims: np.ndarray, idx: np.ndarray, thr: float,
                       hashes: np.ndarray | None, *, spill: str | None = None) -> np.ndarray:
    """(N,) int64: distinct caption texts on each row's image and its copies and near
    duplicates among its neighbours (same pixel hash, or cosine >= ``thr``).

    Row-wise, in blocks of ``ROW_BLOCK`` rows (temporaries (``ROW_BLOCK``, k + 1)); the
    result is spilled with ``spill``."""
    own = np.asarray(caption_hash, dtype=np.int64)
    out = spill_empty(spill, len(sims), np.int64)
    for s in range(0, len(sims), ROW_BLOCK):
        sb, ib = sims[s : s + ROW_BLOCK], idx[s : s + ROW_BLOCK]
        ob = own[s : s + ROW_BLOCK, None]
        hit = np.isfinite(sb) & (sb >= thr)
        if hashes is not None:
            hit |= np.isfinite(sb) & (hashes[ib] == hashes[s : s + ROW_BLOCK, None])
        texts = np.concatenate([ob, np.where(hit, own[ib], ob)], axis=1)
        texts.sort(axis=1)
        out[s : s + ROW_BLOCK] = 1 + (np.diff(texts, axis=1) != 0).sum(axis=1)
    return out


@register("image_burst")
def detect_image_burst(m: MatchScores, st: ImageBurstSettings, env: DetectorEnv = DetectorEnv()) -> np.ndarray:
    """Near-duplicate images carrying many distinct captions: the targeted-poisoning
    signature. Near-duplicate: cosine >= ``dup_threshold`` and cosine distance <=
    ``dup_relative`` x the median distance to the nearest distinct image. Many: at least
    ``burst_min`` and more than ``typical_ratio`` x the data's median distinct captions
    per image (:func:`typical_size`), so the several correct captions of each image of a
    COCO-style set are no burst. Returns (N,) bool."""
    n = len(m)
    if n < st.burst_min:
        return np.zeros(n, dtype=bool)
    hashes = None if m.image_hash is None else np.asarray(m.image_hash, dtype=np.int64)
    k = max(st.knn, st.burst_min * 2)
    sp = env.spill
    sims, idx = _knn(m.image_global, k, env)
    # scale-free: a near-duplicate is also far closer than a typical distinct nearest neighbour
    ok = np.asarray(m.ok, dtype=bool)
    typical = _finite_median(nearest_distinct_distance(sims, idx, hashes, spill=sp), ok, sp)
    thr = max(st.dup_threshold, 1.0 - st.dup_relative * typical)
    count = _distinct_captions(m.caption_hash, sims, idx, thr, hashes, spill=sp)
    need = typical_size(count, ok, st.typical_ratio, st.burst_min, spill=sp)
    if 2 * need > k and k < n - 1:  # multi-caption data: search as far as a burst reaches
        k = min(2 * need, n - 1)
        del sims, idx
        sims, idx = _knn(m.image_global, k, env)
        count = _distinct_captions(m.caption_hash, sims, idx, thr, hashes, spill=sp)
    del sims, idx
    per_hash = None if hashes is None else _distinct_captions_per_hash(m.caption_hash, hashes, spill=sp)
    out = spill_empty(sp, n, bool)
    for s in range(0, n, ROW_BLOCK):
        c = count[s : s + ROW_BLOCK]
        if per_hash is not None:  # every copy counts, not only those among the searched neighbours
            c = np.maximum(c, per_hash[s : s + ROW_BLOCK])
        out[s : s + ROW_BLOCK] = (c >= need) & ok[s : s + ROW_BLOCK]  # unreadable rows share hash 0: never a burst
    return out


@register("density")
def detect_density(m: MatchScores, st: DensitySettings, env: DetectorEnv = DetectorEnv()) -> np.ndarray:
    """k-distance outliers of the joint pair embedding (image global + own caption
    global): robust z-score of the distance to the ``knn``-th neighbour > ``outlier_z``."""
    n = len(m)
    if n <= st.knn + 1:
        return np.zeros(n, dtype=bool)
    sims, _ = _knn((m.image_global, m.caption_global), st.knn, env)
    kd = spill_empty(env.spill, n, sims.dtype)  # in row blocks
    for s in range(0, n, ROW_BLOCK):
        kd[s : s + ROW_BLOCK] = 1.0 - sims[s : s + ROW_BLOCK, -1]
    z = robust_z(kd, spill=env.spill)
    out = spill_empty(env.spill, n, bool)
    for s in range(0, n, ROW_BLOCK):
        out[s : s + ROW_BLOCK] = z[s : s + ROW_BLOCK] > st.outlier_z
    return out


@register("caption_burst")
def detect_caption_burst(m: MatchScores, st: CaptionBurstSettings, env: DetectorEnv = DetectorEnv()) -> np.ndarray:
    """Pairs whose caption text appears on >= ``burst_min`` images and whose image is an
    outlier among those images (robust z of its similarity to the group's mean image
    below ``-outlier_z``): one caption on many dissimilar images (backdoors)."""
    n = len(m)
    flag = spill_full(env.spill, n, False, bool)
    for rows in _hash_groups(m.caption_hash, st.burst_min, env.spill):
        img = m.image_global[rows].astype(np.float32)  # one group's rows, not a copy of all
        centre = img.mean(axis=0)
        centre /= max(float(np.linalg.norm(centre)), 1e-12)
        sim = img @ centre
        flag[rows[robust_z(sim) < -st.outlier_z]] = True
    return flag


def _hash_groups(hashes: np.ndarray, min_size: int, spill: str | None) -> Iterator[np.ndarray]:
    """The rows of each group of equal ``hashes`` (N,) with at least ``min_size`` rows, in
    row order, groups by increasing hash: from an in-place sort of (hash, row) records
    (a memory-mapped file with ``spill``), scanned in row blocks."""
    n = len(hashes)
    rec = spill_empty(spill, n, [("h", np.int64), ("r", np.int64)])
    for s in range(0, n, ROW_BLOCK):
        rec["h"][s : s + ROW_BLOCK] = hashes[s : s + ROW_BLOCK]
        rec["r"][s : s + ROW_BLOCK] = np.arange(s, min(s + ROW_BLOCK, n))
    rec.sort(order=["h", "r"])
    start = 0  # first sorted position of the group that the scan is in
    for s in range(0, n, ROW_BLOCK):
        h = rec["h"][s : s + ROW_BLOCK]
        cuts = np.flatnonzero(h[1:] != h[:-1]) + 1 + s
        if s and rec["h"][s - 1] != h[0]:
            cuts = np.concatenate([[s], cuts])
        for c in cuts.tolist():
            if c - start >= min_size:
                yield np.asarray(rec["r"][start:c])
            start = c
    if n - start >= min_size:
        yield np.asarray(rec["r"][start:n])


def _drop_block(m: MatchScores, s: int, e: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``s:e``'s score drops on the purified views (e - s, V) float64 and whether
    the row counts (readable, every drop finite) (e - s,) bool."""
    drop = m.global_[s:e, :1].astype(np.float64) - m.purified_own[s:e].reshape(e - s, -1).astype(np.float64)  # type: ignore[index]
    return drop, np.asarray(m.ok[s:e], dtype=bool) & np.isfinite(drop).all(axis=1)


def sensitivity_scores(m: MatchScores, *, spill: str | None = None) -> np.ndarray | None:
    """Robust z, per purified view, of how much the own-caption score drops on the view.

    Computed in row blocks: each view's order statistics on a copy of its drops, the
    copies and the result memory-mapped files in ``spill`` (a directory) when given.

    Returns
    -------
    ndarray, shape (N, V), or None
        ``z[i, v]`` for ``score(image i) - score(view v of image i)`` over readable pairs
        (NaN for unreadable ones); None when ``m.purified_own`` is missing.
    """
    if m.purified_own is None:
        return None
    n = len(m)
    n_views = int(np.prod(m.purified_own.shape[1:]))
    z = spill_full(spill, (n, n_views), np.nan, np.float64)
    n_good = sum(int(_drop_block(m, s, min(s + ROW_BLOCK, n))[1].sum()) for s in range(0, n, ROW_BLOCK))
    if n_good < 10:
        return z
    med = np.empty(n_views)
    mad = np.empty(n_views)
    for v in range(n_views):
        col = spill_empty(spill, n_good, np.float64)
        pos = 0
        for s in range(0, n, ROW_BLOCK):
            drop, good = _drop_block(m, s, min(s + ROW_BLOCK, n))
            col[pos : pos + int(good.sum())] = drop[good, v]
            pos += int(good.sum())
        med[v] = spill_median(col, spill)
        mad[v] = spill_median_abs_dev(col, med[v], spill) * 1.4826 + 1e-6
        del col
    for s in range(0, n, ROW_BLOCK):
        drop, good = _drop_block(m, s, min(s + ROW_BLOCK, n))
        zb = z[s : s + ROW_BLOCK]
        zb[good] = (drop[good] - med) / mad
    return z


def sensitivity_enrichment(
    m: MatchScores, sensitive: np.ndarray, st: TriggerSensitivitySettings, env: DetectorEnv = DetectorEnv(),
) -> np.ndarray:
    """How much sensitive pairs crowd each pair's caption neighbourhood, per purified view.

    A backdoor teaches one trigger one target, so the pairs it poisoned share what their
    captions mean; false alarms of :func:`detect_trigger_sensitivity` (a weak model, a
    textured image) are spread over all captions.

    Parameters
    ----------
    m : MatchScores
        Uses ``caption_global`` (N, d).
    sensitive : ndarray, shape (N, V), bool
        Pairs whose sensitivity z on view ``v`` is above ``st.z``.
    st : TriggerSensitivitySettings
        ``knn`` neighbours (cosine of the own-caption globals, self excluded).

    Returns
    -------
    ndarray, shape (N, V), float64
        Binomial z of the sensitive share among the neighbours against the share over
        all readable pairs (0 for a view where nothing or everything is sensitive).
    """
    n = len(m)
    sensitive = sensitive.reshape(n, -1) & m.ok[:, None]
    out = np.zeros(sensitive.shape)
    k = min(st.knn, n - 1)
    p = sensitive[m.ok].mean(axis=0) if m.ok.any() else np.zeros(sensitive.shape[1])
    live = (p > 0.0) & (p < 1.0)
    if k < 1 or not live.any():
        return out
    _, idx = _knn(m.caption_global, k, env)
    for v in np.nonzero(live)[0]:
        for s in range(0, n, ROW_BLOCK):  # row-wise: temporaries (ROW_BLOCK, k)
            share = sensitive[idx[s : s + ROW_BLOCK], v].mean(axis=1)
            out[s : s + ROW_BLOCK, v] = (share - p[v]) / np.sqrt(p[v] * (1.0 - p[v]) / k)
    return out


def trigger_evidence(
    m: MatchScores, st: TriggerSensitivitySettings, env: DetectorEnv = DetectorEnv(),
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The trigger-sensitivity detector's evidence, computed once per decision pass.

    Returns
    -------
    (z, crowd) or None
        ``z`` (N, V): :func:`sensitivity_scores` with NaN as ``-inf``; ``crowd`` (N, V):
        :func:`sensitivity_enrichment` of ``z > st.z`` when ``st.knn`` >
        0, else None. None when ``m.purified_own`` is missing.
    """
    raw = sensitivity_scores(m, spill=env.spill)
    if raw is None:
        return None
    z = raw  # its own array: NaN to -inf in place, in row blocks
    for s in range(0, len(z), ROW_BLOCK):
        np.nan_to_num(z[s : s + ROW_BLOCK], copy=False, nan=-np.inf)
    crowd = sensitivity_enrichment(m, z > st.z, st, env) if st.knn > 0 and len(m) > 1 else None
    return z, crowd


def trigger_flags(z: np.ndarray, crowd: np.ndarray | None, st: TriggerSensitivitySettings, *,
                  spill: str | None = None) -> np.ndarray:
    """(N,) bool: pairs whose sensitivity z (N, V) on some view exceeds ``st.z``,
    or, with the neighbourhood test (``crowd`` (N, V) enrichment), the region threshold
    inside a crowded neighbourhood. Row-wise, in row blocks; the result is a
    memory-mapped file in ``spill`` when given."""
    out = spill_empty(spill, len(z), bool)
    for s in range(0, len(z), ROW_BLOCK):
        zb = z[s : s + ROW_BLOCK]
        if crowd is None:
            out[s : s + ROW_BLOCK] = zb.max(axis=1) > st.z
        else:
            region = crowd[s : s + ROW_BLOCK] > st.enrichment_z
            out[s : s + ROW_BLOCK] = (region & (zb > min(st.region_z, st.z))).any(axis=1)
    return out


@register("trigger_sensitivity")
def detect_trigger_sensitivity(
    m: MatchScores, st: TriggerSensitivitySettings, env: DetectorEnv = DetectorEnv(),
) -> np.ndarray:
    """Pairs whose own-caption score collapses on a purified view of the image (low-passed;
    its most high-frequency window filled): the score rests on a noise trigger, not on
    what the image shows. Flagged when a view's :func:`sensitivity_scores` z >
    ``st.z``. With ``st.knn`` > 0 a pair is flagged only inside a caption
    neighbourhood crowded with such pairs (:func:`sensitivity_enrichment` >
    ``st.enrichment_z`` for that view), and there already when its z >
    ``st.region_z``: the captions a backdoor poisoned are known, the rest of the
    data is left alone. Needs ``m.purified_own``; without it nothing is flagged."""
    ev = trigger_evidence(m, st, env)
    if ev is None:
        log.warning("trigger_sensitivity: features lack the purified views; detector skipped")
        return np.zeros(len(m), dtype=bool)
    return trigger_flags(*ev, st, spill=env.spill)


@register("spectral")
def detect_spectral(m: MatchScores, st: SpectralSettings, env: DetectorEnv = DetectorEnv()) -> np.ndarray:
    """Spectral signatures (Tran, Li and Madry, NeurIPS 2018) per caption cluster.

    The readable pairs are split into about ``N / group_size`` clusters by k-means on
    their own-caption globals (a backdoor's poisoned pairs share its target's captions).
    In each cluster of at least ``min_group`` pairs, the image globals are centred and
    projected on their top right singular vector; a poisoned minority, which shares its
    trigger's feature, dominates that direction. Pairs whose absolute projection has a
    robust z above ``outlier_z`` within their cluster are flagged. Returns (N,) bool.
    """
    n = len(m)
    flag = np.zeros(n, dtype=bool)
    rows_ok = np.nonzero(m.ok)[0]
    if len(rows_ok) < st.min_group:
        return flag
    from sklearn.cluster import KMeans

    cap = m.caption_global[rows_ok].astype(np.float32)
    cap /= np.maximum(np.linalg.norm(cap, axis=1, keepdims=True), 1e-12)
    k = max(1, len(rows_ok) // st.group_size)
    labels = KMeans(k, n_init=1, random_state=env.seed).fit_predict(cap) if k > 1 else np.zeros(len(rows_ok), dtype=int)
    img = m.image_global.astype(np.float64)
    for g in range(k):
        rows = rows_ok[labels == g]
        if len(rows) < st.min_group:
            continue
        x = img[rows] - img[rows].mean(axis=0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        proj = np.abs(x @ vt[0])
        flag[rows[robust_z(proj) > st.outlier_z]] = True
    return flag


@dataclass(frozen=True)
class DuplicateGroups:
    """Groups of repeated images found by :func:`duplicate_groups`.

    Attributes
    ----------
    group : ndarray, shape (N,), int64
        Group id of each pair, -1 for none. Ids number the groups 0..G-1 in the order of
        their content (smallest image hash, caption hash, id key of a member), so the same
        pairs in any row order get the same ids.
    exact : ndarray, shape (N,), bool
        The member's decoded pixels equal another member's (same image hash).
    threshold : float
        The cosine at or above which two images counted as near duplicates here
        (``near_threshold`` raised by the scale-free test); NaN without near search.
    """

    group: np.ndarray
    exact: np.ndarray
    threshold: float = float("nan")

    @property
    def member(self) -> np.ndarray:
        """(N,) bool: the pair belongs to a group."""
        return np.asarray(self.group >= 0)


def duplicate_groups(m: MatchScores, st: DuplicatesSettings, env: DetectorEnv = DetectorEnv()) -> DuplicateGroups:
    """Group repeated images: exact duplicates (the same ``image_hash``: identical decoded
    pixels) and near duplicates (image-embedding cosine >= ``near_threshold`` among each
    image's ``knn`` nearest, and a cosine distance at most ``near_relative`` x the median
    distance of an image to its nearest *distinct* image: on a model whose embeddings
    crowd together, nothing counts as near; where ``image_thumb`` is present, also a
    content-thumbnail cosine of at least ``near_thumbnail``). Groups are the connected components of both
    relations; unreadable images never join one.

    Parameters
    ----------
    m : MatchScores
        Uses ``image_global`` (N, d), ``ok`` and, when present, ``image_hash``,
        ``image_thumb`` (N, t), ``caption_hash`` and ``row_key`` (group ids).

    Returns
    -------
    DuplicateGroups
    """
    return _duplicate_groups_blocked(m, st, env)


def _duplicate_groups_blocked(m: MatchScores, st: DuplicatesSettings, env: DetectorEnv) -> DuplicateGroups:
    """:func:`duplicate_groups`'s work, with no (N, k) array at once and, with ``env.spill``
    set, no array of N pairs in RAM. The exact-copy families come from an in-place sort of the hashes
    (:func:`_hash_groups`), the near-duplicate hits from the neighbours in row blocks,
    and the connected components are taken over the pairs that have an edge to another
    pair only (edges are few; every other pair is a group of one). ``group`` and
    ``exact`` are memory-mapped files in ``env.spill``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    sp = env.spill
    n = len(m)
    group = spill_full(sp, n, -1, np.int64)
    exact = spill_full(sp, n, False, bool)
    ok = _ok_rows(m, sp)
    r = len(ok)
    if r < 2:
        return DuplicateGroups(group, exact)
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    hashes = None if m.image_hash is None else np.asarray(m.image_hash, dtype=np.int64)
    h_ok = None if hashes is None else _take_rows(hashes, ok, sp)
    if h_ok is not None:
        fam_rows: list[np.ndarray] = []
        for rows in _hash_groups(h_ok, 2, sp):  # each family of exact copies: an edge from each member to its first
            fam_rows.append(rows)
            if len(fam_rows) >= 4096:
                src.append(np.concatenate(fam_rows))
                dst.append(np.concatenate([np.full(len(x), x[0]) for x in fam_rows]))
                fam_rows = []
        if fam_rows:
            src.append(np.concatenate(fam_rows))
            dst.append(np.concatenate([np.full(len(x), x[0]) for x in fam_rows]))
        for x in src:
            exact[ok[x]] = True
    sims, idx = _knn(_take_rows(m.image_global, ok, sp), min(st.knn, r - 1), env)
    typical = _finite_median(nearest_distinct_distance(sims, idx, h_ok, spill=sp), None, sp)
    thr = max(st.near_threshold, 1.0 - st.near_relative * typical)
    hit_rows: list[np.ndarray] = []
    hit_cols: list[np.ndarray] = []
    for s in range(0, r, ROW_BLOCK):
        sb, ib = sims[s : s + ROW_BLOCK], idx[s : s + ROW_BLOCK]
        hit = np.isfinite(sb) & (sb >= thr)
        hit_rows.append(np.repeat(np.arange(s, s + len(sb)), hit.sum(axis=1)))
        hit_cols.append(np.asarray(ib[hit], dtype=np.int64))
    del sims, idx
    rows, cols = np.concatenate(hit_rows), np.concatenate(hit_cols)
    if m.image_thumb is not None and len(rows):
        # the embedding alone can put distinct images of one plain subject together: the
        # content thumbnails must agree too (tested on the few embedding hits only)
        same = np.empty(len(rows), dtype=bool)
        for s in range(0, len(rows), 65_536):
            ta = np.asarray(m.image_thumb[ok[rows[s:s + 65_536]]], dtype=np.float32)
            tb = np.asarray(m.image_thumb[ok[cols[s:s + 65_536]]], dtype=np.float32)
            # a flat image's thumbnail is zero (no content to compare): two flat ones agree
            flat = (np.linalg.norm(ta, axis=1) < 0.5) & (np.linalg.norm(tb, axis=1) < 0.5)
            same[s:s + 65_536] = ((ta * tb).sum(axis=1) >= st.near_thumbnail) | flat
        rows, cols = rows[same], cols[same]
    src.append(rows)
    dst.append(cols)
    a, b = np.concatenate(src), np.concatenate(dst)
    edge = a != b
    a, b = a[edge], b[edge]
    nodes = np.unique(np.concatenate([a, b]))  # the readable rows (positions in ok) with an edge
    if not len(nodes):
        return DuplicateGroups(group, exact, thr)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (np.searchsorted(nodes, a), np.searchsorted(nodes, b))),
                       shape=(len(nodes), len(nodes)))
    _, label = connected_components(graph, directed=False)
    # number the groups by their content, not their rows (as duplicate_groups does)
    rows_of = np.asarray(ok[nodes])
    keys = np.stack([hashes[rows_of] if hashes is not None else np.zeros(len(nodes), dtype=np.int64),
                     np.asarray(m.caption_hash[rows_of], dtype=np.int64),
                     m.row_key[rows_of] if m.row_key is not None else rows_of.astype(np.int64)], axis=1)
    by_group = np.lexsort((keys[:, 2], keys[:, 1], keys[:, 0], label))
    lab = label[by_group]
    firsts = by_group[np.r_[True, lab[1:] != lab[:-1]]]
    ranked = firsts[np.lexsort((keys[firsts, 2], keys[firsts, 1], keys[firsts, 0]))]
    new_id = np.full(int(label.max()) + 1, -1, dtype=np.int64)
    new_id[label[ranked]] = np.arange(len(ranked))
    group[rows_of] = new_id[label]
    for s in range(0, n, ROW_BLOCK):
        exact[s : s + ROW_BLOCK] &= group[s : s + ROW_BLOCK] >= 0
    return DuplicateGroups(group, exact, thr)


def duplicate_flags(m: MatchScores, g: DuplicateGroups, *, spill: str | None = None) -> np.ndarray:
    """(N,) bool: the members of ``g``'s groups that hold more pairs than the data's
    typical image (:func:`typical_pairs_per_image`; on single-caption data every member).
    On COCO-style data one image's several captions are no finding: their group is still
    reported in ``dup_group``, not flagged. With ``spill`` the same, in row blocks, into
    a memory-mapped result there."""
    n = len(g.group)
    out = spill_empty(spill, n, bool)
    for s in range(0, n, ROW_BLOCK):
        out[s : s + ROW_BLOCK] = g.group[s : s + ROW_BLOCK] >= 0
    typical = typical_pairs_per_image(m, spill=spill)
    n_groups = max((int(g.group[s : s + ROW_BLOCK].max()) + 1 for s in range(0, n, ROW_BLOCK)), default=0)
    if typical > 1 and n_groups > 0:
        sizes = np.zeros(n_groups, dtype=np.int64)
        for s in range(0, n, ROW_BLOCK):
            gb = g.group[s : s + ROW_BLOCK]
            sizes += np.bincount(gb[gb >= 0], minlength=n_groups)
        for s in range(0, n, ROW_BLOCK):
            gb = g.group[s : s + ROW_BLOCK]
            out[s : s + ROW_BLOCK] &= sizes[np.maximum(gb, 0)] > typical
    return out


@register("duplicates")
def detect_duplicates(m: MatchScores, st: DuplicatesSettings, env: DetectorEnv = DetectorEnv()) -> np.ndarray:
    """(N,) bool: members of a group of repeated images (:func:`duplicate_groups`,
    :func:`duplicate_flags`); what happens to them is the group's ``action``, applied by
    the decision step."""
    return duplicate_flags(m, duplicate_groups(m, st, env), spill=env.spill)


def collapse_evidence(
    m: MatchScores, st: CollapseSettings, env: DetectorEnv = DetectorEnv(),
) -> tuple[np.ndarray, np.ndarray]:
    """The ``collapse`` detector's evidence per pair.

    For each readable pair, its ``st.search`` nearest images (cosine of the image
    globals) are walked in order, skipping those that show the same content: the same
    decoded pixels (``image_hash``) or a content-thumbnail cosine of at least
    ``st.same_content`` (``image_thumb``; without thumbnails only exact copies are
    skipped). The first ``st.knn`` remaining are the pair's content-distinct neighbours.

    Parameters
    ----------
    m : MatchScores
        Uses ``image_global`` (N, d), ``caption_global`` (N, d), ``ok`` and, when present,
        ``image_hash`` (N,) and ``image_thumb`` (N, t).
    st : CollapseSettings
    env : DetectorEnv

    Returns
    -------
    tight_z : ndarray, shape (N,), float64
        Robust z (over the tested pairs) of the log cosine distance to the ``knn``-th
        content-distinct neighbour: very negative = abnormally tight. NaN where a pair
        is unreadable or has fewer than ``knn`` content-distinct neighbours in its
        ``search`` nearest (a group of repeated images: not this detector's business).
    caption_share : ndarray, shape (N,), float64
        Share of those neighbours whose caption is of the pair's caption class: cosine
        distance between the two own-caption globals at most ``st.caption_relative`` x
        the median distance between the captions of random pairs. NaN where untested.
    """
    return _collapse_evidence_blocked(m, st, env)


#: Rows per block of :func:`_collapse_evidence_blocked` (its gathered thumbnails are
#: (block, search, t) float32: 13 MB at 1024 x 50 x 64).
COLLAPSE_BLOCK = 1024


def _collapse_evidence_blocked(
    m: MatchScores, st: CollapseSettings, env: DetectorEnv, *, block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`collapse_evidence`'s work, in blocks of ``block`` readable rows (default
    :data:`COLLAPSE_BLOCK`), so that the (N, search) work arrays never exist; with
    ``env.spill`` set the per-pair arrays (the readable rows, the neighbours, the unit
    caption globals, the id-key order, both results) are memory-mapped files there.

    Returns
    -------
    tight_z, caption_share : ndarray, shape (N,), float64
    """
    sp = env.spill
    blk = COLLAPSE_BLOCK if block is None else block
    n = len(m)
    tight = spill_full(sp, n, np.nan, np.float64)
    share = spill_full(sp, n, np.nan, np.float64)
    ok = _ok_rows(m, sp)
    r = len(ok)
    if r <= st.knn + 1:
        return tight, share
    k = min(max(st.search, st.knn), r - 1)
    sims, idx = _knn(_take_rows(m.image_global, ok, sp), k, env)
    h = None if m.image_hash is None else _take_rows(np.asarray(m.image_hash, dtype=np.int64), ok, sp)
    thumb = m.image_thumb
    cap = unit_rows(_take_rows(m.caption_global, ok, sp), spill=sp)
    # scale-free: "one class" is far closer than two random pairs' captions; random pairs
    # drawn in the order of the id keys (a stable argsort: (key, position) records sorted in place)
    if m.row_key is not None:
        rec = spill_empty(sp, r, [("key", np.int64), ("pos", np.int64)])
        for s in range(0, r, ROW_BLOCK):
            rec["key"][s : s + ROW_BLOCK] = m.row_key[ok[s : s + ROW_BLOCK]]
            rec["pos"][s : s + ROW_BLOCK] = np.arange(s, min(s + ROW_BLOCK, r))
        rec.sort(order=["key", "pos"])
        by_key = rec["pos"]
    else:
        by_key = np.arange(r)
    rng = np.random.default_rng(env.seed)
    a = np.asarray(by_key[rng.integers(0, r, size=min(20_000, 10 * r))])
    b = np.asarray(by_key[rng.integers(0, r, size=len(a))])
    del by_key
    typical = float(np.median(1.0 - (cap[a] * cap[b]).sum(axis=1)))
    logk = spill_empty(sp, r, np.float64)  # log k-distance of the tested rows, NaN elsewhere
    shr = spill_empty(sp, r, np.float64)
    for s in range(0, r, blk):
        e = min(s + blk, r)
        sb, ib = sims[s:e], idx[s:e]
        distinct = np.isfinite(sb)
        if h is not None:
            distinct &= h[ib] != h[s:e, None]
        if thumb is not None:
            t_own = np.asarray(thumb[ok[s:e]], dtype=np.float32)
            t_nb = np.asarray(thumb[ok[ib]], dtype=np.float32)
            distinct &= np.einsum("nd,nkd->nk", t_own, t_nb) < st.same_content
            del t_nb
        rank = np.cumsum(distinct, axis=1, dtype=np.int32)
        tested = rank[:, -1] >= st.knn
        rows = np.nonzero(tested)[0]
        logk[s:e] = np.nan
        shr[s:e] = np.nan
        if not len(rows):
            continue
        pos = np.argmax(rank[rows] >= st.knn, axis=1)
        kd = np.maximum(1.0 - sb[rows, pos].astype(np.float64), 1e-6)
        logk[s + rows] = np.log(kd)
        first = distinct[rows] & (rank[rows] <= st.knn)
        nb = np.take_along_axis(ib[rows], np.argsort(~first, axis=1, kind="stable")[:, : st.knn], axis=1)
        same = (1.0 - _row_cos(cap, nb, s + rows)) <= st.caption_relative * typical
        shr[s + rows] = same.mean(axis=1)
    del sims, idx
    tested_logk = spill_select(logk, lambda s, e: np.isfinite(logk[s:e]), sp)
    if len(tested_logk) < 2:
        return tight, share
    z = robust_z(tested_logk, spill=sp)
    pos_z = 0
    for s in range(0, r, ROW_BLOCK):
        lb = logk[s : s + ROW_BLOCK]
        rows = np.nonzero(np.isfinite(lb))[0]
        dst = ok[s : s + ROW_BLOCK][rows]
        tight[dst] = z[pos_z : pos_z + len(rows)]
        share[dst] = shr[s : s + ROW_BLOCK][rows]
        pos_z += len(rows)
    return tight, share


def _row_cos(v: np.ndarray, idx: np.ndarray, rows: np.ndarray | None = None, chunk: int = 4096) -> np.ndarray:
    """``out[r, j] = v[rows[r]] . v[idx[r, j]]`` for ``v`` (M, d), ``idx`` (R, k) (rows
    default 0..R-1), in row chunks so the gathered (chunk, k, d) block stays small."""
    rows = np.arange(len(idx)) if rows is None else rows
    out = np.empty(idx.shape, dtype=np.float32)
    for s in range(0, len(idx), chunk):
        e = min(s + chunk, len(idx))
        out[s:e] = np.einsum("nd,nkd->nk", v[rows[s:e]], v[idx[s:e]])
    return out


@register("collapse")
def detect_collapse(m: MatchScores, st: CollapseSettings, env: DetectorEnv = DetectorEnv()) -> np.ndarray:
    """Images of different content packed abnormally tight under one caption class.

    A learnt backdoor maps every triggered image, whatever it shows, onto one small
    region of the image embedding, and every one of them carries the target's captions.
    Flagged: pairs whose distance to their ``knn``-th content-distinct neighbour is
    abnormally small for this data (:func:`collapse_evidence` ``tight_z`` below
    ``-st.tight_z``) and at least ``st.caption_share`` of those neighbours' captions are
    of the pair's caption class. Repeated photos are skipped as neighbours (the
    ``duplicates`` check groups them). Needs ``m.image_thumb`` (without the content
    thumbnails near copies would look collapsed): without it nothing is flagged.
    Returns (N,) bool.
    """
    if m.image_thumb is None:
        log.warning("collapse: features lack the content thumbnails; detector skipped")
        return np.zeros(len(m), dtype=bool)
    tight, share = collapse_evidence(m, st, env)
    out = spill_empty(env.spill, len(m), bool)
    with np.errstate(invalid="ignore"):
        for s in range(0, len(m), ROW_BLOCK):
            out[s : s + ROW_BLOCK] = ((tight[s : s + ROW_BLOCK] < -st.tight_z)
                                      & (share[s : s + ROW_BLOCK] >= st.caption_share))
    return out


def fit_loss(m: MatchScores, st: FastFitSettings, env: DetectorEnv = DetectorEnv()) -> np.ndarray:
    """Each pair's image-to-caption loss over the set's distinct captions.

    Parameters
    ----------
    m : MatchScores
        Uses ``image_global`` (N, d), ``caption_global`` (N, d), ``caption_hash`` (N,),
        ``ok`` and, when present, ``row_key`` (the caption sample does not depend on row order).
    st : FastFitSettings
    env : DetectorEnv

    Returns
    -------
    ndarray, shape (N,), float64
        ``-log softmax(cos(image, c) / temperature)[own]`` over the distinct captions ``c``
        of the readable pairs (at most ``st.max_captions``, a random sample beyond; the own
        caption is always among them). NaN where the image is unreadable.
    """
    n = len(m)
    loss = np.full(n, np.nan)
    ok = np.nonzero(m.ok)[0]
    if len(ok) < 2:
        return loss
    order = ok[np.argsort(m.row_key[ok], kind="stable")] if m.row_key is not None else ok
    hashes = np.asarray(m.caption_hash, dtype=np.int64)
    _, first = np.unique(hashes[order], return_index=True)
    reps = order[np.sort(first)]  # one row per distinct caption, in id-key order
    if len(reps) > st.max_captions:
        reps = np.sort(np.random.default_rng(env.seed).choice(reps, size=st.max_captions, replace=False))
    cap = np.asarray(m.caption_global, dtype=np.float32)
    cap = cap / np.maximum(np.linalg.norm(cap, axis=1, keepdims=True), 1e-12)
    img = np.asarray(m.image_global, dtype=np.float32)
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    rep_hash = set(hashes[reps].tolist())
    for s in range(0, len(ok), 4096):
        rows = ok[s : s + 4096]
        logits = (img[rows] @ cap[reps].T).astype(np.float64) / st.temperature  # (R, C)
        own = (img[rows] * cap[rows]).sum(axis=1).astype(np.float64) / st.temperature
        # the own caption joins the sample when the sample left it out
        missing = np.array([h not in rep_hash for h in hashes[rows].tolist()])
        top = np.maximum(logits.max(axis=1), own)
        lse = np.log(np.exp(logits - top[:, None]).sum(axis=1) + missing * np.exp(own - top)) + top
        loss[rows] = lse - own
    return loss


@register("fast_fit")
def detect_fast_fit(m: MatchScores, st: FastFitSettings, env: DetectorEnv = DetectorEnv()) -> np.ndarray:
    """Pairs learnt far faster than the rest (Anti-Backdoor Learning's isolation).

    Flagged: readable pairs whose :func:`fit_loss` lies more than ``st.z`` robust std
    below the median loss of the readable pairs. Returns (N,) bool.
    """
    loss = fit_loss(m, st, env)
    flag = np.zeros(len(m), dtype=bool)
    good = np.isfinite(loss)
    if good.sum() >= 2:
        flag[good] = robust_z(loss[good]) < -st.z
    return flag


def run_detectors(
    m: MatchScores,
    settings: DecisionSettings,
    *,
    env: DetectorEnv = DetectorEnv(),
    known: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Each enabled detector's (N,) bool flags (unreadable images never flagged); flags
    already in ``known`` are taken as they are."""
    out = {}
    for name in settings.detectors:
        if name not in REGISTRY:
            raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
        flag = known[name] if known and name in known else REGISTRY[name].fn(m, settings.detector(name), env)
        out[name] = spill_empty(env.spill, len(m), bool)
        for s in range(0, len(m), ROW_BLOCK):
            out[name][s : s + ROW_BLOCK] = flag[s : s + ROW_BLOCK] & m.ok[s : s + ROW_BLOCK]
    return out
