"""Settings of the service's jobs: the core's settings plus what a job names (its model,
its checkpoint), validated by the API at submit time and rebuilt by every task."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otcclip.models.config.base import check, setting
from otcclip.models.config.evaluation import EvalSettings
from otcclip.models.config.sanitize import SanitizeConfig, check_device
from otcclip.models.config.training import TrainConfig
from otcclip.models.model_names import validate_model_name

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class SanitizeJobSettings(SanitizeConfig):
    """A sanitize job: the pass's settings and the model that encodes the data.

    The API also takes the model as one object, ``"model": {"name": ..., "pretrained":
    ...}`` (:func:`normalise_job_settings` turns it into ``model`` and ``pretrained``).
    """

    checkpoint: str | None = setting(None, "artifact id of a checkpoint (a train job's, or one uploaded to /v1/checkpoints)")
    model: str = setting("otc-tiny", "open_clip model name used when no checkpoint is given (or hf-hub:org/repo)")
    pretrained: str | None = setting(None, "pretrained tag of the model (laion2b_s34b_b79k, openai, ...)")
    random_init: bool = setting(False, "encode with randomly initialised weights (tests and throughput runs only)")

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_model_name(self.model)
        if self.pretrained is not None and not _TAG.match(self.pretrained):
            raise ValueError(f"pretrained must be a tag of the model (letters, digits, '_', '-', '.'), got {self.pretrained!r}")
        if self.checkpoint and (self.pretrained or self.random_init):
            raise ValueError("give either checkpoint, or model with pretrained (or random_init), not both")
        if not (self.checkpoint or self.pretrained or self.model.startswith("hf-hub:") or self.random_init):
            raise ValueError(
                "a sanitize job needs a model with weights: checkpoint (a train job's or an uploaded one), "
                "model with pretrained (a tag such as laion2b_s34b_b79k), or an hf-hub: model"
            )


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


#: Keys of a sanitize job's ``model`` given as an object, and the sibling setting each becomes.
MODEL_OBJECT_KEYS: dict[str, str] = {"name": "model", "pretrained": "pretrained"}


def normalise_job_settings(kind: str, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``settings`` with a sanitize job's ``model`` object spelled as the sibling keys.

    A sanitize job names its model either as ``{"model": "ViT-B-32", "pretrained":
    "openai"}`` or as ``{"model": {"name": "ViT-B-32", "pretrained": "openai"}}``; the
    object form becomes the sibling form here, before any validation, so both give the
    same settings (and the same errors for unknown names or missing weights). Other kinds
    and the sibling form pass through unchanged (a copy).

    Raises
    ------
    ValueError
        An object without ``name``, with keys other than ``name`` / ``pretrained``, or a
        ``pretrained`` both inside the object and beside it.
    """
    out = dict(settings or {})
    model = out.get("model")
    if kind != "sanitize" or not isinstance(model, Mapping):
        return out
    unknown = sorted(set(model) - set(MODEL_OBJECT_KEYS))
    if unknown:
        raise ValueError(f"model: unknown keys {unknown}; a model object has {', '.join(MODEL_OBJECT_KEYS)}")
    if "name" not in model:
        raise ValueError("model: a model object needs a name (an open_clip model name or hf-hub:org/repo)")
    if "pretrained" in model and "pretrained" in out:
        raise ValueError("pretrained given both inside the model object and beside it")
    del out["model"]
    for key, target in MODEL_OBJECT_KEYS.items():
        if key in model:
            out[target] = model[key]
    return out


def job_config(kind: str, settings: Mapping[str, Any] | None) -> Any:
    """The settings object of a job of ``kind`` from its ``settings`` (the keys the user set;
    a sanitize job's ``model`` object is accepted, :func:`normalise_job_settings`).

    Raises
    ------
    ValueError
        Unknown kind, unknown setting names or values out of bounds.
    """
    from otcclip.models.config.base import from_dict

    if kind not in JOB_SETTINGS:
        raise ValueError(f"unknown job kind {kind!r}; known: {', '.join(JOB_KINDS)}")
    return from_dict(JOB_SETTINGS[kind], normalise_job_settings(kind, settings))
