"""Pydantic request/response models of the API and the job settings models.

Job settings mirror the core's frozen config dataclasses (``SanitizeConfig``,
``TrainConfig``) field by field, built on first use (the core imports torch, the API
module must not at import time); unknown keys are refused (422).
"""

from __future__ import annotations

import dataclasses
import typing
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

JobKind = Literal["sanitize", "train", "evaluate"]


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    format: str
    n_rows: int
    columns: list[str]
    sha256: str
    images_sha256: str | None
    size_bytes: int
    created_at: datetime


class Page(BaseModel):
    total: int
    offset: int
    limit: int


class DatasetList(Page):
    items: list[DatasetOut]


class RowsOut(Page):
    columns: list[str]
    rows: list[dict[str, Any]]


class JobCreate(BaseModel):
    """``POST /v1/jobs`` body."""

    model_config = ConfigDict(extra="forbid")

    kind: JobKind
    dataset_id: str
    settings: dict[str, Any] = Field(default_factory=dict)


@overload
def _utc(t: datetime) -> datetime: ...
@overload
def _utc(t: None) -> None: ...
def _utc(t: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


class Progress(BaseModel):
    done: int
    total: int


class JobOut(BaseModel):
    id: str
    kind: str
    dataset_id: str | None
    settings: dict[str, Any]
    state: str
    stage: str | None
    progress: Progress
    attempts: int
    cancel_requested: bool
    error: str | None
    result: dict[str, Any] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, job: Any) -> JobOut:
        return cls(
            id=job.id, kind=job.kind, dataset_id=job.dataset_id, settings=job.settings, state=job.state,
            stage=job.stage, progress=Progress(done=job.progress_done, total=job.progress_total),
            attempts=job.attempts, cancel_requested=job.cancel_requested, error=job.error,
            result=job.result, created_at=_utc(job.created_at), started_at=_utc(job.started_at),
            finished_at=_utc(job.finished_at), updated_at=_utc(job.updated_at),
        )


class JobList(Page):
    items: list[JobOut]


class ArtifactOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    job_id: str | None
    kind: str
    name: str
    media_type: str
    size_bytes: int
    sha256: str
    meta: dict[str, Any]
    created_at: datetime


class MetricOut(BaseModel):
    epoch: int
    loss: float | None
    metrics: dict[str, Any]


# -- job settings -------------------------------------------------------------------------

_STRICT = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def _fields_of(cls: type, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory)
        else:
            default = ...
        out[f.name] = (hints[f.name], default)
    return out


@cache
def settings_model(kind: str) -> type[BaseModel]:
    """The pydantic model validating ``settings`` of a job of ``kind``."""
    if kind == "sanitize":
        from otcclip.models.sanitize import SanitizeConfig

        return create_model(
            "SanitizeSettings", __config__=_STRICT,
            model=(str, "otc-tiny"),
            checkpoint=(str | None, None),
            **_fields_of(SanitizeConfig),
        )
    if kind == "train":
        from otcclip.models.training import TrainConfig

        return create_model("TrainSettings", __config__=_STRICT, **_fields_of(TrainConfig, exclude=("num_threads",)))
    if kind == "evaluate":
        return EvaluateSettings
    raise ValueError(f"unknown job kind {kind!r}")


class EvaluateSettings(BaseModel):
    """Settings of an evaluate job (``otcclip evaluate``): the dataset is the labelled test set.

    ``trigger`` holds the content of ``trigger-*.json`` file(s) written by the poisoner and
    ``targets_csv`` the text of a ``targets.csv`` (no server-side paths).
    """

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    target_class: str | None = None
    trigger: dict[str, Any] | list[dict[str, Any]] | None = None
    targets_csv: str | None = None
    classes: list[str] | None = None
    linear_probe: bool = True
    probe_train_fraction: float = Field(0.5, gt=0, lt=1)
    probe_c: float = Field(1.0, gt=0)
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    device: str = "auto"


class SettingsError(ValueError):
    """Job settings that do not validate; ``errors`` lists ``{"loc", "msg"}`` entries."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"settings.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


def validate_settings(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Validate job ``settings``; returns the keys the user set (JSON-able) or raises :class:`SettingsError`."""
    model = settings_model(kind)
    try:
        obj = model.model_validate(settings)
    except ValidationError as e:
        raise SettingsError([{"loc": list(err["loc"]), "msg": err["msg"]} for err in e.errors()]) from e
    data = obj.model_dump(mode="json", exclude_unset=True)
    core = {"sanitize": ("otcclip.models.sanitize", "SanitizeConfig"), "train": ("otcclip.models.training", "TrainConfig")}.get(kind)
    if core is not None:
        import importlib

        cls = getattr(importlib.import_module(core[0]), core[1])
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            cls(**{k: v for k, v in obj.model_dump().items() if k in names and k in data})
        except (ValueError, TypeError) as e:
            raise SettingsError([{"loc": [], "msg": str(e)}]) from e
    return data
