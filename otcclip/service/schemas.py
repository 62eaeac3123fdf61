"""Pydantic request/response models of the API, and the job settings' request schemas
generated from the core's torch-free settings dataclasses (unknown keys: 422)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal, overload

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, create_model

from otcclip.models.config import JOB_SETTINGS, job_config, normalise_job_settings
from otcclip.models.config.base import nested_type
from otcclip.models.progress import stage_unit

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
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "The job's settings that differ from the defaults (`otcclip sanitize|train|evaluate --help` lists "
            "them; unknown keys are a 422). A sanitize job names its model by `checkpoint` (an artifact id), or "
            "by `model` and `pretrained` given either as sibling keys (`\"model\": \"ViT-B-32\", "
            "\"pretrained\": \"openai\"`) or as one object (`\"model\": {\"name\": \"ViT-B-32\", "
            "\"pretrained\": \"openai\"}`); both give the same job settings (stored as the sibling keys)."
        ),
        examples=[{"model": {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, "k": 32},
                  {"model": "ViT-B-32", "pretrained": "openai"},
                  {"checkpoint": "<artifact id>"}],
    )


@overload
def _utc(t: datetime) -> datetime: ...
@overload
def _utc(t: None) -> None: ...
def _utc(t: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


class Progress(BaseModel):
    """Where a job stands in its current stage, with the stage's rate and time left."""

    stage: str | None = Field(description="The current stage (same as the job's ``stage``)")
    done: int = Field(description="Units of the stage done")
    total: int = Field(description="Units of the stage in all (0: not known yet)")
    unit: str = Field(description="What ``done``/``total`` count: pair (ingest, encode, match, decide, finalize; "
                                  "match counts its OT batches as pairs), step (train), image (decode), file (write), "
                                  "it (anything else)")
    rate: float | None = Field(description="Units per second since the stage started, measured up to the last "
                                           "progress write (``updated_at``); null until a unit was done")
    eta_s: float | None = Field(description="Seconds the stage still needs at ``rate`` from ``updated_at``: "
                                            "0 when the stage is complete, null when unknown (no rate or total yet, "
                                            "or the job ended short of it)")


def job_progress(
    stage: str | None, done: int, total: int, *, state: str, started_at: datetime | None, start_done: int,
    measured_at: datetime | None,
) -> Progress:
    """The progress of a job from its row: the rate of the current stage and its ETA.

    ``rate = (done - start_done) / (measured_at - started_at)``: units done since the
    stage's clock started (``started_at``, when ``start_done`` units were already done)
    per second, up to ``measured_at``, the time ``done`` was written. ``eta_s =
    (total - done) / rate``; 0 when ``done >= total > 0``.
    """
    rate: float | None = None
    if started_at is not None and measured_at is not None:
        secs = (_utc(measured_at) - _utc(started_at)).total_seconds()
        if secs > 0 and done > start_done:
            rate = (done - start_done) / secs
    eta: float | None = None
    if total > 0 and done >= total:
        eta = 0.0
    elif rate is not None and total > 0 and state in ("queued", "running"):
        eta = (total - done) / rate
    return Progress(stage=stage, done=done, total=total, unit=stage_unit(stage), rate=rate, eta_s=eta)


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
            stage=job.stage,
            progress=job_progress(job.stage, job.progress_done or 0, job.progress_total or 0, state=job.state,
                                  started_at=job.stage_started_at, start_done=job.stage_start_done or 0,
                                  measured_at=job.updated_at),
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
#
# The request schemas of job settings are generated from the core's settings dataclasses
# (otcclip.models.config: defaults, help and bounds declared once there); the core's own
# checks then run on the validated values. Nothing here imports torch.

_STRICT = ConfigDict(extra="forbid", populate_by_name=True)
_BOUND_KEYS = ("ge", "gt", "le", "lt")
_LITERAL: Any = Literal
_TUPLE: Any = tuple


def _has_float(tp: Any) -> bool:
    return tp is float or any(_has_float(a) for a in typing.get_args(tp))


def _annotation(tp: Any, md: Mapping[str, Any]) -> Any:
    """The pydantic annotation of a leaf setting: choices become a Literal."""
    optional = type(None) in typing.get_args(tp)
    if "choices" in md:
        lit = _LITERAL[tuple(md["choices"])]
        return lit | None if optional else lit
    if "item_choices" in md:
        items = _TUPLE[_LITERAL[tuple(md["item_choices"])], ...]
        return items | None if optional else items
    return tp


@cache
def _pydantic_model(cls: type) -> type[BaseModel]:
    """A pydantic model with ``cls``'s fields, defaults, help, bounds and aliases (nested too)."""
    hints = typing.get_type_hints(cls)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        md = f.metadata
        sub = nested_type(cls, f.name)
        if sub is not None:
            spec[f.name] = (_pydantic_model(sub), Field(default_factory=_pydantic_model(sub), description=md.get("help")))
            continue
        kw: dict[str, Any] = {k: md[k] for k in _BOUND_KEYS if k in md}
        if _has_float(hints[f.name]):
            kw["allow_inf_nan"] = False
        if md.get("aliases"):
            kw["validation_alias"] = AliasChoices(f.name, *md["aliases"])
        default = f.default if f.default is not dataclasses.MISSING else ...
        spec[f.name] = (_annotation(hints[f.name], md), Field(default, description=md.get("help"), **kw))
    return create_model(cls.__name__, __config__=_STRICT, __doc__=(cls.__doc__ or "").strip(), **spec)


def settings_model(kind: str) -> type[BaseModel]:
    """The pydantic model validating ``settings`` of a job of ``kind``."""
    if kind not in JOB_SETTINGS:
        raise ValueError(f"unknown job kind {kind!r}")
    return _pydantic_model(JOB_SETTINGS[kind])


class SettingsError(ValueError):
    """Job settings that do not validate; ``errors`` lists ``{"loc", "msg"}`` entries."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"settings.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


def validate_settings(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Validate job ``settings``; returns the keys the user set (JSON-able) or raises :class:`SettingsError`.

    A sanitize job's ``model`` object (``{"name": ..., "pretrained": ...}``) is first
    spelled as the sibling keys ``model`` and ``pretrained``
    (:func:`otcclip.models.config.normalise_job_settings`), which is what is stored. The
    schema (types, bounds, choices, unknown names) is checked next, then the core's
    settings object is built from the result (:func:`otcclip.models.config.job_config`),
    so a job is accepted only if every task can build its settings.
    """
    model = settings_model(kind)
    try:
        settings = normalise_job_settings(kind, settings)
    except ValueError as e:
        raise SettingsError([{"loc": ["model"], "msg": str(e)}]) from e
    try:
        obj = model.model_validate(settings)
    except ValidationError as e:
        raise SettingsError([{"loc": list(err["loc"]), "msg": err["msg"]} for err in e.errors()]) from e
    data = obj.model_dump(mode="json", exclude_unset=True)
    try:
        job_config(kind, data)
    except ValueError as e:
        raise SettingsError([{"loc": [], "msg": str(e)}]) from e
    return data
