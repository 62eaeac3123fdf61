"""Settings of the service's jobs: the core's settings plus what a job names (its model,
its checkpoint), validated by the API at submit time and rebuilt by every task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from otcclip.models.config.base import check, setting
from otcclip.models.config.evaluation import EvalSettings
from otcclip.models.config.sanitize import SanitizeConfig, check_device
from otcclip.models.config.training import TrainConfig
from otcclip.models.model_names import validate_model_name


@dataclass(frozen=True)
class SanitizeJobSettings(SanitizeConfig):
    """A sanitize job: the pass's settings and the model that encodes the data."""

    checkpoint: str | None = setting(None, "artifact id or storage path of a checkpoint (a train job's 'checkpoint')")
    model: str = setting("otc-tiny", "model config name used when no checkpoint is given")

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_model_name(self.model)


@dataclass(frozen=True)
class EvaluateJobSettings(EvalSettings):
    """An evaluate job (``otcclip evaluate``); the job's dataset is the labelled test set.

    ``trigger`` holds the content of the ``trigger-*.json`` file(s) the poisoner wrote and
    ``targets_csv`` the text of a ``targets.csv``: no server-side paths.
    """

    checkpoint: str = setting("", "artifact id or storage path of the checkpoint to evaluate")
    trigger: dict[str, Any] | list[dict[str, Any]] | None = setting(None, "trigger-*.json content(s) of a backdoor")
    targets_csv: str | None = setting(None, "text of a targeted attack's targets.csv")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")

    def __post_init__(self) -> None:
        check(self)
        check_device(self.device)
        if not self.checkpoint:
            raise ValueError("checkpoint is required")


#: The settings class of each job kind.
JOB_SETTINGS: dict[str, type] = {
    "sanitize": SanitizeJobSettings,
    "train": TrainConfig,
    "evaluate": EvaluateJobSettings,
}
JOB_KINDS: tuple[str, ...] = tuple(JOB_SETTINGS)


def job_config(kind: str, settings: dict[str, Any] | None) -> Any:
    """The settings object of a job of ``kind`` from its stored ``settings`` (the keys the user set).

    Raises
    ------
    ValueError
        Unknown kind, unknown setting names or values out of bounds.
    """
    from otcclip.models.config.base import from_dict

    if kind not in JOB_SETTINGS:
        raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(JOB_KINDS)}")
    return from_dict(JOB_SETTINGS[kind], settings or {})
