"""Queries and state transitions shared by the API and the workers.

Every state change of a job goes through these functions; the workers never keep
state anywhere but the database.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from otcclip.service.db.models import (
    TERMINAL_STATES,
    ApiKey,
    Artifact,
    Dataset,
    Job,
    JobShard,
    TrainingMetric,
    utcnow,
)

KEY_PREFIX = "otc_"


def hash_key(key: str) -> str:
    """SHA-256 of an API key (keys are 256-bit random, so a plain hash is enough)."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(db: Session, name: str) -> tuple[ApiKey, str]:
    """Create a key named ``name``; returns the row and the plaintext key (shown once)."""
    if not name or not name.strip():
        raise ValueError("key name must not be empty")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(name=name.strip(), prefix=key[:12], key_hash=hash_key(key))
    db.add(row)
    db.flush()
    return row, key


def key_by_plaintext(db: Session, key: str) -> ApiKey | None:
    row = db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None or row.revoked:
        return None
    return row


# -- datasets -----------------------------------------------------------------------------


def get_dataset(db: Session, owner_id: str, dataset_id: str) -> Dataset | None:
    return db.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.owner_id == owner_id))


def list_datasets(db: Session, owner_id: str, *, offset: int, limit: int) -> tuple[Sequence[Dataset], int]:
    q = select(Dataset).where(Dataset.owner_id == owner_id)
    total = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = db.scalars(q.order_by(Dataset.created_at.desc(), Dataset.id).offset(offset).limit(limit)).all()
    return rows, total


# -- jobs ---------------------------------------------------------------------------------


def get_job(db: Session, owner_id: str, job_id: str) -> Job | None:
    return db.scalar(select(Job).where(Job.id == job_id, Job.owner_id == owner_id))


def job_by_idempotency(db: Session, owner_id: str, key: str) -> Job | None:
    return db.scalar(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key))


def list_jobs(db: Session, owner_id: str, *, offset: int, limit: int, state: str | None = None) -> tuple[Sequence[Job], int]:
    q = select(Job).where(Job.owner_id == owner_id)
    if state:
        q = q.where(Job.state == state)
    total = db.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = db.scalars(q.order_by(Job.created_at.desc(), Job.id).offset(offset).limit(limit)).all()
    return rows, total


def request_cancel(db: Session, job: Job) -> Job:
    """Ask a job to stop: queued jobs are cancelled at once, running ones at their next poll."""
    if job.state in TERMINAL_STATES:
        return job
    job.cancel_requested = True
    if job.state == "queued":
        job.state = "cancelled"
        job.finished_at = utcnow()
    job.updated_at = utcnow()
    db.flush()
    return job


def mark_running(db: Session, job_id: str, *, stage: str | None = None) -> bool:
    """queued|running -> running (sets ``started_at`` once); False when the job is terminal."""
    job = db.get(Job, job_id, with_for_update=True)
    if job is None or job.state in TERMINAL_STATES:
        return False
    if job.cancel_requested:
        finish(db, job_id, "cancelled")
        return False
    job.state = "running"
    if job.started_at is None:
        job.started_at = utcnow()
    if stage is not None:
        job.stage = stage
    job.updated_at = utcnow()
    return True


def set_progress(db: Session, job_id: str, stage: str, done: int, total: int) -> None:
    db.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running")
        .values(stage=stage, progress_done=done, progress_total=total, updated_at=utcnow())
    )


def advance_stage(db: Session, job_id: str, from_stage: str, to_stage: str) -> bool:
    """Atomically move ``stage`` from ``from_stage`` to ``to_stage``; True for the one winner."""
    res = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.stage == from_stage, Job.state == "running", Job.cancel_requested.is_(False))
        .values(stage=to_stage, progress_done=0, updated_at=utcnow())
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def finish(db: Session, job_id: str, state: str, *, error: str | None = None, result: dict[str, Any] | None = None) -> None:
    """Move a non-terminal job to a terminal ``state``."""
    values: dict[str, Any] = {"state": state, "finished_at": utcnow(), "updated_at": utcnow()}
    if error is not None:
        values["error"] = error[:4000]
    if result is not None:
        values["result"] = result
    db.execute(update(Job).where(Job.id == job_id, Job.state.not_in(TERMINAL_STATES)).values(**values))


def cancel_requested(db: Session, job_id: str) -> bool:
    row = db.execute(select(Job.cancel_requested, Job.state).where(Job.id == job_id)).one_or_none()
    return row is None or bool(row[0]) or row[1] in TERMINAL_STATES


# -- shards -------------------------------------------------------------------------------


def create_shards(db: Session, job_id: str, kind: str, ranges: Sequence[tuple[int, int]]) -> None:
    """Create the shard rows of ``kind`` once (a redelivered ingest finds them there)."""
    existing = {s.index for s in db.scalars(select(JobShard).where(JobShard.job_id == job_id, JobShard.kind == kind))}
    for i, (a, b) in enumerate(ranges):
        if i not in existing:
            db.add(JobShard(job_id=job_id, kind=kind, index=i, start=a, stop=b))
    db.flush()


def shards(db: Session, job_id: str, kind: str) -> list[JobShard]:
    q = select(JobShard).where(JobShard.job_id == job_id, JobShard.kind == kind).order_by(JobShard.index)
    return list(db.scalars(q))


def get_shard(db: Session, job_id: str, kind: str, index: int) -> JobShard | None:
    return db.scalar(select(JobShard).where(JobShard.job_id == job_id, JobShard.kind == kind, JobShard.index == index))


# -- artifacts and metrics ----------------------------------------------------------------


def get_artifact(db: Session, owner_id: str, artifact_id: str) -> Artifact | None:
    return db.scalar(select(Artifact).where(Artifact.id == artifact_id, Artifact.owner_id == owner_id))


def job_artifacts(db: Session, job_id: str) -> list[Artifact]:
    return list(db.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.created_at, Artifact.name)))


def add_artifact(db: Session, *, owner_id: str, job_id: str, kind: str, name: str, path: str, media_type: str,
                 size_bytes: int, sha256: str, meta: dict[str, Any] | None = None) -> Artifact:
    """Register an artifact once per (job, name); a redelivered task gets the existing row."""
    row = db.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if row is None:
        row = Artifact(owner_id=owner_id, job_id=job_id, kind=kind, name=name)
        db.add(row)
    row.path, row.media_type, row.size_bytes, row.sha256 = path, media_type, size_bytes, sha256
    row.meta = meta or {}
    db.flush()
    return row


def upsert_metric(db: Session, job_id: str, epoch: int, metrics: dict[str, Any]) -> None:
    row = db.scalar(select(TrainingMetric).where(TrainingMetric.job_id == job_id, TrainingMetric.epoch == epoch))
    if row is None:
        row = TrainingMetric(job_id=job_id, epoch=epoch)
        db.add(row)
    loss = metrics.get("loss")
    row.loss = float(loss) if isinstance(loss, int | float) else None
    row.metrics = metrics
    db.flush()


def job_metrics(db: Session, job_id: str) -> list[TrainingMetric]:
    return list(db.scalars(select(TrainingMetric).where(TrainingMetric.job_id == job_id).order_by(TrainingMetric.epoch)))
