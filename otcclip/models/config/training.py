"""Settings of CLIP pre-training with a defence (:func:`otcclip.models.training.train`)."""

from __future__ import annotations

from dataclasses import dataclass

from otcclip.models.config.base import Settings, check, setting
from otcclip.models.config.detectors import DETECTORS, DecisionSettings, TriggerSensitivitySettings
from otcclip.models.config.ot import OTSettings
from otcclip.models.config.sanitize import SanitizeConfig, check_device
from otcclip.models.model_names import validate_model_name

#: The training defences (``none`` is plain CLIP).
DEFENCES: tuple[str, ...] = ("none", "roclip", "safeclip", "otcclip")
#: Reason codes of the engine's score-based decisions (``TrainConfig.score_rematch``).
SCORE_REASONS: tuple[str, ...] = ("low_own_score", "better_caption", "no_plausible_caption")
#: ``(warmup_epochs, rematch_every)`` of each defence when the config leaves them at -1 (others: 2, 2).
DEFAULT_SCHEDULE: dict[str, tuple[int, int]] = {"otcclip": (1, 4), "roclip": (1, 2)}
#: The engine's settings in otcclip's re-matching passes. A model still in training gives
#: evidence only to the detectors of image bursts and trigger sensitivity; the latter is
#: tested inside crowded caption neighbourhoods (a backdoor's pairs share a target, a
#: weak model's false alarms are spread over all captions). The decision step judges the
#: model as for a sanitize job (``abstain``): a flag it lacks the evidence for (under a
#: weak model every detector's but ``weak_model_detectors``'; under an ok one without
#: the own caption fitting like a random one) is kept for review, and the trainer drops
#: no pair on it (:func:`~otcclip.models.training.verdicts.apply_policy`); the trigger
#: template search and image bursts still act. The shortlist is short: the score-based
#: proposals it feeds are off by default (``score_rematch``).
TRAINER_SANITIZE = SanitizeConfig(
    k=8,
    decisions=DecisionSettings(
        detectors=("image_burst", "trigger_sensitivity"),
        trigger_sensitivity=TriggerSensitivitySettings(z=3.0, knn=100, region_z=3.0),
    ),
)
#: Reason codes a pass may act on: the detectors, the trigger templates and the score-based ones.
_REASONS = (*DETECTORS, "trigger_template", *SCORE_REASONS)


@dataclass(frozen=True)
class TrainConfig(Settings):
    """How to pre-train a CLIP model and with which defence (DESIGN 2.4, ``docs/method.md``).

    ``warmup_epochs`` and ``rematch_every`` at -1 take the defence's defaults
    (:data:`DEFAULT_SCHEDULE`). Settings named ``otcclip: ...`` act only with that defence.
    """

    model: str = setting("otc-tiny", "shipped preset or open_clip config name (trained from scratch)")
    defence: str = setting("none", "none (plain CLIP), roclip, safeclip or otcclip", choices=DEFENCES,
                           aliases=("defense",))
    epochs: int = setting(10, "training epochs (otcclip adds its warm-up epochs when it restarts)", ge=1, le=10_000)
    batch_size: int = setting(128, "pairs per step", ge=2, le=65_536)
    lr: float = setting(5e-4, "AdamW learning rate", gt=0, le=10)
    weight_decay: float = setting(0.1, "AdamW weight decay (not on gains, biases, logit scale)", ge=0, le=10)
    lr_warmup_steps: int = setting(50, "linear learning-rate warm-up steps before the cosine decay", ge=0)
    seed: int = setting(0, "seeds model init, shuffling, augmentation and every defence step", ge=0, lt=2**32)
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    warmup_epochs: int = setting(-1, "defence warm-up epochs before the first re-match / split (-1: the defence's default)",
                                 ge=-1)
    rematch_every: int = setting(-1, "re-match (roclip, otcclip) or re-split (safeclip) every this many epochs "
                                     "(-1: the defence's default); otcclip runs no later pass with fewer epochs "
                                     "left to train", ge=-1)
    rematch_backoff: int = setting(4, "otcclip: after a pass that changes nothing the interval doubles, up to this "
                                      "many times rematch_every", ge=1)
    lam_inter: float = setting(0.02, "otcclip: weight of the fine-grained OT loss between image and caption", ge=0)
    lam_intra: float = setting(0.02, "otcclip: weight of the OT loss between an image and its augmented view", ge=0)
    ot: OTSettings = setting(OTSettings(iters=50), "otcclip: OT solver of the L_inter / L_intra losses")
    ot_negatives: int = setting(0, "otcclip: in-batch negatives of the contrastive OT losses (0: mean OT distance)", ge=0)
    ot_temperature: float = setting(0.1, "otcclip: temperature of the contrastive OT losses", gt=0)
    intra_subsample: float = setting(0.0625, "otcclip: share of each batch (of batch_size pairs) used for L_intra",
                                     ge=0, le=1)
    dropped_share: float = setting(0.125, "otcclip: dropped pairs a step keeps for L_intra and the unlikelihood term, "
                                           "at most this share of batch_size; the others sit the step out (they come "
                                           "back in later epochs' batches)", ge=0, le=1)
    pool_fraction: float = setting(0.2, "roclip: size of the FIFO caption memory bank as a share of the dataset",
                                   gt=0, le=1)
    unimodal_temperature: float = setting(0.1, "safeclip: temperature of the unimodal losses", gt=0)
    safe_threshold: float = setting(0.5, "safeclip: GMM posterior of the high-cosine component that makes a pair safe",
                                    ge=0, le=1)
    safe_start: float = setting(0.15, "safeclip: share of the data in the safe set at the first split", ge=0, le=1)
    safe_growth: float = setting(0.01, "safeclip: share of the data the safe set grows by each epoch after it", ge=0, le=1)
    reassign: str = setting("match", "otcclip: train a re-assigned pair on its new caption (match) or drop it",
                            choices=("match", "drop"))
    drop_reasons: tuple[str, ...] = setting(("image_burst", "caption_burst", "trigger_sensitivity"),
                                            "otcclip: detectors whose flagged pairs are dropped whatever the scores say",
                                            item_choices=_REASONS)
    lam_unlearn: float = setting(2.0, "otcclip: weight of the unlikelihood term on quarantined pairs (0: off)", ge=0)
    unlearn_triggered: bool = setting(False, "otcclip: the unlikelihood term also covers pairs re-matched through their "
                                             "purified view")
    inoculate: float = setting(0.0, "otcclip: share of clean pairs per batch stamped with a found trigger (0: off)",
                               ge=0, le=1)
    template_search: bool = setting(True, "otcclip: look for the trigger pattern the flagged images share and flag every "
                                          "image that carries it")
    template_seed_z: float = setting(2.0, "otcclip: trigger-sensitivity z above which a pair seeds the template search",
                                     gt=0)
    template_pool: float = setting(0.15, "otcclip: share of the most sensitive pairs per view that also seed it", ge=0, le=1)
    restart: bool = setting(True, "otcclip: after the first pass restart from the initial weights on what it kept, "
                                  "when the pass changed the training data or found a trigger (restart_unchanged: always)")
    restart_unchanged: bool = setting(False, "otcclip: restart also when the first pass dropped and re-matched no pair and "
                                             "found no trigger; "
                                             "off, training then goes on from the warm-up model, whose epochs count "
                                             "towards epochs")
    fill_batches: bool = setting(True, "otcclip: refill a dropped pair's batch slot with a kept pair")
    sticky_reasons: tuple[str, ...] = setting(("image_burst", "trigger_sensitivity"),
                                              "otcclip: pairs dropped for these reasons stay dropped at later passes",
                                              item_choices=_REASONS)
    first_pass_detectors: tuple[str, ...] = setting(("fast_fit",), "otcclip: detectors that run at the first pass only "
                                                    "(they read a model early in its training); the others run at every "
                                                    "pass", item_choices=DETECTORS)
    purified_rematch: bool = setting(False, "otcclip: re-match trigger-flagged pairs through their purified view "
                                            "instead of dropping them")
    purified_keep_top: float = setting(0.05, "otcclip: a flagged pair keeps its caption when it ranks in this top share "
                                             "for the purified view", ge=0, le=1)
    later_purified: bool = setting(True, "otcclip: passes after the first also compute purified views (trigger-"
                                         "sensitivity detector, trigger-template search); off, only the first pass "
                                         "does and its quarantine and templates carry over, which saves about a "
                                         "third of each later pass (purified_rematch with triggered pairs computes "
                                         "them at every pass)")
    score_rematch: bool = setting(False, "otcclip: also apply the engine's score-based re-assignments while training")
    sanitize: SanitizeConfig = setting(TRAINER_SANITIZE, "otcclip: the engine's settings in the re-matching passes "
                                                         "(device and seed follow the run's)")
    max_logit_scale: float = setting(4.605170185988092, "clamp of the learnable log logit scale", gt=0, le=10)
    encode_batch_size: int = setting(128, "images (and captions) per forward when a pass encodes the whole set; a "
                                          "purified-view forward holds half as many images, two views each (on one "
                                          "CPU thread 64-128 cost ~30 % less per image than 256-512)", ge=2, le=65_536)
    cache_images_bytes: int = setting(4 << 30, "decode all images once into memory when they fit in this many bytes",
                                      ge=0)
    checkpoint_every: int = setting(1, "write checkpoints/epoch_NNN every this many epochs (and at the end)", ge=1)
    keep_checkpoints: int = setting(2, "epoch checkpoints kept besides final/, the newest (0: all); resume needs only "
                                    "the newest", ge=0, le=100_000)
    num_threads: int | None = setting(None, "torch.set_num_threads for the run (None: leave it)", ge=1, le=1024)

    def __post_init__(self) -> None:
        check(self)
        check_device(self.device)
        validate_model_name(self.model)
        warmup, every = DEFAULT_SCHEDULE.get(self.defence, (2, 2))
        if self.warmup_epochs == -1:
            object.__setattr__(self, "warmup_epochs", warmup)
        if self.rematch_every == -1:
            object.__setattr__(self, "rematch_every", every)
        if self.rematch_every < 1:
            raise ValueError(f"rematch_every must be >= 1 or -1, got {self.rematch_every!r}")
