"""The ``fast_fit`` detector (Anti-Backdoor Learning's isolation): registered with its
settings, off by default, and it flags pairs fitted far better than the rest, not clean ones."""

from __future__ import annotations

import numpy as np

from otcclip.models.config import from_dict
from otcclip.models.config.detectors import DETECTOR_SETTINGS, DecisionSettings, FastFitSettings
from otcclip.models.config.training import TrainConfig
from otcclip.models.detectors import REGISTRY, DetectorEnv, detect_fast_fit, fit_loss, run_detectors
from otcclip.models.scores import MatchScores


def _scores(seed: int, *, planted: int, classes: int = 5, templates: int = 4, per_class: int = 120, d: int = 256,
            unreadable: int = 0) -> tuple[MatchScores, np.ndarray]:
    """Captions: ``templates`` texts per class around the class direction. Clean images sit
    near their class direction with much noise (a model early in training fits them
    loosely); ``planted`` pairs of other classes carry captions of class 0 and images
    almost on their own caption (a shortcut the model has already learnt)."""
    rng = np.random.default_rng(seed)
    cls_dir = rng.normal(size=(classes, d))
    cap_text = cls_dir[:, None, :] + 0.8 * rng.normal(size=(classes, templates, d))
    cls = np.repeat(np.arange(classes), per_class)
    tpl = rng.integers(0, templates, size=len(cls))
    caption = cap_text[cls, tpl]
    image = 0.1 * cls_dir[cls] + rng.normal(size=(len(cls), d))
    bad = np.zeros(len(cls), dtype=bool)
    if planted:
        src = rng.choice(np.nonzero(cls != 0)[0], planted, replace=False)
        tpl[src] = rng.integers(0, templates, size=planted)
        cls[src] = 0
        caption[src] = cap_text[0, tpl[src]]
        image[src] = caption[src] + 0.05 * rng.normal(size=(planted, d))
        bad[src] = True
    n = len(cls)
    ok = np.ones(n, dtype=bool)
    ok[rng.choice(n, unreadable, replace=False)] = False
    m = MatchScores(
        candidates=np.arange(n)[:, None], global_=np.zeros((n, 1), np.float32), ot=np.zeros((n, 1), np.float32),
        fused=np.zeros((n, 1), np.float32), ok=ok, image_global=image.astype(np.float32),
        caption_global=caption.astype(np.float32), caption_hash=(cls * templates + tpl).astype(np.int64),
    )
    return m, bad


def test_fast_fit_is_registered_off_by_default_and_round_trips() -> None:
    assert DETECTOR_SETTINGS["fast_fit"] is FastFitSettings and REGISTRY["fast_fit"].settings is FastFitSettings
    assert "fast_fit" not in DecisionSettings().detectors
    assert "fast_fit" not in DecisionSettings().weak_model_detectors
    st = from_dict(DecisionSettings, {"detectors": ["fast_fit"], "fast_fit": {"z": 2.5, "max_captions": 8}})
    assert st.fast_fit == FastFitSettings(z=2.5, max_captions=8)
    assert DecisionSettings.from_dict(st.to_dict()) == st
    m, _ = _scores(0, planted=10)
    assert run_detectors(m, st)["fast_fit"].shape == (len(m),)
    # the trainer runs it at its first pass only, by default
    assert "fast_fit" in TrainConfig().first_pass_detectors


def test_fast_fit_flags_planted_fast_learnt_pairs_not_clean_ones() -> None:
    m, bad = _scores(1, planted=25)
    flag = detect_fast_fit(m, FastFitSettings(), DetectorEnv(seed=0))
    assert flag[bad].mean() >= 0.9
    assert flag[~bad].mean() <= 0.01
    # the same data without planted pairs: almost nothing is flagged
    clean, _ = _scores(1, planted=0)
    assert detect_fast_fit(clean, FastFitSettings(), DetectorEnv(seed=0)).mean() <= 0.01


def test_fit_loss_is_the_cross_entropy_over_distinct_captions_and_skips_unreadable_images() -> None:
    m, _ = _scores(2, planted=5, classes=3, templates=2, per_class=20, unreadable=3)
    st = FastFitSettings(temperature=0.1)
    loss = fit_loss(m, st)
    assert np.isnan(loss[~m.ok]).all() and np.isfinite(loss[m.ok]).all()
    img = m.image_global / np.linalg.norm(m.image_global, axis=1, keepdims=True)
    cap = m.caption_global / np.linalg.norm(m.caption_global, axis=1, keepdims=True)
    ok = np.nonzero(m.ok)[0]
    reps = [ok[np.nonzero(m.caption_hash[ok] == h)[0][0]] for h in np.unique(m.caption_hash[ok])]
    i = ok[0]
    logits = img[i] @ cap[reps].T / 0.1
    own = img[i] @ cap[i] / 0.1
    assert np.isclose(loss[i], np.log(np.exp(logits).sum()) - own, rtol=1e-4)
    # a capped caption sample still counts the own caption
    small = fit_loss(m, FastFitSettings(temperature=0.1, max_captions=2))
    assert np.isfinite(small[m.ok]).all() and (small[m.ok] >= -1e-9).all()
