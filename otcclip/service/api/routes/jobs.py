"""``/v1/jobs``: create (202 + Location, Idempotency-Key), list, get, cancel, artifacts, report, metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from typing import Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import FileResponse
from sqlalchemy.exc import IntegrityError

from otcclip.service.api.deps import (
    DbDep,
    Offset,
    OwnerDep,
    ShortTransactionRoute,
    StorageDep,
    artifact_out,
)
from otcclip.service.api.errors import error_responses
from otcclip.service.db import crud
from otcclip.service.db.models import Job
from otcclip.service.schemas import (
    ArtifactOut,
    JobCreate,
    JobList,
    JobOut,
    MetricOut,
    SettingsError,
    validate_settings,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], route_class=ShortTransactionRoute)
RETRY_AFTER_S = 2
MAX_ERROR_CHARS = 500
_PATH = re.compile(r"""(?<![\w.])(?:[A-Za-z]:)?(?:[\\/][^\s'"\\/:,;()\[\]{}<>]+){2,}[\\/]?""")


def public_error(error: str | None) -> str | None:
    """What a client sees of a job's stored ``error``: one line, no server paths.

    Workers may store a message followed by a traceback; the client gets the first
    non-empty line with every absolute path cut to its last component (the full text
    stays in the database and the worker's log).
    """
    if not error:
        return error
    line = next((ln.strip() for ln in error.splitlines() if ln.strip()), "")
    if line.startswith("Traceback (most recent call last)"):
        line = next((ln.strip() for ln in reversed(error.splitlines()) if ln.strip()), line)
    line = _PATH.sub(lambda m: re.split(r"[\\/]", m.group(0).rstrip("/\\"))[-1] or "/", line)
    return line[:MAX_ERROR_CHARS]


def job_out(job: Job) -> JobOut:
    """The client's view of ``job`` (:func:`public_error` applied)."""
    out = JobOut.of(job)
    out.error = public_error(out.error)
    return out


def _non_finite(value: Any, loc: list[Any]) -> list[list[Any]]:
    """Locations of NaN / +-Infinity in a parsed JSON value (Python's JSON parser accepts them,
    the databases' JSON columns do not)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [loc]
    if isinstance(value, dict):
        return [bad for k, v in value.items() for bad in _non_finite(v, [*loc, k])]
    if isinstance(value, list):
        return [bad for i, v in enumerate(value) for bad in _non_finite(v, [*loc, i])]
    return []


def _accepted(response: Response, job: Job) -> JobOut:
    response.status_code = status.HTTP_202_ACCEPTED
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return job_out(job)


def _checkpoint_ok(db: Any, owner_id: str, artifact_id: str) -> None:
    art = crud.get_artifact(db, owner_id, artifact_id)
    if art is None or art.kind != "checkpoint":
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            f"settings.checkpoint: {artifact_id!r} is not a checkpoint artifact of this API key")


_ACCEPTED_HEADERS = {"Location": {"description": "The job's URL", "schema": {"type": "string"}},
                     "Retry-After": {"description": "Seconds before the first poll", "schema": {"type": "integer"}}}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={202: {"description": "Queued (or the job of an earlier request with the same Idempotency-Key)",
                              "headers": _ACCEPTED_HEADERS},
                        **error_responses(400, 401, 409, 422, 503)})
def create_job(body: JobCreate, request: Request, response: Response, db: DbDep, owner: OwnerDep,
               idempotency_key: str | None = Header(default=None, max_length=200)) -> Any:
    """Queue a job; with ``Idempotency-Key`` a retried POST returns the same job."""
    bad = _non_finite(body.settings, ["body", "settings"])
    if bad:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {
            "message": f"{'.'.join(map(str, bad[0][1:]))}: NaN and infinities are not numbers JSON can store",
            "errors": [{"loc": loc, "msg": "must be a finite number", "type": "finite_number"} for loc in bad]})
    request_hash = hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()
    if idempotency_key:
        prior = crud.job_by_idempotency(db, owner.id, idempotency_key)
        if prior is not None:
            if prior.request_hash != request_hash:
                raise HTTPException(status.HTTP_409_CONFLICT, "Idempotency-Key was already used with a different request")
            return _accepted(response, prior)
    if crud.get_dataset(db, owner.id, body.dataset_id) is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"dataset_id: dataset {body.dataset_id} not found")
    try:
        settings = validate_settings(body.kind, body.settings)
    except SettingsError as e:
        errs = [{"loc": ["body", "settings", *err["loc"]], "msg": err["msg"], "type": "value_error"} for err in e.errors]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"message": str(e), "errors": errs}) from e
    if settings.get("checkpoint"):
        _checkpoint_ok(db, owner.id, settings["checkpoint"])
    job = Job(owner_id=owner.id, kind=body.kind, dataset_id=body.dataset_id, settings=settings,
              idempotency_key=idempotency_key, request_hash=request_hash, stage="queued")
    db.add(job)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        prior = crud.job_by_idempotency(db, owner.id, idempotency_key or "")
        if prior is None:
            raise
        return _accepted(response, prior)
    from otcclip.service.queue import ENTRY, enqueue

    try:
        enqueue(request.app.state.celery, ENTRY[job.kind], job.id)
    except Exception as e:
        log.exception("could not enqueue job %s", job.id)
        crud.finish(db, job.id, "failed", error=f"broker unreachable: {e}")
        db.commit()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"the job queue is unreachable: {e}") from e
    return _accepted(response, job)


def _get(db: Any, owner_id: str, job_id: str) -> Job:
    job = crud.get_job(db, owner_id, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


@router.get("", response_model=JobList, responses=error_responses(401, 422, 503))
def list_jobs(db: DbDep, owner: OwnerDep, offset: Offset = 0, limit: int = Query(50, ge=1, le=500),
              state: str | None = Query(None, pattern="^(queued|running|succeeded|failed|cancelled)$")) -> Any:
    rows, total = crud.list_jobs(db, owner.id, offset=offset, limit=limit, state=state)
    return JobList(total=total, offset=offset, limit=limit, items=[job_out(j) for j in rows])


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(401, 404, 422, 503))
def get_job(job_id: str, response: Response, db: DbDep, owner: OwnerDep) -> Any:
    job = _get(db, owner.id, job_id)
    if job.state in ("queued", "running"):
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return job_out(job)


@router.post("/{job_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses=error_responses(401, 404, 422, 503))
def cancel_job(job_id: str, db: DbDep, owner: OwnerDep) -> Any:
    """Cooperative cancel: queued jobs stop at once, running ones at their next check."""
    job = _get(db, owner.id, job_id)
    crud.request_cancel(db, job)
    return job_out(job)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactOut], responses=error_responses(401, 404, 422, 503))
def job_artifacts(job_id: str, db: DbDep, owner: OwnerDep) -> Any:
    job = _get(db, owner.id, job_id)
    return [artifact_out(a) for a in crud.job_artifacts(db, job.id)]


_HTML: dict[int | str, dict[str, Any]] = {
    200: {"description": "The job's self-contained ``report.html`` (works offline)", "content": {"text/html": {}}}}


@router.get("/{job_id}/report", response_class=Response,
            responses={**_HTML, **error_responses(401, 404, 409, 410, 422, 503)})
def job_report(job_id: str, db: DbDep, owner: OwnerDep, storage: StorageDep) -> Response:
    """The review report of a sanitize job (``report.html``, also an artifact of the job).

    404 for another key's job or a job kind without a report (train, evaluate); 409 while
    the job has not written its report yet (``Retry-After`` while it runs); 410 when the
    stored file is gone.
    """
    job = _get(db, owner.id, job_id)
    if job.kind != "sanitize":
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} is a {job.kind} job; only sanitize jobs have a report")
    art = next((a for a in crud.job_artifacts(db, job.id) if a.name == "report.html"), None)
    if art is None:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if job.state in ("queued", "running") else None
        raise HTTPException(status.HTTP_409_CONFLICT,
                            f"job {job_id} has no report yet (state {job.state}); a sanitize job writes it when it succeeds",
                            headers=headers)
    path = storage.path(art.path)
    if not path.is_file():
        raise HTTPException(status.HTTP_410_GONE, f"the report of job {job_id} is no longer stored")
    return FileResponse(path, media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"})


@router.get("/{job_id}/metrics", response_model=list[MetricOut], responses=error_responses(401, 404, 422, 503))
def job_metrics(job_id: str, db: DbDep, owner: OwnerDep) -> Any:
    job = _get(db, owner.id, job_id)
    return [MetricOut(epoch=m.epoch, loss=m.loss, metrics=m.metrics) for m in crud.job_metrics(db, job.id)]
