"""Settings of the detectors of poisoned pairs and of the decision step.

Each detector is a registered unit that owns its name and its settings
(:data:`DETECTOR_SETTINGS`); the functions that compute its flags are registered under
the same name in :mod:`otcclip.models.detectors`. :class:`DecisionSettings` holds one
settings object per detector, the enabled detectors and the decision thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass

from otcclip.models.config.base import Settings, check, setting


@dataclass(frozen=True)
class ImageBurstSettings(Settings):
    """``image_burst``: one image (near-duplicates) under many distinct captions (targeted poisoning)."""

    dup_threshold: float = setting(0.97, "cosine at or above which two images are near-duplicates", ge=-1, le=1)
    dup_relative: float = setting(0.1, "...and cosine distance at most this share of the median nearest-neighbour distance",
                                  ge=0, le=1)
    burst_min: int = setting(5, "distinct captions on one image (with its near-duplicates) that make a burst", ge=2)
    typical_ratio: float = setting(2.0, "...and more than this many times the data's typical distinct captions per "
                                        "image (median over readable pairs: 1 on single-caption data, where burst_min "
                                        "decides; 5 on COCO-style data, where a burst needs 11)", ge=1)
    knn: int = setting(10, "neighbours searched per image (at least 2 x the burst size)", ge=1, le=1000)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class DensitySettings(Settings):
    """``density``: outliers of the joint image-caption embedding (k-distance)."""

    knn: int = setting(10, "neighbour whose distance measures density", ge=1, le=1000)
    outlier_z: float = setting(4.0, "robust z of the k-distance above which a pair is an outlier", gt=0)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class CaptionBurstSettings(Settings):
    """``caption_burst``: a caption repeated on many images, on an image unlike the others."""

    burst_min: int = setting(5, "images sharing one caption text that form a group", ge=2)
    outlier_z: float = setting(4.0, "robust z below -this of an image's similarity to its group's mean", gt=0)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class TriggerSensitivitySettings(Settings):
    """``trigger_sensitivity``: the own-caption score collapses on a purified view of the image."""

    z: float = setting(4.0, "robust z of the score drop on a purified view that flags a pair", gt=0)
    knn: int = setting(0, "caption neighbours of the crowding test (0: off, flag on z alone)", ge=0, le=10_000)
    enrichment_z: float = setting(3.0, "binomial z of sensitive pairs among the neighbours that makes a crowded region",
                                  gt=0)
    region_z: float = setting(2.0, "inside a crowded region, the drop z that flags a pair", gt=0)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class SpectralSettings(Settings):
    """``spectral``: spectral-signature outliers (Tran et al., NeurIPS 2018) among the images of one caption cluster.

    Trigger-agnostic: whatever a backdoor's trigger looks like, the images it poisoned
    share one direction in the image features that their caption's clean images lack.
    """

    group_size: int = setting(200, "mean pairs per caption cluster (k-means on the own-caption globals)", ge=10)
    min_group: int = setting(20, "clusters with fewer pairs are not tested", ge=3)
    outlier_z: float = setting(4.0, "robust z of the |projection| on a cluster's top singular direction that flags a pair",
                               gt=0)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class CollapseSettings(Settings):
    """``collapse``: images of different content that the model maps abnormally close
    together, under one caption class (a learnt backdoor, whatever its trigger).

    A backdoor teaches the model to send every triggered image, whatever it shows, to one
    place; clean images of different content stay as spread as the data. Tightness is
    measured against the data's own typical k-distance (scale-free), and neighbours that
    show the same content (same pixels, or near-identical content thumbnails: repeated
    photos, the ``duplicates`` check's business) do not count. Needs the content
    thumbnails of the encode stage; without them nothing is flagged.

    ``knn``, ``tight_z`` and ``caption_share`` were chosen on the validation attacks only
    (``bench/detectors.py``, docs/benchmarks.md section 8): the best recall at a raw
    false-flag rate of at most 1 %.
    """

    knn: int = setting(20, "content-distinct image neighbour whose distance measures tightness", ge=1, le=1000)
    search: int = setting(50, "image neighbours searched per pair (same-content ones are skipped; at least knn)",
                          ge=1, le=10_000)
    tight_z: float = setting(2.0, "robust z of the log k-distance below -this that makes a pair abnormally tight", gt=0)
    same_content: float = setting(0.9, "content-thumbnail cosine at or above which two images show the same content",
                                  ge=-1, le=1)
    caption_share: float = setting(0.9, "share of the knn neighbours whose caption is of the pair's caption class",
                                   ge=0, le=1)
    caption_relative: float = setting(0.5, "two captions are of one class when their cosine distance is at most this "
                                           "share of the median distance between random captions (scale-free)",
                                      ge=0, le=1)

    def __post_init__(self) -> None:
        check(self)
        if self.search < self.knn:
            raise ValueError(f"collapse: search ({self.search}) must be at least knn ({self.knn})")


@dataclass(frozen=True)
class FastFitSettings(Settings):
    """``fast_fit``: pairs learnt far faster than the rest (Anti-Backdoor Learning, Li et al.,
    NeurIPS 2021). Early in training a backdoor's pairs reach a much lower loss than any
    clean pair: the trigger is a shortcut. The loss of each pair is its image's cross
    entropy over the set's distinct captions; a pair whose loss lies ``z`` robust std
    below the median is flagged.

    Only meaningful on a model early in its training (the trainer's first pass); a trained
    model fits its clean pairs well too, and a weak one's low-loss tail is clean pairs.
    Off by default. ``z`` was chosen on the validation attacks only (bench/abl_signal.py,
    docs/benchmarks.md section 8.2): the smallest threshold of the grid 2 / 2.5 / 3 / 3.5 /
    4 / 5 that flags at most 1 % of the clean pairs after two warm-up epochs.
    """

    z: float = setting(3.0, "robust z of the pair's loss below -this that flags it", gt=0)
    temperature: float = setting(0.07, "softmax temperature of the loss (CLIP's initial one: the scale of a model "
                                       "early in its training)", gt=0)
    max_captions: int = setting(4096, "distinct captions the loss is taken over (a random sample beyond this; the "
                                      "own caption always counts)", ge=2)

    def __post_init__(self) -> None:
        check(self)


#: What the ``duplicates`` check does with a group: keep its best member, drop every member, or only report it.
DUPLICATE_ACTIONS: tuple[str, ...] = ("keep_one", "drop_all", "keep_all")


@dataclass(frozen=True)
class DuplicatesSettings(Settings):
    """``duplicates``: repeated images (exact: the same decoded pixels; near: image-embedding
    cosine) grouped, each member recording its group, and one action per group.

    Not a poisoning verdict: a dropped member's reason is ``duplicate``, and its other
    detectors' verdicts still stand.
    """

    near_threshold: float = setting(0.97, "image-embedding cosine at or above which two images are near duplicates",
                                    ge=-1, le=1)
    near_relative: float = setting(0.25, "...and cosine distance at most this share of the median distance to the "
                                        "nearest distinct image (scale-free: a collapsed model's embeddings group nothing)",
                                   ge=0, le=1)
    near_thumbnail: float = setting(0.99, "...and content-thumbnail cosine at least this, where the encode stage "
                                          "recorded thumbnails (model-independent: re-encoded, resized or noised "
                                          "copies stay above it, distinct images of one plain subject fall below)",
                                    ge=-1, le=1)
    knn: int = setting(20, "neighbours searched per image for near duplicates", ge=1, le=1000)
    min_size: int = setting(8, "groups showing fewer images are only reported (dup_group) and kept whole; the action "
                               "applies from this size (a burst of copies, not a few near-identical images), counted "
                               "in images: times the data's typical pairs per image (1 on single-caption data; 5 on "
                               "COCO-style data, whose images each carry several correct captions)", ge=2)
    action: str = setting("keep_one", "keep_one: keep the member whose caption agrees best with the image, drop the "
                                      "rest; drop_all: drop every member; keep_all: only report the group",
                          choices=DUPLICATE_ACTIONS)

    def __post_init__(self) -> None:
        check(self)


#: Every detector's settings class, by name, in the order decisions report them.
DETECTOR_SETTINGS: dict[str, type] = {
    "image_burst": ImageBurstSettings,
    "density": DensitySettings,
    "caption_burst": CaptionBurstSettings,
    "trigger_sensitivity": TriggerSensitivitySettings,
    "spectral": SpectralSettings,
    "duplicates": DuplicatesSettings,
    "collapse": CollapseSettings,
    "fast_fit": FastFitSettings,
}
DETECTORS: tuple[str, ...] = tuple(DETECTOR_SETTINGS)
#: The detectors enabled by default. ``spectral`` is left out: on the validation attacks
#: (``bench/detectors.py``, docs/benchmarks.md section 8) none of its settings flags a
#: poisoned pair at a false-flag rate of at most 1 %.
#: ``collapse`` is on: on the validation attacks it adds poisoned pairs to the union of the
#: other defaults' flags (78.8 % -> 92.6 % of them) at 0.2 % added false flags. It is not
#: among ``weak_model_detectors``: under a weak model it added only false drops on the
#: validation attacks and on the demo's digits (docs/method.md section 5).
#: ``fast_fit`` is left out: it reads training dynamics (a model early in its training),
#: not the finished model a sanitize job scores with.
DEFAULT_DETECTORS: tuple[str, ...] = tuple(d for d in DETECTORS if d not in ("spectral", "fast_fit"))


@dataclass(frozen=True)
class DecisionSettings(Settings):
    """Thresholds of the decision step and the detectors it runs (:func:`~otcclip.models.decisions.decide_pairs`)."""

    p_clean_threshold: float = setting(0.5, "GMM posterior of the clean component below which a score is suspicious",
                                       ge=0, le=1)
    margin_z: float = setting(3.0, "re-assign when the best caption beats the own one by this many robust std", ge=0)
    low_margin_z: float = setting(1.0, "...or by this many when the own score is suspicious", ge=0)
    gmm_sample: int = setting(200_000, "own-pair scores sampled to fit the two-component GMM", ge=100)
    abstain: bool = setting(True, "judge the model on this data first and keep for review what it is not sure of "
                                  "(off: act on every proposal)")
    min_control_auc: float = setting(0.8, "a model is weak when a true pair outscores a shuffled-caption pair less often "
                                          "than this (global cosine; nothing score-based is changed then)", ge=0.5, le=1)
    min_control_separation: float = setting(2.0, "...or when the median own and shuffled-caption cosines lie fewer than "
                                                 "this many pooled robust std apart (d')", ge=0)
    min_quality_pairs: int = setting(50, "readable pairs needed to judge the model (fewer: judged weak)", ge=2)
    evidence_z: float = setting(3.0, "with a strong model, re-assign / drop only when the own fused score lies this many "
                                     "robust std below the median own score and the own caption fits no better than a "
                                     "typical random one (control median); a new caption must beat it by as many std and "
                                     "score like a typical pair (else kept for review)", ge=0)
    template_search: bool = setting(True, "with trigger_sensitivity and purified views: look for the trigger pattern the "
                                          "sensitive images share and drop every image that carries it (CLI and job)")
    template_seed_z: float = setting(2.0, "trigger-sensitivity z above which a pair seeds the template search", gt=0)
    template_pool: float = setting(0.15, "share of the most sensitive pairs per purified view that also seed it",
                                   ge=0, le=1)
    template_mismatch_pool: float = setting(0.15, "share of the pairs whose own caption another caption beats most that "
                                                  "also seed it (a model trained without the trigger sees a backdoor's "
                                                  "pairs as mismatched; 0: off)", ge=0, le=1)
    weak_model_detectors: tuple[str, ...] = setting(("image_burst",), "detectors whose flags change pairs on their own, "
                                                    "even when the model is weak (the others' need a strong model's "
                                                    "calibrated score evidence, else are kept for review)",
                                                    item_choices=DETECTORS)
    detectors: tuple[str, ...] = setting(DEFAULT_DETECTORS, "enabled detectors", item_choices=DETECTORS)
    image_burst: ImageBurstSettings = setting(ImageBurstSettings(), "image_burst detector")
    density: DensitySettings = setting(DensitySettings(), "density detector")
    caption_burst: CaptionBurstSettings = setting(CaptionBurstSettings(), "caption_burst detector")
    trigger_sensitivity: TriggerSensitivitySettings = setting(TriggerSensitivitySettings(), "trigger_sensitivity detector")
    spectral: SpectralSettings = setting(SpectralSettings(), "spectral detector (off by default)")
    duplicates: DuplicatesSettings = setting(DuplicatesSettings(), "duplicates check: groups of repeated images")
    collapse: CollapseSettings = setting(CollapseSettings(), "collapse detector: distinct images the model maps "
                                                             "abnormally close, under one caption class")
    fast_fit: FastFitSettings = setting(FastFitSettings(), "fast_fit detector: pairs learnt far faster than the rest "
                                                           "(a model early in training; off by default)")

    def __post_init__(self) -> None:
        check(self)

    def detector(self, name: str) -> object:
        """The settings object of detector ``name``."""
        if name not in DETECTOR_SETTINGS:
            raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
        return getattr(self, name)
