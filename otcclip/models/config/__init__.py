"""Torch-free settings of the core: one frozen dataclass per concern, each setting declared once.

``OTSettings`` (the OT solver), one settings class per detector (:data:`DETECTOR_SETTINGS`)
inside ``DecisionSettings``, ``SanitizeConfig`` (which nests those), ``TrainConfig``
(which nests a ``SanitizeConfig`` for its re-matching passes), ``EvalSettings`` and the
job settings. :func:`from_dict` / :func:`to_dict` convert to and from plain nested dicts.
Importing this package loads only the standard library.
"""

from otcclip.models.config.base import from_dict, leaves, setting, to_dict
from otcclip.models.config.detectors import (
    DETECTOR_SETTINGS,
    DETECTORS,
    CaptionBurstSettings,
    DecisionSettings,
    DensitySettings,
    DuplicatesSettings,
    ImageBurstSettings,
    TriggerSensitivitySettings,
)
from otcclip.models.config.evaluation import ZERO_SHOT_TEMPLATES, EvalSettings
from otcclip.models.config.jobs import (
    JOB_KINDS,
    JOB_SETTINGS,
    EvaluateJobSettings,
    SanitizeJobSettings,
    job_config,
    normalise_job_settings,
)
from otcclip.models.config.ot import OTSettings
from otcclip.models.config.sanitize import IndexSettings, SanitizeConfig, check_device
from otcclip.models.config.training import (
    DEFAULT_SCHEDULE,
    DEFENCES,
    SCORE_REASONS,
    TRAINER_SANITIZE,
    TrainConfig,
)

__all__ = [
    "DEFAULT_SCHEDULE", "DEFENCES", "DETECTORS", "DETECTOR_SETTINGS", "JOB_KINDS", "JOB_SETTINGS", "SCORE_REASONS",
    "TRAINER_SANITIZE", "ZERO_SHOT_TEMPLATES", "CaptionBurstSettings", "DecisionSettings", "DensitySettings",
    "DuplicatesSettings",
    "EvalSettings", "EvaluateJobSettings", "ImageBurstSettings", "IndexSettings", "OTSettings", "SanitizeConfig",
    "SanitizeJobSettings", "TrainConfig", "TriggerSensitivitySettings", "check_device", "from_dict", "job_config",
    "leaves", "normalise_job_settings", "setting", "to_dict",
]
