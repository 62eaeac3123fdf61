"""FAISS shortlist of candidate captions per image (DESIGN 2.3 step 2), and the kNN
self-join of the detectors.

Caption globals are L2-normalised, so inner product is cosine similarity. Up to
``exact_threshold`` captions the index is exact (``IndexFlatIP``); above it the index is
built from a FAISS ``index_factory`` string (:class:`IndexSettings`), by default
``IVF{nlist},Flat`` with ``nlist = N / list_size`` lists (1,024 vectors each), ``nprobe``
(8) of them probed: a query scans about ``nprobe * list_size`` vectors plus the list
centroids whatever ``N``, and the quantiser is trained by k-means (:data:`KMEANS_ITERS`
iterations) on a sample of at most :data:`TRAIN_PER_LIST` vectors per list and
``train_sample`` in all. ``HNSW32``, ``IVF{nlist}_HNSW32,Flat`` (an HNSW coarse quantiser,
for very many lists) and other factories are chosen by name. When faiss was built with
GPU support and a GPU is visible, flat and IVF indexes are moved there (HNSW stays on
the CPU).

:func:`self_search` (every row's neighbours among the rows, for the detectors) runs an
``IVF...,Flat`` factory list by list with exact BLAS scoring, at the cost per row of an
exact search over ``nprobe * list_size`` rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from otcclip.models.config.sanitize import IndexSettings
from otcclip.models.spill import empty as spill_empty
from otcclip.models.spill import full as spill_full

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shortlist:
    """Top-k captions per image.

    Attributes
    ----------
    indices : ndarray, shape (N, k'), int64
        Caption row indices, best first; ``-1`` where fewer than ``k'`` were found.
        When built with ``own``, column 0 is always the image's own caption.
    scores : ndarray, shape (N, k'), float32
        Global cosine similarity of each candidate (``-inf`` at ``-1``).
    """

    indices: np.ndarray
    scores: np.ndarray


def gpu_available() -> bool:
    """True when faiss has GPU support and sees at least one GPU."""
    get_n = getattr(faiss, "get_num_gpus", None)
    try:
        return bool(get_n is not None and get_n() > 0)
    except Exception:  # pragma: no cover - broken driver setups
        return False


def content_order(x: np.ndarray, *, seed: int = 0, chunk: int = 8192) -> np.ndarray:
    """Row indices of ``x`` sorted by content (the same rows in any order give the same sequence).

    Rows are ordered by their projection on a fixed random direction (drawn from ``seed``),
    computed row by row in float64 so that a row's key never depends on its position;
    identical rows tie and are interchangeable.
    """
    x = np.asarray(x)
    direction = np.random.default_rng(seed).standard_normal(x.shape[1])
    keys = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], chunk):
        keys[s : s + chunk] = (x[s : s + chunk].astype(np.float64) * direction).sum(axis=1)
    return np.argsort(keys, kind="stable")


def build_index(
    caption_globals: np.ndarray,
    *,
    settings: IndexSettings = IndexSettings(),
    use_gpu: bool | None = None,
    seed: int = 0,
) -> faiss.Index:
    """Index caption globals for inner-product search.

    Parameters
    ----------
    caption_globals : ndarray, shape (M, d)
        L2-normalised caption embeddings (any float dtype; copied to float32).
    settings : IndexSettings
        ``exact_threshold``: exact index up to this many vectors; above it
        ``factory`` (a FAISS ``index_factory`` string, inner-product metric) with
        ``nprobe`` (IVF) or ``ef_search`` (HNSW); ``train_sample``: vectors a trained
        index is trained on.
    use_gpu : bool or None
        None: on the GPU when :func:`gpu_available` (flat and IVF indexes only).
    seed : int
        Seed of the training sample.

    Returns
    -------
    faiss.Index
    """
    xb = np.ascontiguousarray(caption_globals, dtype=np.float32)
    if xb.ndim != 2 or xb.shape[0] == 0:
        raise ValueError(f"caption_globals must be a non-empty (M, d) array, got shape {xb.shape}")
    m, d = xb.shape
    index: faiss.Index
    if m <= settings.exact_threshold:
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.index_factory(d, factory_string(settings, m), faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            _train(index, xb, settings, seed)
        set_search_params(index, settings, 1)
        log.info("index %s: %d captions", factory_string(settings, m), m)
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu and _hnsw(index) is None:
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    index.add(xb)
    return index


def _train(index: faiss.Index, xb: np.ndarray, settings: IndexSettings, seed: int) -> None:
    """Train ``index`` on a bounded sample of ``xb`` (at most ``train_sample`` rows and
    :data:`TRAIN_PER_LIST` per IVF list; k-means runs :data:`KMEANS_ITERS` iterations)."""
    m = xb.shape[0]
    rng = np.random.default_rng(seed)
    ivf = _ivf(index)
    # k-means costs ~ sample * nlist * iterations: a few dozen vectors per list are enough
    size = min(m, settings.train_sample, TRAIN_PER_LIST * ivf.nlist if ivf is not None else m)
    if ivf is not None:
        ivf.cp.niter = KMEANS_ITERS
        ivf.cp.min_points_per_centroid = 1  # the sample is small on purpose: no warning
    # the training sample is drawn from the rows in a canonical order (by content), so
    # the same vectors in any row order train the same quantiser
    canon = content_order(xb, seed=seed)
    index.train(xb[canon[np.sort(rng.choice(m, size=size, replace=False))]])


#: Training vectors per IVF list (k-means on more costs more and partitions no better).
TRAIN_PER_LIST = 64
#: k-means iterations of an IVF quantiser.
KMEANS_ITERS = 10

_GPU_RESOURCES: list[Any] = []


def _gpu_resources() -> Any:
    """One ``StandardGpuResources`` per process, alive as long as the process (faiss
    objects take no extra attributes to hold it, and every GPU index needs it alive)."""
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return _GPU_RESOURCES[0]


def factory_string(settings: IndexSettings, n: int) -> str:
    """``settings.factory`` with ``{nlist}`` replaced by ``n // list_size``, between 16 and
    ``train_sample // 39`` (k-means wants about 39 training vectors per list)."""
    nlist = max(16, min(n // settings.list_size, settings.train_sample // 39))
    return settings.factory.replace("{nlist}", str(nlist))


def _hnsw(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW index inside ``index`` (itself or under a pre-transform), or None."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def set_search_params(index: faiss.Index, settings: IndexSettings, k: int) -> None:
    """Apply ``nprobe`` (IVF) and ``max(ef_search, k)`` (HNSW) to a CPU ``index``."""
    hnsw = _hnsw(index)
    if hnsw is not None:
        hnsw.hnsw.efSearch = max(settings.ef_search, k)
        return
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = settings.nprobe


def _ivf(index: faiss.Index) -> Any:
    """The IVF index inside ``index``, or None."""
    try:
        return faiss.extract_index_ivf(index)
    except (RuntimeError, TypeError):  # not an IVF index
        return None


def search(index: faiss.Index, queries: np.ndarray, k: int, *, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` in batches; an HNSW index's ``efSearch`` is raised to ``k`` first.

    Returns ``(scores (N, k) float32, indices (N, k) int64)``, ``-1`` where fewer were found.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    hnsw = _hnsw(index)
    if hnsw is not None and hnsw.hnsw.efSearch < k:
        hnsw.hnsw.efSearch = k
    n = q.shape[0]
    scores = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, batch_size):
        scores[s : s + batch_size], idx[s : s + batch_size] = index.search(q[s : s + batch_size], k)
    return scores, idx


def shortlist(
    index: faiss.Index,
    image_globals: np.ndarray,
    k: int,
    *,
    own: np.ndarray | None = None,
    caption_globals: np.ndarray | None = None,
    batch_size: int = 8192,
) -> Shortlist:
    """Top-``k`` captions for each image, plus its own caption in column 0.

    Parameters
    ----------
    index : faiss.Index
        From :func:`build_index`.
    image_globals : ndarray, shape (N, d)
        L2-normalised image embeddings.
    k : int
        Candidates per image from the index.
    own : ndarray, shape (N,), int64, optional
        Row of each image's own caption in the index. When given, column 0 holds it
        (its score computed exactly from ``caption_globals``) and it is removed from the
        other columns, so the result has ``k + 1`` columns.
    caption_globals : ndarray, shape (M, d), optional
        Needed with ``own`` to score the own caption.

    Returns
    -------
    Shortlist
    """
    q = np.ascontiguousarray(image_globals, dtype=np.float32)
    kk = max(1, min(k, index.ntotal))
    scores, idx = search(index, q, kk, batch_size=batch_size)
    scores[idx < 0] = -np.inf
    if own is None:
        return Shortlist(indices=idx, scores=scores)
    if caption_globals is None:
        raise ValueError("shortlist(own=...) needs caption_globals to score the own caption")
    own = np.asarray(own, dtype=np.int64)
    own_cap = np.asarray(caption_globals[own], dtype=np.float32)
    own_score = np.einsum("nd,nd->n", q, own_cap).astype(np.float32)
    dup = idx == own[:, None]
    idx = np.where(dup, -1, idx)
    scores = np.where(dup, -np.inf, scores).astype(np.float32)
    # stable: push removed own entries to the end, keep best-first order
    order = np.argsort(idx < 0, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    scores = np.take_along_axis(scores, order, axis=1)
    return Shortlist(
        indices=np.concatenate([own[:, None], idx], axis=1),
        scores=np.concatenate([own_score[:, None], scores], axis=1),
    )


def self_search(
    vectors: np.ndarray,
    k: int,
    *,
    settings: IndexSettings = IndexSettings(),
    seed: int = 0,
    spill: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of ``vectors`` for every row of it (a kNN self-join, the row
    itself included), by inner product.

    Up to ``exact_threshold`` rows, or with a factory that is not ``IVF...,Flat``, this is
    :func:`search` on :func:`build_index`. With an ``IVF{nlist},Flat`` factory the join
    runs list by list: the rows of one list are scored exactly (BLAS) against the rows of
    the ``nprobe`` lists whose centroids are nearest that list's centroid (the list
    itself first). A row thus meets about ``nprobe * list_size`` others whatever ``N``,
    at the speed of an exact search; memory beyond the output is one list's block.

    Parameters
    ----------
    vectors : ndarray, shape (N, d)
        L2-normalised rows (copied to float32 if needed).
    k : int
        Neighbours per row (at most N).
    settings : IndexSettings
        As for :func:`build_index`.
    seed : int
        Seed of the quantiser's training sample.
    spill : path, optional
        A directory: the outputs and the per-row work arrays of the list-by-list join
        are memory-mapped files there (:mod:`otcclip.models.spill`), not RAM.

    Returns
    -------
    scores : ndarray, shape (N, k), float32
        Best first; ``-inf`` where fewer than ``k`` were met.
    indices : ndarray, shape (N, k), int64
        Rows of ``vectors``; ``-1`` where fewer than ``k`` were met.
    """
    xb = np.ascontiguousarray(vectors, dtype=np.float32)
    if xb.ndim != 2 or xb.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty (N, d) array, got shape {xb.shape}")
    m, d = xb.shape
    k = max(1, min(k, m))
    quantizer = None
    if m > settings.exact_threshold:
        index = faiss.index_factory(d, factory_string(settings, m), faiss.METRIC_INNER_PRODUCT)
        if isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat):
            _train(index, xb, settings, seed)
            quantizer = _ivf(index).quantizer
    if quantizer is None:
        scores, idx = search(build_index(xb, settings=settings, seed=seed), xb, k)
        scores[idx < 0] = -np.inf
        return scores, idx
    nlist = quantizer.ntotal
    assign = spill_empty(spill, m, np.int64)
    for s in range(0, m, 65_536):
        assign[s : s + 65_536] = quantizer.search(xb[s : s + 65_536], 1)[1][:, 0]
    centroids = quantizer.reconstruct_n(0, nlist)
    _, probe = quantizer.search(centroids, min(settings.nprobe, nlist))
    # the rows of each list in row order (a stable sort of assign, by counting)
    counts = np.bincount(assign, minlength=nlist)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    order = spill_empty(spill, m, np.int64)
    fill = bounds[:-1].copy()
    for s in range(0, m, 65_536):
        a = assign[s : s + 65_536]
        srt = np.argsort(a, kind="stable")
        a_s = a[srt]
        first = np.searchsorted(a_s, a_s, side="left")  # position within the block's run of its list
        order[fill[a_s] + np.arange(len(a_s)) - first] = s + srt
        fill += np.bincount(a, minlength=nlist)
    del assign
    scores = spill_full(spill, (m, k), -np.inf, np.float32)
    idx = spill_full(spill, (m, k), -1, np.int64)
    for lst in range(nlist):
        rows = order[bounds[lst] : bounds[lst + 1]]
        if len(rows) == 0:
            continue
        lists = [lst] + [int(p) for p in probe[lst] if p >= 0 and p != lst][: settings.nprobe - 1]
        cand = np.concatenate([order[bounds[p] : bounds[p + 1]] for p in lists])
        kk = min(k, len(cand))
        sc, ii = faiss.knn(xb[rows], xb[cand], kk, metric=faiss.METRIC_INNER_PRODUCT)
        scores[rows, :kk] = sc
        idx[rows, :kk] = np.where(ii >= 0, cand[np.maximum(ii, 0)], -1)
    log.info("self-join %s: %d rows, %d lists", factory_string(settings, m), m, nlist)
    return scores, idx
