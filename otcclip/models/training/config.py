"""Training configuration and result types (DESIGN 2.4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFENCES: tuple[str, ...] = ("none", "roclip", "safeclip", "otcclip")
#: Reason codes of the engine's score-based decisions (``TrainConfig.score_rematch``).
SCORE_REASONS: tuple[str, ...] = ("low_own_score", "better_caption", "no_plausible_caption")
#: The engine's settings in otcclip's re-matching passes, before ``TrainConfig.sanitize``:
#: only the detectors that act on evidence a model still in training gives (the density
#: and caption-burst detectors flagged mostly clean pairs there; README, defence bench),
#: a lower trigger-sensitivity threshold than a sanitize job's (4), and only inside
#: caption neighbourhoods crowded with trigger-sensitive pairs (100 nearest captions): a
#: model still in training flags ~10 % of clean pairs, spread over all captions, while a
#: backdoor's pairs share their target. Flags on a view whose trigger template was found,
#: on images that do not carry it, are released (``OtcClip``).
TRAINER_SANITIZE: dict[str, Any] = {
    "detectors": ("image_burst", "trigger_sensitivity"),
    "sensitivity_z": 3.0,
    "sensitivity_knn": 100,
    "sensitivity_region_z": 3.0,
}
#: ``(warmup_epochs, rematch_every)`` of each defence when the config leaves them at -1
#: (others: 2, 2). otcclip's first pass already finds every poisoned pair of the
#: benchmark's attacks after one epoch, and it restarts after it; passes every 4 epochs
#: after that (fewer while they change nothing: ``rematch_backoff``) keep the epoch cost
#: under 2x plain CLIP (README, defence benchmark).
DEFAULT_SCHEDULE: dict[str, tuple[int, int]] = {"otcclip": (1, 4)}
#: Shortlist size of the trainer's passes while their score-based proposals are not acted
#: on (``score_rematch`` off): the detectors do not use the OT scores, and the decisions
#: files still name the best of these candidates. The OT scoring of a 32-caption
#: shortlist was a third of a pass's time.
TRAINER_LEAN_K = 8


@dataclass(frozen=True)
class TrainConfig:
    """How to pre-train a CLIP model and with which defence.

    Attributes
    ----------
    model : str
        Shipped preset or open_clip config name (built with ``pretrained=None``).
    defense : {"none", "roclip", "safeclip", "otcclip"}
        ``none`` is plain CLIP; the others are the defences of DESIGN 2.4.
    epochs, batch_size, lr, weight_decay : training schedule (AdamW).
    lr_warmup_steps : int
        Linear learning-rate warm-up before the cosine decay.
    seed : int
        Seeds model init, shuffling, augmentation and every defence step.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    warmup_epochs : int
        Defence warm-up: epochs of plain training before the first re-match / split
        (for ``safeclip``: unimodal warm-up epochs). -1: the defence's default
        (:data:`DEFAULT_SCHEDULE`).
    rematch_every : int
        ``K``: re-match (roclip, otcclip) or re-split (safeclip) every K epochs after
        warm-up. -1: the defence's default.
    rematch_backoff : int
        otcclip: after a pass that changes no pair's verdict (which pairs train, with
        which caption) the interval to the next pass doubles, up to this many times
        ``rematch_every``; a pass that changes any verdict sets it back to
        ``rematch_every``. So passes stay frequent while they find poison and thin out
        while they confirm what earlier ones found. 1: a pass every ``rematch_every``
        epochs.
    lam_inter, lam_intra : float
        Weights of the fine-grained OT losses (``otcclip`` only). In the mean-distance
        form, 0.1 cost the small benchmark model about 4 points of zero-shot accuracy,
        0.02 about one; at 0.02 they also helped erase a backdoor learned in the warm-up
        epochs (README, defence benchmark, three seeds).
    ot_reg, ot_iters : float, int
        Entropic OT regularisation and Sinkhorn iterations for the losses.
    ot_negatives : int
        In-batch negatives of the contrastive form of ``L_inter`` and ``L_intra`` (each
        pair's OT distance against its distances to this many other rows of the batch);
        0 uses the plain mean OT distance.
    ot_temperature : float
        Temperature of that contrastive form (OT distances lie in [0, 2]).
    intra_subsample : float
        Share of each batch (at least the dropped pairs) used for ``L_intra`` (cost control).
    pool_fraction : float
        RoCLIP caption pool size as a share of the dataset (redrawn at every re-match).
    unimodal_temperature : float
        Temperature of the SimCLR-style unimodal losses (safeclip).
    safe_threshold : float
        SafeCLIP: a pair is safe when the GMM posterior of the high-cosine component is at
        least this.
    reassign : {"match", "drop"}
        otcclip: train a pair the engine reassigns on its new caption (``match``, DESIGN
        2.4) or only through ``L_intra`` (``drop``: safer while the model is too weak for
        its re-matches to be right).
    drop_reasons : tuple of str
        otcclip: pairs one of these detectors flags are dropped whatever the engine
        proposes on scores (a burst of one image under many captions is the
        targeted-poisoning signature; any caption it is re-matched to comes from the same
        poisoned neighbourhood); ``trigger_sensitivity`` ones are then re-matched through
        their purified view (``purified_rematch``).
    lam_unlearn : float
        otcclip: weight of the unlikelihood term that pushes quarantined images (image
        bursts, images carrying a found trigger) away from the captions they were poisoned
        with: without ``restart`` it unlearns what the warm-up epochs taught; with it, it
        teaches the model that the trigger does not mean the target (a model trained on
        the clean pairs alone scored up to 30 % blend ASR on one seed, where ``none`` on
        the clean data scored 15 %). 2 with ``fill_batches`` (at 1 the full batches
        outweighed it on that seed; README, defence benchmark); 0 turns it off.
    inoculate : float
        otcclip: share of each batch's clean pairs that get a found trigger template (or
        the trigger residual of a flagged image) stamped on and keep their own caption
        (``OtcClip.inoculate``); 0 (the default) turns it off. A safety net for triggers
        that are detected only in part: with the templates every image of these attacks
        is found and it cost accuracy (README, defence benchmark).
    unlearn_triggered : bool
        otcclip: the unlikelihood term also pushes pairs re-matched through their
        purified view (``purified_rematch``) away from the caption they came with.
    template_search : bool
        otcclip: at each pass look for the one trigger pattern the trigger-sensitivity
        detector's flags share (:mod:`otcclip.models.triggers`) and flag every image that
        carries it (reason ``trigger_template``); inoculation, when on, stamps it.
    template_seed_z : float
        otcclip: trigger-sensitivity z above which a pair seeds the template search.
    template_pool : float
        otcclip: share of the pairs, the most trigger-sensitive on a view, that seed that
        view's template search as well (a model early in training is sensitive to only a
        few of a trigger's images; a few near-copies among the seeds are enough).
    restart : bool
        otcclip: the first ``warmup_epochs`` epochs (plain CLIP) only serve the first pass;
        after it the model, optimiser and schedule start again from their initial state
        and ``epochs`` epochs are trained on what the pass kept, so what the warm-up
        learnt from the poison is discarded instead of unlearnt (the run is
        ``warmup_epochs`` epochs longer; checkpoints are numbered through). False trains
        on from the warm-up model (``epochs`` in all).
    fill_batches : bool
        otcclip: each step's CLIP loss gets as many kept pairs from outside the batch as
        the batch holds dropped ones, so it trains on full batches, as ``none`` does, and
        the same number of pairs per epoch (kept ones seen more often).
    sticky_reasons : tuple of str
        otcclip: a pair dropped with one of these reason codes stays dropped at every later
        re-match (reason ``quarantined``).
    purified_rematch : bool
        otcclip: a pair flagged by ``trigger_sensitivity`` is trained, at this and every
        later re-match, on the caption its purified view (trigger removed) scores best
        with, so the model unlearns the trigger; False (the default) drops it for good
        instead: a re-match by a model still in training is mostly label noise, and with
        the trigger templates a dropped trigger's images are all found.
    purified_keep_top : float
        otcclip: a flagged pair keeps its own caption when that caption ranks in this top
        share of the candidates for the purified view (the content supports it).
    score_rematch : bool
        otcclip: also apply the engine's score-based decisions (reasons ``low_own_score``,
        ``better_caption``, ``no_plausible_caption``) during training. Off by default: on
        a model still being trained they are mostly wrong and cost accuracy (README,
        defence benchmark); the detectors' decisions always apply, and a sanitize job with
        the trained checkpoint applies all of them.
    sanitize : dict
        Overrides of the engine's ``SanitizeConfig`` for the re-matching passes, on top
        of :data:`TRAINER_SANITIZE`.
    max_logit_scale : float
        Clamp of the learnable logit scale (``log`` of 100 by default).
    cache_images_bytes : int
        Decode all images once into a uint8 tensor when they fit in this many bytes.
    checkpoint_every : int
        Write ``checkpoints/epoch_NNN/`` every this many epochs (and always at the end).
    num_threads : int or None
        ``torch.set_num_threads`` for the run (None leaves it alone).
    """

    model: str = "otc-tiny"
    defense: str = "none"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    lr_warmup_steps: int = 50
    seed: int = 0
    device: str = "auto"
    warmup_epochs: int = -1
    rematch_every: int = -1
    rematch_backoff: int = 4
    lam_inter: float = 0.02
    lam_intra: float = 0.02
    ot_reg: float = 0.05
    ot_iters: int = 50
    ot_negatives: int = 0
    ot_temperature: float = 0.1
    intra_subsample: float = 0.125
    pool_fraction: float = 0.2
    unimodal_temperature: float = 0.1
    safe_threshold: float = 0.5
    reassign: str = "match"
    drop_reasons: tuple[str, ...] = ("image_burst", "caption_burst", "trigger_sensitivity")
    lam_unlearn: float = 2.0
    unlearn_triggered: bool = False
    inoculate: float = 0.0
    template_search: bool = True
    template_seed_z: float = 2.0
    template_pool: float = 0.15
    restart: bool = True
    fill_batches: bool = True
    sticky_reasons: tuple[str, ...] = ("image_burst", "trigger_sensitivity")
    purified_rematch: bool = False
    purified_keep_top: float = 0.05
    score_rematch: bool = False
    sanitize: dict[str, Any] = field(default_factory=dict)
    max_logit_scale: float = 4.605170185988092
    cache_images_bytes: int = 4 << 30
    checkpoint_every: int = 1
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.defense not in DEFENCES:
            raise ValueError(f"defense must be one of {', '.join(DEFENCES)}, not {self.defense!r}")
        warmup, every = DEFAULT_SCHEDULE.get(self.defense, (2, 2))
        if self.warmup_epochs == -1:
            object.__setattr__(self, "warmup_epochs", warmup)
        if self.rematch_every == -1:
            object.__setattr__(self, "rematch_every", every)
        for name in ("epochs", "batch_size", "rematch_every", "rematch_backoff", "checkpoint_every", "ot_iters"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.warmup_epochs < 0 or self.lr_warmup_steps < 0:
            raise ValueError("warmup_epochs and lr_warmup_steps must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.reassign not in ("match", "drop"):
            raise ValueError(f"reassign must be 'match' or 'drop', not {self.reassign!r}")
        if not 0.0 < self.pool_fraction <= 1.0:
            raise ValueError(f"pool_fraction must be in (0, 1], got {self.pool_fraction!r}")
        if not 0.0 <= self.inoculate <= 1.0:
            raise ValueError(f"inoculate must be in [0, 1], got {self.inoculate!r}")
        if not 0.0 <= self.template_pool <= 1.0:
            raise ValueError(f"template_pool must be in [0, 1], got {self.template_pool!r}")
        if self.ot_negatives < 0 or self.ot_temperature <= 0:
            raise ValueError("ot_negatives must be >= 0 and ot_temperature > 0")
        if not 0.0 <= self.intra_subsample <= 1.0:
            raise ValueError(f"intra_subsample must be in [0, 1], got {self.intra_subsample!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced.

    Attributes
    ----------
    final_checkpoint : Path
        ``run_dir/final`` (checkpoint format of DESIGN 3).
    metrics_path : Path
        ``run_dir/metrics.jsonl``, one JSON object per epoch.
    epochs_done : int
    """

    final_checkpoint: Path
    metrics_path: Path
    epochs_done: int
