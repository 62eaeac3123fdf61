"""The trigger-agnostic ``collapse`` detector: registered, off by default; it finds images of
different content that the model packs abnormally tight under one caption class, and
leaves repeated photos (same content) and mixed-caption clusters alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from otcclip.models.config.detectors import DETECTOR_SETTINGS, CollapseSettings, DecisionSettings
from otcclip.models.detectors import (
    REGISTRY,
    DetectorEnv,
    collapse_evidence,
    detect_collapse,
    run_detectors,
)
from otcclip.models.features import content_thumbnail
from otcclip.models.scores import MatchScores

D, T = 32, 64


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _scores(seed: int, *, poison: int = 40, repeats: int = 0, mixed: int = 0, per_class: int = 200,
            classes: int = 4, thumbs: bool = True) -> tuple[MatchScores, np.ndarray, np.ndarray]:
    """Clean pairs spread around their class; ``poison`` images of other classes collapsed
    onto one point under class-0 captions, each of its own content (random thumbnail);
    ``repeats`` copies of one clean photo (near-identical thumbnails and embeddings);
    ``mixed`` images collapsed onto another point under captions of every class.
    Returns scores, the poisoned mask and the repeated-photo mask."""
    rng = np.random.default_rng(seed)
    cap_dirs = rng.normal(size=(classes, D))
    img_dirs = rng.normal(size=(classes, D))
    cls = np.repeat(np.arange(classes), per_class)
    image = img_dirs[cls] + 1.2 * rng.normal(size=(len(cls), D))
    caption = cap_dirs[cls] + 0.2 * rng.normal(size=(len(cls), D))
    thumb = _unit(rng.normal(size=(len(cls), T)))
    bad = np.zeros(len(cls), dtype=bool)
    rep = np.zeros(len(cls), dtype=bool)
    others = rng.permutation(np.nonzero(cls != 0)[0])
    src = others[:poison]
    centre = rng.normal(size=D) * 2
    image[src] = centre + 0.15 * rng.normal(size=(poison, D))
    caption[src] = cap_dirs[0] + 0.2 * rng.normal(size=(poison, D))
    bad[src] = True
    if repeats:
        r = others[poison : poison + repeats]
        image[r] = image[r[0]] + 0.05 * rng.normal(size=(repeats, D))
        thumb[r] = _unit(thumb[r[0]] + 0.01 * rng.normal(size=(repeats, T)))
        caption[r] = caption[r[0]]
        rep[r] = True
    if mixed:
        mx = others[poison + repeats : poison + repeats + mixed]
        image[mx] = rng.normal(size=D) * 2 + 0.15 * rng.normal(size=(mixed, D))
        caption[mx] = cap_dirs[rng.integers(0, classes, mixed)] + 0.2 * rng.normal(size=(mixed, D))
    n = len(cls)
    m = MatchScores(
        candidates=np.arange(n)[:, None], global_=np.zeros((n, 1), np.float32), ot=np.zeros((n, 1), np.float32),
        fused=np.zeros((n, 1), np.float32), ok=np.ones(n, dtype=bool), image_global=_unit(image).astype(np.float32),
        caption_global=_unit(caption).astype(np.float32), caption_hash=np.arange(n, dtype=np.int64),
        image_hash=np.arange(1, n + 1, dtype=np.int64), image_thumb=thumb.astype(np.float16) if thumbs else None,
    )
    return m, bad, rep


def test_collapse_is_registered_on_by_default_and_kept_for_review_under_a_weak_model() -> None:
    assert DETECTOR_SETTINGS["collapse"] is CollapseSettings and REGISTRY["collapse"].settings is CollapseSettings
    assert "collapse" in DecisionSettings().detectors and "collapse" not in DecisionSettings().weak_model_detectors
    m, _, _ = _scores(0)
    assert run_detectors(m, DecisionSettings())["collapse"].shape == (len(m),)
    assert "collapse" not in run_detectors(m, DecisionSettings(detectors=("density",)))
    with pytest.raises(ValueError):
        CollapseSettings(knn=20, search=10)


def test_collapse_finds_distinct_images_packed_under_one_caption_class() -> None:
    m, bad, _ = _scores(1)
    flag = detect_collapse(m, CollapseSettings(), DetectorEnv(seed=0))
    assert flag[bad].mean() >= 0.9
    assert (flag & ~bad).sum() <= 0.02 * (~bad).sum()
    clean, _, _ = _scores(1, poison=0)
    assert detect_collapse(clean, CollapseSettings(), DetectorEnv(seed=0)).mean() < 0.02


def test_repeated_photos_are_not_a_collapse_but_need_the_thumbnails_to_tell() -> None:
    m, bad, rep = _scores(2, repeats=30)
    flag = detect_collapse(m, CollapseSettings(), DetectorEnv(seed=0))
    assert not flag[rep].any()
    assert flag[bad].mean() >= 0.9
    tight, _ = collapse_evidence(m, CollapseSettings(), DetectorEnv(seed=0))
    assert (tight[rep] > -1.0).all()  # measured among the other content: typical
    # without thumbnails only exact pixel copies could be skipped and near copies would look
    # collapsed: the evidence says so, and the detector flags nothing
    blind, _, rep2 = _scores(2, repeats=30, thumbs=False)
    tight_blind, share_blind = collapse_evidence(blind, CollapseSettings(), DetectorEnv(seed=0))
    assert ((tight_blind[rep2] < -CollapseSettings().tight_z) & (share_blind[rep2] >= 0.9)).mean() > 0.5
    assert not detect_collapse(blind, CollapseSettings(), DetectorEnv(seed=0)).any()


def test_a_tight_cluster_under_mixed_captions_is_not_flagged() -> None:
    m, bad, _ = _scores(3, mixed=40)
    flag = detect_collapse(m, CollapseSettings(), DetectorEnv(seed=0))
    assert flag[bad].mean() >= 0.9
    assert (flag & ~bad).sum() <= 0.02 * (~bad).sum()
    _, share = collapse_evidence(m, CollapseSettings(), DetectorEnv(seed=0))
    assert np.nanmean(share[bad]) > 0.9


def test_collapse_ignores_unreadable_pairs_and_tiny_inputs() -> None:
    m, bad, _ = _scores(4)
    ok = m.ok.copy()
    ok[np.nonzero(bad)[0][:5]] = False
    m2 = MatchScores(m.candidates, m.global_, m.ot, m.fused, ok, m.image_global, m.caption_global, m.caption_hash,
                     image_hash=m.image_hash, image_thumb=m.image_thumb)
    tight, share = collapse_evidence(m2, CollapseSettings(), DetectorEnv(seed=0))
    assert np.isnan(tight[~ok]).all() and np.isnan(share[~ok]).all()
    small = MatchScores(m.candidates[:5], m.global_[:5], m.ot[:5], m.fused[:5], m.ok[:5], m.image_global[:5],
                        m.caption_global[:5], m.caption_hash[:5])
    assert not detect_collapse(small, CollapseSettings(), DetectorEnv()).any()


def test_content_thumbnail_ignores_brightness_and_contrast_not_content() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    brighter = 0.5 * a + 0.3
    t = content_thumbnail(torch.cat([a, brighter, torch.full((1, 3, 32, 32), 0.4)]))
    assert t.shape == (5, 64)
    assert torch.allclose(t[:2], t[2:4], atol=1e-4)  # same content, other brightness / contrast
    assert abs(float(t[0] @ t[1])) < 0.5  # unrelated images
    assert float(t[4].abs().max()) == 0.0  # a flat image: zeros


def test_collapse_does_not_depend_on_the_row_order() -> None:
    m, _, _ = _scores(5, repeats=10)
    keyed = MatchScores(m.candidates, m.global_, m.ot, m.fused, m.ok, m.image_global, m.caption_global, m.caption_hash,
                        image_hash=m.image_hash, row_key=np.arange(len(m), dtype=np.int64) * 7919 % 10007,
                        image_thumb=m.image_thumb)
    perm = np.random.default_rng(0).permutation(len(m))
    shuffled = MatchScores(np.arange(len(m))[:, None], m.global_[perm], m.ot[perm], m.fused[perm], m.ok[perm],
                           m.image_global[perm], m.caption_global[perm], m.caption_hash[perm],
                           image_hash=m.image_hash[perm], row_key=keyed.row_key[perm], image_thumb=m.image_thumb[perm])
    st = CollapseSettings()
    t1, s1 = collapse_evidence(keyed, st, DetectorEnv(seed=0))
    t2, s2 = collapse_evidence(shuffled, st, DetectorEnv(seed=0))
    np.testing.assert_allclose(t1[perm], t2, atol=1e-9)
    np.testing.assert_array_equal(s1[perm], s2)
