"""FAISS shortlist: exact top-k, own caption first, IVF recall, the list-by-list self-join, bad input."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from otcclip.models.config.sanitize import IndexSettings
from otcclip.models.shortlist import build_index, factory_string, self_search, shortlist


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_topk_matches_numpy_and_own_caption_comes_first() -> None:
    rng = np.random.default_rng(0)
    caps, imgs = _unit(rng, 300, 16), _unit(rng, 50, 16)
    sl = shortlist(build_index(caps, use_gpu=False), imgs, 5)
    sims = imgs @ caps.T
    np.testing.assert_array_equal(sl.indices, np.argsort(-sims, axis=1)[:, :5])
    np.testing.assert_allclose(sl.scores, np.sort(sims, axis=1)[:, ::-1][:, :5], atol=1e-5)

    own = np.arange(50, dtype=np.int64)
    imgs[3] = caps[3]  # image 3's own caption is also its nearest one: must not repeat
    sl = shortlist(build_index(caps, use_gpu=False), imgs, 5, own=own, caption_globals=caps)
    assert sl.indices.shape == (50, 6)
    np.testing.assert_array_equal(sl.indices[:, 0], own)
    np.testing.assert_allclose(sl.scores[:, 0], np.einsum("nd,nd->n", imgs, caps[:50]), atol=1e-5)
    assert (sl.indices[3] == 3).sum() == 1
    assert sl.indices[3, -1] == -1 and sl.scores[3, -1] == -np.inf
    for i in range(50):
        row = sl.indices[i, 1:][sl.indices[i, 1:] >= 0]
        assert len(set(row.tolist())) == len(row)


@pytest.mark.parametrize(("factory", "kind"), [("HNSW32", "HNSW"), ("IVF64,Flat", "IVF")])
def test_factory_index_above_threshold_has_high_recall(factory: str, kind: str) -> None:
    rng = np.random.default_rng(1)
    centres = _unit(rng, 20, 32)
    caps = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 32)).astype(np.float32)
    caps /= np.linalg.norm(caps, axis=1, keepdims=True)
    imgs = caps[:200] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    # a fixed 64 lists of ~47 vectors (not list_size): probe half of them
    index = build_index(caps, settings=IndexSettings(exact_threshold=1000, factory=factory, ef_search=8, nprobe=32),
                        use_gpu=False)
    assert kind in type(faiss.downcast_index(index)).__name__
    assert "Flat" in type(build_index(caps[:500], settings=IndexSettings(exact_threshold=1000), use_gpu=False)).__name__
    sl = shortlist(index, imgs, 10)
    truth = np.argsort(-(imgs @ caps.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(sl.indices.tolist(), truth.tolist(), strict=True)])
    assert recall > 0.9


def test_bad_factory_string_is_refused() -> None:
    with pytest.raises(ValueError, match="factory"):
        IndexSettings(factory="HNSW32; rm -rf")
    assert IndexSettings(factory="IVF4096,Flat").factory == "IVF4096,Flat"


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        build_index(np.zeros((0, 4), np.float32))
    caps = _unit(np.random.default_rng(2), 10, 4)
    with pytest.raises(ValueError, match="caption_globals"):
        shortlist(build_index(caps, use_gpu=False), caps, 3, own=np.arange(10))


def test_list_count_follows_n_so_a_query_scans_a_fixed_number_of_vectors() -> None:
    st = IndexSettings()
    assert factory_string(st, 100_000) == f"IVF{100_000 // st.list_size},Flat"
    assert factory_string(st, 1_000) == "IVF16,Flat"
    assert factory_string(st, 10**9) == f"IVF{st.train_sample // 39},Flat"  # k-means needs ~39 vectors per list
    assert factory_string(IndexSettings(factory="HNSW32"), 10**6) == "HNSW32"


def _clustered(rng: np.random.Generator, n: int, d: int, clusters: int, noise: float) -> np.ndarray:
    """Unit vectors around ``clusters`` centres (embeddings of a dataset's classes)."""
    x = _unit(rng, clusters, d)[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["IVF{nlist},Flat", "IVF{nlist}_HNSW32,Flat", "HNSW32"])
def test_self_join_above_threshold_recalls_exact_neighbours(factory: str) -> None:
    rng = np.random.default_rng(2)
    x = _clustered(rng, 12_000, 48, 60, 0.1)
    st = IndexSettings(exact_threshold=1000, factory=factory, list_size=400, nprobe=8)
    scores, idx = self_search(x, 10, settings=st)
    assert scores.shape == idx.shape == (len(x), 10)
    truth_s, truth = faiss.IndexFlatIP(48), None
    truth_s.add(x)
    _, truth = truth_s.search(x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx.tolist(), truth.tolist(), strict=True)])
    assert recall >= 0.95, recall
    # the scores are the exact inner products of the rows found, best first
    np.testing.assert_allclose(scores, np.einsum("nd,nkd->nk", x, x[idx]), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


def test_self_join_below_threshold_is_exact_and_ivf_join_ignores_row_order() -> None:
    rng = np.random.default_rng(3)
    x = _clustered(rng, 3000, 16, 12, 0.5)
    s_exact, i_exact = self_search(x, 5, settings=IndexSettings(exact_threshold=5000))
    flat = faiss.IndexFlatIP(16)
    flat.add(x)
    s_ref, _ = flat.search(x, 5)
    np.testing.assert_allclose(s_exact, s_ref, atol=1e-6)
    ivf = IndexSettings(exact_threshold=100, list_size=100, nprobe=3)
    perm = rng.permutation(len(x))
    sa, ia = self_search(x, 5, settings=ivf)
    sb, ib = self_search(x[perm], 5, settings=ivf)
    np.testing.assert_allclose(sa[perm], sb, atol=1e-6)
    assert (perm[ib] == ia[perm]).mean() > 0.999  # ties among equal scores may swap
    assert self_search(x[:1], 3, settings=ivf)[1].shape == (1, 1)
