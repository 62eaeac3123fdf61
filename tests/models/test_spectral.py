"""The trigger-agnostic spectral-signature detector: registered, off by default, and it
finds a poisoned minority that shares one feature direction inside a caption cluster."""

from __future__ import annotations

import numpy as np

from otcclip.models.config.detectors import DETECTOR_SETTINGS, DecisionSettings, SpectralSettings
from otcclip.models.detectors import REGISTRY, DetectorEnv, detect_spectral, run_detectors
from otcclip.models.scores import MatchScores


def _scores(seed: int, *, poison: int, per_class: int = 150, classes: int = 3, d: int = 32) -> tuple[MatchScores, np.ndarray]:
    rng = np.random.default_rng(seed)
    cap_dirs = rng.normal(size=(classes, d))
    img_dirs = rng.normal(size=(classes, d))
    trigger = rng.normal(size=d)
    cls = np.repeat(np.arange(classes), per_class)
    caption = cap_dirs[cls] + 0.1 * rng.normal(size=(len(cls), d))
    image = img_dirs[cls] + rng.normal(size=(len(cls), d))
    # poisoned pairs: images of other classes with the trigger, captioned as class 0
    bad = np.zeros(len(cls), dtype=bool)
    if poison:
        src = rng.choice(np.nonzero(cls != 0)[0], poison, replace=False)
        image[src] += 2.5 * trigger / np.linalg.norm(trigger) * np.sqrt(d) ** 0.5
        caption[src] = cap_dirs[0] + 0.1 * rng.normal(size=(poison, d))
        bad[src] = True
    n = len(cls)
    m = MatchScores(
        candidates=np.arange(n)[:, None], global_=np.zeros((n, 1), np.float32), ot=np.zeros((n, 1), np.float32),
        fused=np.zeros((n, 1), np.float32), ok=np.ones(n, dtype=bool), image_global=image.astype(np.float32),
        caption_global=caption.astype(np.float32), caption_hash=cls.astype(np.int64),
    )
    return m, bad


def test_spectral_is_registered_and_off_by_default() -> None:
    assert DETECTOR_SETTINGS["spectral"] is SpectralSettings and REGISTRY["spectral"].settings is SpectralSettings
    assert "spectral" not in DecisionSettings().detectors
    m, _ = _scores(0, poison=20)
    assert "spectral" not in run_detectors(m, DecisionSettings())
    on = DecisionSettings(detectors=("spectral",))
    assert run_detectors(m, on)["spectral"].shape == (len(m),)


def test_spectral_finds_a_poisoned_minority_that_shares_a_direction() -> None:
    m, bad = _scores(1, poison=25)
    flag = detect_spectral(m, SpectralSettings(group_size=150), DetectorEnv(seed=0))
    recall = flag[bad].mean()
    precision = bad[flag].mean() if flag.any() else 0.0
    assert recall >= 0.8 and precision >= 0.8
    # the same data without poison: almost nothing is flagged
    clean, _ = _scores(1, poison=0)
    assert detect_spectral(clean, SpectralSettings(group_size=150), DetectorEnv(seed=0)).mean() < 0.02
