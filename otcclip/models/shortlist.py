"""FAISS shortlist of candidate captions per image (DESIGN 2.3 step 2).

Caption globals are L2-normalised, so inner product is cosine similarity. Below
``exact_threshold`` captions the index is exact (``IndexFlatIP``); above it an IVF index
(``IndexIVFFlat``, inner product, ``nlist ~ sqrt(N)``, ``nprobe`` lists searched) is
trained on a sample. When faiss was built with GPU support and a GPU is visible the
index is moved there.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss
import numpy as np

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


def content_order(x: np.ndarray, *, seed: int = 0, chunk: int = 65_536) -> np.ndarray:
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
    exact_threshold: int = 20_000,
    nlist: int | None = None,
    nprobe: int = 32,
    use_gpu: bool | None = None,
    seed: int = 0,
) -> faiss.Index:
    """Index caption globals for inner-product search.

    Parameters
    ----------
    caption_globals : ndarray, shape (M, d)
        L2-normalised caption embeddings (any float dtype; copied to float32).
    exact_threshold : int
        Up to this many captions the index is exact (``IndexFlatIP``); above, IVF.
    nlist, nprobe : int
        IVF lists (default ``sqrt(M)``) and lists searched per query.
    use_gpu : bool or None
        None: on the GPU when :func:`gpu_available`.

    Returns
    -------
    faiss.Index
    """
    xb = np.ascontiguousarray(caption_globals, dtype=np.float32)
    if xb.ndim != 2 or xb.shape[0] == 0:
        raise ValueError(f"caption_globals must be a non-empty (M, d) array, got shape {xb.shape}")
    m, d = xb.shape
    index: faiss.Index
    if m <= exact_threshold:
        index = faiss.IndexFlatIP(d)
    else:
        nl = nlist or max(16, int(math.sqrt(m)))
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nl, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        # the training sample is drawn from the rows in a canonical order (by content), so
        # the same vectors in any row order train the same quantiser
        canon = content_order(xb, seed=seed)
        sample = xb[canon[np.sort(rng.choice(m, size=min(m, nl * 64), replace=False))]]
        index.train(sample)
        index.nprobe = nprobe
        log.info("IVF index: %d captions, nlist=%d, nprobe=%d", m, nl, nprobe)
    if use_gpu is None:
        use_gpu = gpu_available()
    if use_gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)
        index._otc_res = res  # type: ignore[attr-defined]  # keep the resources alive
    index.add(xb)
    return index


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
    n = q.shape[0]
    kk = max(1, min(k, index.ntotal))
    scores = np.empty((n, kk), dtype=np.float32)
    idx = np.empty((n, kk), dtype=np.int64)
    for s in range(0, n, batch_size):
        sc, ix = index.search(q[s : s + batch_size], kk)
        scores[s : s + batch_size], idx[s : s + batch_size] = sc, ix
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
