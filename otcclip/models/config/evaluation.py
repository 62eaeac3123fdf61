"""Settings of an evaluation (:mod:`otcclip.models.evaluation`)."""

from __future__ import annotations

from dataclasses import dataclass

from otcclip.models.config.base import Settings, check, setting

#: Templates for zero-shot classifiers (a subset, as CLIP's prompt ensembles).
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "an image showing a {}.",
)


@dataclass(frozen=True)
class EvalSettings(Settings):
    """What to measure beyond zero-shot accuracy, and how."""

    target_class: str | None = setting(None, "overrides the backdoor trigger's target class")
    classes: tuple[str, ...] | None = setting(None, "class names for zero-shot (default: the sorted test labels)")
    templates: tuple[str, ...] = setting(ZERO_SHOT_TEMPLATES, "zero-shot prompt templates ({} = class name)")
    linear_probe: bool = setting(True, "also fit a logistic-regression probe on image features")
    probe_train_fraction: float = setting(0.5, "share of the test set that fits the probe", gt=0, lt=1)
    probe_c: float = setting(1.0, "inverse regularisation of the probe", gt=0)
    batch_size: int = setting(256, "images per forward", ge=1, le=65_536)
    seed: int = setting(0, "probe split and trigger placement", ge=0, lt=2**32)

    def __post_init__(self) -> None:
        check(self)
