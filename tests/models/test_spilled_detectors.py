"""The default detectors' spilled paths (``DetectorEnv.spill``: row blocks, work arrays in
memory-mapped files) give what their in-memory paths give, with row blocks forced small so
that every block boundary falls inside the data."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import numpy as np
import pytest

from otcclip.models import detectors
from otcclip.models.config import DecisionSettings, IndexSettings
from otcclip.models.config.detectors import (
    DEFAULT_DETECTORS,
    CollapseSettings,
    DuplicatesSettings,
    ImageBurstSettings,
    TriggerSensitivitySettings,
)
from otcclip.models.decisions import decide_pairs
from otcclip.models.detectors import DetectorEnv
from otcclip.models.scores import MatchScores
from tests.models.same_decisions import assert_same_decisions
from tests.models.test_collapse import _scores as collapse_scores
from tests.models.test_sanitize import _score_shards

INDEX = IndexSettings(exact_threshold=200, list_size=64, nprobe=4)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(detectors, "ROW_BLOCK", 37)
    monkeypatch.setattr(detectors, "COLLAPSE_BLOCK", 13)
    yield


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _repeated(n: int = 700, d: int = 16, t: int = 8, *, seed: int = 0) -> MatchScores:
    """Random pairs with exact copies (one pixel hash, embedding and thumbnail), near copies
    (a slightly moved embedding, the same thumbnail, a hash of their own), images that carry
    many distinct captions (bursts), repeated captions, unreadable rows and purified views."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, d))
    thumb = _unit(rng.standard_normal((n, t)))
    ihash = rng.integers(1, 2**62, n)
    chash = rng.integers(1, 2**62, n)
    for a in rng.choice(n, 40, replace=False):  # families of 2..9 exact copies
        rows = rng.choice(n, int(rng.integers(2, 10)), replace=False)
        img[rows], thumb[rows], ihash[rows] = img[a], thumb[a], ihash[a]
    for a in rng.choice(n, 30, replace=False):  # near copies
        rows = rng.choice(n, 3, replace=False)
        img[rows] = img[a] + 1e-3 * rng.standard_normal((3, d))
        thumb[rows] = thumb[a]
    chash[rng.choice(n, 60)] = chash[rng.choice(n, 60)]
    ok = rng.random(n) > 0.03
    ihash[~ok] = 0
    img = _unit(img)
    cap = _unit(img + 0.5 * rng.standard_normal((n, d)))
    glob = np.stack([(img * cap).sum(axis=1), rng.normal(0.1, 0.05, n)], axis=1).astype(np.float32)
    purified = (glob[:, :1] - np.abs(rng.normal(0.02, 0.02, (n, 2)))).astype(np.float32)
    purified[rng.choice(n, 8)] -= 0.5
    return MatchScores(
        candidates=np.stack([np.arange(n), rng.integers(0, n, n)], axis=1), global_=glob, ot=glob.copy(),
        fused=glob.copy(), ok=ok, image_global=img.astype(np.float16), caption_global=cap.astype(np.float16),
        caption_hash=chash, purified_own=purified, image_hash=ihash, row_key=rng.integers(1, 2**62, n),
        image_thumb=thumb.astype(np.float16))


def _spilled(m: MatchScores, d: str) -> MatchScores:
    return MatchScores.stack(iter([m]), len(m), spill=d)


def _equal(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype and a.shape == b.shape


def test_duplicate_groups_and_flags_spilled_equal_in_memory(small_blocks: None) -> None:
    m = _repeated()
    st = DuplicatesSettings()
    ref = detectors.duplicate_groups(m, st, DetectorEnv(index=INDEX))
    assert ref.member.sum() > 100 and ref.exact.sum() > 50 and (ref.member & ~ref.exact).any()  # both kinds
    with tempfile.TemporaryDirectory() as d:
        env = DetectorEnv(index=INDEX, spill=d)
        ms = _spilled(m, d)
        got = detectors.duplicate_groups(ms, st, env)
        _equal(np.asarray(got.group), ref.group)
        _equal(np.asarray(got.exact), ref.exact)
        assert got.threshold == ref.threshold
        _equal(np.asarray(detectors.duplicate_flags(ms, got, spill=d)), detectors.duplicate_flags(m, ref))


@pytest.mark.parametrize("per_image", [1, 3, 4])
def test_typical_pairs_per_image_spilled_equals_in_memory(small_blocks: None, per_image: int) -> None:
    rng = np.random.default_rng(per_image)
    for n in (301, 302):  # odd and even counts of readable pairs
        m = _repeated(n, seed=per_image)
        h = np.repeat(rng.integers(1, 2**62, n), per_image)[:n]
        h[rng.choice(n, 20)] = h[0]
        m = MatchScores(**{**vars(m), "image_hash": h})
        with tempfile.TemporaryDirectory() as d:
            got = detectors.typical_pairs_per_image(_spilled(m, d), spill=d)
        assert got == detectors.typical_pairs_per_image(m)
    assert got == max(1, per_image)


def test_image_burst_spilled_equals_in_memory(small_blocks: None) -> None:
    m = _repeated()
    st = ImageBurstSettings()
    ref = detectors.detect_image_burst(m, st, DetectorEnv(index=INDEX))
    assert ref.sum() > 10
    hashes = np.asarray(m.image_hash)
    per_hash = detectors._distinct_captions_per_hash(m.caption_hash, hashes)
    with tempfile.TemporaryDirectory() as d:
        got = detectors.detect_image_burst(_spilled(m, d), st, DetectorEnv(index=INDEX, spill=d))
        _equal(np.asarray(got), ref)
        _equal(np.asarray(detectors._distinct_captions_per_hash(m.caption_hash, hashes, spill=d)), per_hash)
    assert per_hash.max() >= 5


def test_collapse_evidence_spilled_equals_in_memory(small_blocks: None) -> None:
    m, bad, _ = collapse_scores(3, repeats=30, mixed=20)
    rng = np.random.default_rng(0)
    ok = rng.random(len(m)) > 0.05
    m = MatchScores(**{**vars(m), "ok": ok, "row_key": rng.integers(1, 2**62, len(m))})
    st = CollapseSettings()
    tight, share = detectors.collapse_evidence(m, st, DetectorEnv(index=INDEX, seed=3))
    flag = detectors.detect_collapse(m, st, DetectorEnv(index=INDEX, seed=3))
    assert flag[bad & ok].mean() > 0.5 and np.isnan(tight[~ok]).all()
    with tempfile.TemporaryDirectory() as d:
        env = DetectorEnv(index=INDEX, seed=3, spill=d)
        ms = _spilled(m, d)
        t2, s2 = detectors.collapse_evidence(ms, st, env)
        _equal(np.asarray(t2), tight)
        _equal(np.asarray(s2), share)
        _equal(np.asarray(detectors.detect_collapse(ms, st, env)), flag)


@pytest.mark.parametrize("knn", [0, 5])
def test_trigger_evidence_spilled_equals_in_memory(small_blocks: None, knn: int) -> None:
    m = _repeated()
    st = TriggerSensitivitySettings(knn=knn)
    ev = detectors.trigger_evidence(m, st, DetectorEnv(index=INDEX))
    assert ev is not None
    flags = detectors.trigger_flags(*ev, st)
    assert 0 < flags.sum() < 50
    with tempfile.TemporaryDirectory() as d:
        got = detectors.trigger_evidence(_spilled(m, d), st, DetectorEnv(index=INDEX, spill=d))
        assert got is not None
        _equal(np.asarray(got[0]), ev[0])
        if knn:
            assert got[1] is not None and ev[1] is not None
            _equal(np.asarray(got[1]), ev[1])
        _equal(np.asarray(detectors.trigger_flags(*got, st, spill=d)), flags)


@pytest.mark.parametrize("action", ["keep_one", "drop_all"])
def test_decisions_with_the_default_detectors_and_small_blocks_spilled_equal_in_memory(
    small_blocks: None, action: str,
) -> None:
    """decide_pairs on spilled scores with small row blocks equals decide_pairs in memory,
    column by column, with every default detector on data that exercises it."""
    from dataclasses import replace

    full = MatchScores.concat([s.scores for s in _score_shards(900, 128, 8, 16)])
    rep = _repeated(len(full), d=16, t=6, seed=5)
    full = replace(full, image_hash=rep.image_hash, image_thumb=rep.image_thumb, image_global=rep.image_global,
                   caption_hash=rep.caption_hash, ok=full.ok & rep.ok)
    base = DecisionSettings()
    settings = replace(base, detectors=DEFAULT_DETECTORS, duplicates=replace(base.duplicates, min_size=2, action=action))
    ref = decide_pairs(full, settings=settings, env=DetectorEnv(index=INDEX))
    assert (ref.reason == "duplicate").sum() >= 10 and set(ref.detectors.tolist()) - {""}
    with tempfile.TemporaryDirectory() as d:
        got = decide_pairs(_spilled(full, d), settings=settings, env=DetectorEnv(index=INDEX, spill=d), block=53)
        assert_same_decisions(got, ref)
