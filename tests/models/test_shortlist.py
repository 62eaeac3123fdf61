"""FAISS shortlist: exact top-k, own caption first, IVF recall, bad input."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from otcclip.models.config.sanitize import IndexSettings
from otcclip.models.shortlist import build_index, factory_string, shortlist


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
    index = build_index(caps, settings=IndexSettings(exact_threshold=1000, factory=factory, ef_search=8), use_gpu=False)
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
