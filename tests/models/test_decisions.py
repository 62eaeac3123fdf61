"""Decisions on synthetic scores: GMM separation, reassign / drop / keep, detectors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from otcclip.models.config import (
    CaptionBurstSettings,
    ImageBurstSettings,
    TriggerSensitivitySettings,
)
from otcclip.models.decisions import (
    DecisionSettings,
    MatchScores,
    decide_pairs,
    fit_p_clean,
)
from otcclip.models.detectors import (
    detect_caption_burst,
    detect_image_burst,
    detect_trigger_sensitivity,
)


def _scores(n: int = 300, seed: int = 0, poison: float = 0.1) -> tuple[MatchScores, np.ndarray, np.ndarray]:
    """Pairs of 10 classes; poisoned pairs carry a caption of another class.

    Candidate 1 is a same-class caption of the image (a clean alternative)."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 10, n)
    bad = rng.random(n) < poison
    centres = rng.standard_normal((10, 16))
    img = centres[cls] + 0.3 * rng.standard_normal((n, 16))
    cap_cls = np.where(bad, (cls + 1 + rng.integers(0, 9, n)) % 10, cls)
    cap = centres[cap_cls] + 0.3 * rng.standard_normal((n, 16))
    own = np.where(bad, rng.normal(0.1, 0.03, n), rng.normal(0.4, 0.03, n))
    # same-class alternative: another row of class cls, scoring like a clean pair
    alt_row = np.array([rng.choice(np.nonzero((cls == c) & ~bad)[0]) for c in cls])
    alt = rng.normal(0.4, 0.03, n)
    other = rng.normal(0.05, 0.03, n)
    cand = np.stack([np.arange(n), alt_row, (np.arange(n) + 7) % n], axis=1)
    fused = np.stack([own, alt, other], axis=1).astype(np.float32)
    m = MatchScores(
        candidates=cand.astype(np.int64), global_=fused, ot=fused, fused=fused,
        ok=np.ones(n, dtype=bool), image_global=img.astype(np.float32),
        caption_global=cap.astype(np.float32), caption_hash=np.arange(n, dtype=np.int64),
    )
    return m, bad, cls[alt_row] == cls


def test_poisoned_pairs_are_reassigned_and_clean_pairs_kept() -> None:
    m, bad, _ = _scores()
    # the engine's proposals (abstain off; tests/models/test_abstain.py covers abstaining)
    d = decide_pairs(m, settings=DecisionSettings(detectors=(), abstain=False))
    assert d.gmm["bimodal"] == 1.0
    assert (d.action[bad] == "reassign").mean() > 0.95
    assert (d.new_caption_index[bad] == m.candidates[bad, 1]).all()
    assert (d.action[~bad] == "keep").mean() > 0.95
    assert set(d.reason[d.action == "reassign"]) <= {"low_own_score", "better_caption"}
    assert (d.p_clean[bad] < 0.5).all() and np.median(d.p_clean[~bad]) > 0.9
    np.testing.assert_array_equal(d.new_caption_index[d.action == "keep"], np.nonzero(d.action == "keep")[0])
    tab = d.to_arrow()
    assert tab.num_rows == len(m) and {"action", "reason", "p_clean", "new_caption_index"} <= set(tab.column_names)
    assert sum(d.counts()["action"].values()) == len(m)


def test_no_plausible_caption_means_drop_and_unreadable_images_are_dropped() -> None:
    m, bad, _ = _scores(seed=1)
    fused = m.fused.copy()
    fused[bad, 1] = 0.05  # no clean-looking alternative for the poisoned pairs
    ok = m.ok.copy()
    ok[0] = False
    m2 = MatchScores(m.candidates, fused, fused, fused, ok, m.image_global, m.caption_global, m.caption_hash)
    d = decide_pairs(m2, settings=DecisionSettings(detectors=(), abstain=False))
    drop = bad.copy()
    drop[0] = False
    assert (d.action[drop] == "drop").all()
    assert set(d.reason[drop]) == {"no_plausible_caption"}
    assert d.action[0] == "drop" and d.reason[0] == "unreadable_image" and d.new_caption_index[0] == -1


def test_unimodal_scores_give_p_clean_one() -> None:
    rng = np.random.default_rng(3)
    p_fn, info = fit_p_clean(rng.normal(0.3, 0.05, 2000))
    assert info["bimodal"] == 0.0
    assert (p_fn(np.array([0.0, 0.3, 0.6])) == 1.0).all()


def test_image_burst_detector_flags_one_image_with_many_captions() -> None:
    m, _, _ = _scores(n=200, seed=4, poison=0.0)
    img = m.image_global.copy()
    rng = np.random.default_rng(5)
    target = img[0] / np.linalg.norm(img[0])
    for r in range(1, 9):  # 8 near-copies of image 0, each with its own caption text
        img[r] = target + 1e-4 * rng.standard_normal(16)
    m2 = MatchScores(m.candidates, m.global_, m.ot, m.fused, m.ok, img.astype(np.float32), m.caption_global, m.caption_hash)
    flags = detect_image_burst(m2, ImageBurstSettings())
    assert flags[:9].all() and not flags[9:].any()
    same_text = np.zeros(200, dtype=np.int64)  # all one caption text: not a burst of *distinct* captions
    m3 = MatchScores(m.candidates, m.global_, m.ot, m.fused, m.ok, img.astype(np.float32), m.caption_global, same_text)
    assert not detect_image_burst(m3, ImageBurstSettings()).any()
    d = decide_pairs(m2, settings=DecisionSettings(detectors=("image_burst",)))
    assert set(d.action[:9]) <= {"reassign", "drop"}
    assert all("image_burst" in s for s in d.detectors[:9])
    assert set(decide_pairs(m2, settings=DecisionSettings(detectors=())).detectors.tolist()) == {""}


def test_caption_burst_detector_flags_outlier_images_of_a_repeated_caption() -> None:
    m, _, _ = _scores(n=200, seed=6, poison=0.0)
    rng = np.random.default_rng(7)
    img = m.image_global.copy()
    hashes = m.caption_hash.copy()
    group = np.arange(40)
    hashes[group] = 12345  # one caption text on 40 images
    img[group] = img[0] + 0.05 * rng.standard_normal((40, 16))  # ... which look alike,
    img[group[:3]] = -img[0] + 0.05 * rng.standard_normal((3, 16))  # except 3 (a backdoor)
    m2 = MatchScores(m.candidates, m.global_, m.ot, m.fused, m.ok, img.astype(np.float32), m.caption_global, hashes)
    flags = detect_caption_burst(m2, CaptionBurstSettings())
    assert flags[:3].all() and flags.sum() == 3


def test_unknown_detector_is_refused() -> None:
    m, _, _ = _scores(n=50)
    with pytest.raises(ValueError, match="unknown detector"):
        decide_pairs(m, settings=DecisionSettings(detectors=("nope",)))


def test_trigger_sensitivity_drops_pairs_whose_score_collapses_when_low_passed() -> None:
    m, bad, _ = _scores(seed=3, poison=0.0)
    rng = np.random.default_rng(3)
    n = len(m)
    # clean pairs lose a little of their own score on the low-passed view; triggered ones
    # (their score rests on the trigger) lose most of it, yet look clean on the image itself
    purified = m.global_[:, 0] - rng.normal(0.02, 0.01, n)
    trig = np.zeros(n, dtype=bool)
    trig[rng.choice(n, 20, replace=False)] = True
    purified[trig] = m.global_[trig, 0] - 0.3
    m2 = MatchScores(
        m.candidates, m.global_, m.ot, m.fused, m.ok, m.image_global, m.caption_global, m.caption_hash,
        purified_own=purified.astype(np.float32),
    )
    st = DecisionSettings(detectors=("trigger_sensitivity",))
    flags = detect_trigger_sensitivity(m2, st.trigger_sensitivity)
    assert flags[trig].all() and flags[~trig].mean() < 0.02
    d = decide_pairs(m2, settings=replace(st, abstain=False))
    # dropped although a clean-like alternative caption exists (it would be the trigger's)
    assert (d.action[trig] == "drop").all() and set(d.reason[trig]) == {"trigger_sensitivity"}
    assert (d.new_caption_index[trig] == -1).all()
    assert (d.action[~trig] == "keep").mean() > 0.95
    # abstaining (the default), the flag alone is no calibrated evidence: kept for review (the
    # trigger-template search drops the images that carry a found trigger); trusted, it drops
    d = decide_pairs(m2, settings=st)
    assert d.model_quality["verdict"] == "ok" and (d.action[trig] == "keep").all() and d.review[trig].all()
    assert all(str(r).startswith("drop/trigger_sensitivity: detector flag") for r in d.review_reason[trig])
    d = decide_pairs(m2, settings=replace(st, weak_model_detectors=("trigger_sensitivity",)))
    assert (d.action[trig] == "drop").all() and set(d.reason[trig]) == {"trigger_sensitivity"}
    # without the purified view the detector flags nothing (and says so in the log)
    assert not detect_trigger_sensitivity(m, st.trigger_sensitivity).any()


def test_sensitivity_enrichment_keeps_the_trigger_and_drops_scattered_false_alarms() -> None:
    m, _, _ = _scores(n=600, seed=5, poison=0.0)
    rng = np.random.default_rng(5)
    n = len(m)
    # captions of 10 classes: a backdoor's pairs all carry class-3 captions; false alarms
    # (equally sensitive) are spread over every class
    centres = rng.standard_normal((10, 16))
    cap_cls = rng.integers(0, 10, n)
    caps = centres[cap_cls] + 0.3 * rng.standard_normal((n, 16))
    purified = m.global_[:, 0] - rng.normal(0.02, 0.01, n)
    trig = np.zeros(n, dtype=bool)
    trig[rng.choice(np.nonzero(cap_cls == 3)[0], 30, replace=False)] = True
    alarm = np.zeros(n, dtype=bool)
    alarm[rng.choice(np.nonzero(~trig)[0], 30, replace=False)] = True
    purified[trig | alarm] = m.global_[trig | alarm, 0] - 0.3
    m2 = MatchScores(
        m.candidates, m.global_, m.ot, m.fused, m.ok, m.image_global, caps.astype(np.float32), m.caption_hash,
        purified_own=purified.astype(np.float32),
    )
    plain = detect_trigger_sensitivity(m2, TriggerSensitivitySettings())
    assert plain[trig].all() and plain[alarm].all()
    st = DecisionSettings(detectors=("trigger_sensitivity",), trigger_sensitivity=TriggerSensitivitySettings(knn=40))
    flags = detect_trigger_sensitivity(m2, st.trigger_sensitivity)
    assert flags[trig].mean() > 0.9
    assert flags[alarm & (cap_cls != 3)].sum() == 0
    d = decide_pairs(m2, settings=st)
    assert np.isfinite(d.sensitivity_enrichment).all()
    assert d.sensitivity_enrichment[trig].min() > st.trigger_sensitivity.enrichment_z
    assert (d.action[alarm & (cap_cls != 3)] == "keep").all()
    # off by default: the column is NaN
    assert np.isnan(decide_pairs(m2, settings=DecisionSettings(detectors=("trigger_sensitivity",))).sensitivity_enrichment).all()
