"""Queries and state transitions shared by the API and the workers.

Every state change of a job goes through these functions; the workers never keep
state anywhere but the database.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import case, func, or_, select, update
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


def dataset_by_idempotency(db: Session, owner_id: str, key: str) -> Dataset | None:
    return db.scalar(select(Dataset).where(Dataset.owner_id == owner_id, Dataset.idempotency_key == key))


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
    if stage is not None:  # a whole-job execution starts: its stage's clock starts now
        job.stage = stage
        job.stage_started_at = utcnow()
        job.stage_start_done = job.progress_done or 0
    job.updated_at = utcnow()
    return True


def set_progress(db: Session, job_id: str, stage: str, done: int, total: int) -> None:
    """Write a running job's progress; a new ``stage`` (or ``done`` going back, a restart)
    restarts the stage's clock (``stage_started_at``, ``stage_start_done``) in the same UPDATE."""
    now = utcnow()
    restart = or_(Job.stage.is_(None), Job.stage != stage, Job.progress_done > done, Job.stage_started_at.is_(None))
    db.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running")
        .values(stage=stage, progress_done=done, progress_total=total, updated_at=now,
                stage_started_at=case((restart, now), else_=Job.stage_started_at),
                stage_start_done=case((restart, done), else_=Job.stage_start_done))
    )


def advance_stage(db: Session, job_id: str, from_stage: str, to_stage: str) -> bool:
    """Atomically move ``stage`` from ``from_stage`` to ``to_stage``; True for the one winner."""
    now = utcnow()
    res = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.stage == from_stage, Job.state == "running", Job.cancel_requested.is_(False))
        .values(stage=to_stage, progress_done=0, updated_at=now, stage_started_at=now, stage_start_done=0)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def finish(db: Session, job_id: str, state: str, *, error: str | None = None, result: dict[str, Any] | None = None) -> None:
    """Move a non-terminal job to a terminal ``state`` (and drop its lease)."""
    values: dict[str, Any] = {"state": state, "finished_at": utcnow(), "updated_at": utcnow(), "lease_owner": None}
    if error is not None:
        values["error"] = error[:4000]
    if result is not None:
        values["result"] = result
    db.execute(update(Job).where(Job.id == job_id, Job.state.not_in(TERMINAL_STATES)).values(**values))


def cancel_requested(db: Session, job_id: str) -> bool:
    row = db.execute(select(Job.cancel_requested, Job.state).where(Job.id == job_id)).one_or_none()
    return row is None or bool(row[0]) or row[1] in TERMINAL_STATES


# -- leases -------------------------------------------------------------------------------
#
# A lease is an owner (one task execution, ``host:pid:nonce``) and a heartbeat timestamp.
# It is taken with one conditional UPDATE (free, already ours, or expired), so of two
# executions racing for it exactly one wins on SQLite and PostgreSQL alike; renewals and
# releases are conditional on the owner, so an execution whose lease was taken over
# notices it at its next renewal. Timestamps come from the workers' clocks (kept in sync).

LeaseResult = Literal["acquired", "held", "terminal"]


def _expired(lease_s: float) -> Any:
    return utcnow() - timedelta(seconds=lease_s)


def acquire_job_lease(db: Session, job_id: str, owner: str, *, lease_s: float) -> LeaseResult:
    """Take the job's lease for ``owner``.

    Returns ``"acquired"`` (the recovery count restarts), ``"held"`` when another execution
    renewed it within ``lease_s`` seconds, or ``"terminal"`` when the job is finished,
    cancelled (a pending cancel request is applied) or gone.
    """
    res = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.not_in(TERMINAL_STATES), Job.cancel_requested.is_(False),
               or_(Job.lease_owner.is_(None), Job.lease_owner == owner, Job.heartbeat_at.is_(None),
                   Job.heartbeat_at < _expired(lease_s)))
        .values(lease_owner=owner, heartbeat_at=utcnow(), recoveries=0)
    )
    if res.rowcount:  # type: ignore[attr-defined]
        return "acquired"
    row = db.execute(select(Job.state, Job.cancel_requested).where(Job.id == job_id)).one_or_none()
    if row is None or row[0] in TERMINAL_STATES:
        return "terminal"
    if row[1]:
        finish(db, job_id, "cancelled")
        return "terminal"
    return "held"


def renew_job_lease(db: Session, job_id: str, owner: str) -> bool:
    """Heartbeat of ``owner``'s lease; False when the lease is no longer ``owner``'s."""
    res = db.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner).values(heartbeat_at=utcnow()))
    return bool(res.rowcount)  # type: ignore[attr-defined]


def release_job_lease(db: Session, job_id: str, owner: str) -> None:
    """Give the lease up (the heartbeat stays: the sweeper waits a full lease before acting)."""
    db.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner).values(lease_owner=None, heartbeat_at=utcnow()))


def acquire_shard_lease(db: Session, job_id: str, kind: str, index: int, owner: str, *, lease_s: float) -> bool:
    """Take the lease of one shard for ``owner``; False while another execution holds it."""
    res = db.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.kind == kind, JobShard.index == index,
               or_(JobShard.lease_owner.is_(None), JobShard.lease_owner == owner, JobShard.heartbeat_at.is_(None),
                   JobShard.heartbeat_at < _expired(lease_s)))
        .values(lease_owner=owner, heartbeat_at=utcnow())
    )
    if res.rowcount:  # type: ignore[attr-defined]
        db.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow(), recoveries=0))
        return True
    return False


def renew_shard_lease(db: Session, job_id: str, kind: str, index: int, owner: str) -> bool:
    """Heartbeat of a shard lease (and of its job); False when the lease was taken over."""
    res = db.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.kind == kind, JobShard.index == index, JobShard.lease_owner == owner)
        .values(heartbeat_at=utcnow())
    )
    if not res.rowcount:  # type: ignore[attr-defined]
        return False
    db.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow()))
    return True


def release_shard_lease(db: Session, job_id: str, kind: str, index: int, owner: str) -> None:
    db.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.kind == kind, JobShard.index == index, JobShard.lease_owner == owner)
        .values(lease_owner=None)
    )


def complete_shard(db: Session, job_id: str, kind: str, index: int, owner: str, path: str) -> bool:
    """Mark ``owner``'s shard done with its output ``path`` (the lease stays until the
    execution ends); False when the lease was taken over (the other execution records it)."""
    res = db.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.kind == kind, JobShard.index == index, JobShard.lease_owner == owner)
        .values(state="done", path=path, updated_at=utcnow())
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def stale_jobs(db: Session, *, lease_s: float) -> list[Job]:
    """Queued or running jobs with no sign of life for ``lease_s`` seconds (sweeper candidates)."""
    last = func.coalesce(Job.heartbeat_at, Job.updated_at)
    q = select(Job).where(Job.state.in_(("queued", "running")), last < _expired(lease_s)).order_by(Job.created_at)
    return list(db.scalars(q))


def claim_recovery(db: Session, job_id: str, recoveries: int, *, lease_s: float) -> bool:
    """Claim the recovery of a stale job for one sweeper: bumps the heartbeat and the
    recovery count if the job is still stale and nobody claimed it since it was read."""
    last = func.coalesce(Job.heartbeat_at, Job.updated_at)
    res = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(("queued", "running")), Job.recoveries == recoveries,
               last < _expired(lease_s))
        .values(heartbeat_at=utcnow(), recoveries=recoveries + 1, lease_owner=None)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


#: Shard kinds whose executions hold shard leases (finalize runs under the job's lease).
LEASED_SHARDS = ("encode", "match")


def stale_shards(db: Session, *, lease_s: float) -> list[JobShard]:
    """Unfinished encode/match shards of the current stage of running sanitize jobs that an
    execution started (a heartbeat was set) and nobody renewed for ``lease_s`` seconds: the
    execution died, or gave up through an outage. Shards never started are not included
    (their message may still be queued; a lost one is the job-level sweep's)."""
    q = (
        select(JobShard)
        .join(Job, Job.id == JobShard.job_id)
        .where(Job.state == "running", Job.kind == "sanitize", Job.stage == JobShard.kind,
               JobShard.kind.in_(LEASED_SHARDS), JobShard.state != "done",
               JobShard.heartbeat_at.is_not(None), JobShard.heartbeat_at < _expired(lease_s))
        .order_by(JobShard.job_id, JobShard.kind, JobShard.index)
    )
    return list(db.scalars(q))


def claim_shard_recovery(db: Session, job_id: str, kind: str, index: int, *, lease_s: float) -> bool:
    """Claim the recovery of a stale shard for one sweeper: clears its lease and heartbeat
    (the shard looks unstarted until the re-sent task takes it, so it is re-sent once, not
    every lease) and renews the job's heartbeat (a recovery is under way), if the shard is
    still stale and unfinished."""
    res = db.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.kind == kind, JobShard.index == index, JobShard.state != "done",
               JobShard.heartbeat_at < _expired(lease_s))
        .values(lease_owner=None, heartbeat_at=None)
    )
    if not res.rowcount:  # type: ignore[attr-defined]
        return False
    db.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow()))
    return True


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


def set_shard_progress(db: Session, job_id: str, kind: str, index: int, owner: str, done: int) -> None:
    """Record ``done`` rows of ``owner``'s running shard and the job's progress over the stage."""
    db.execute(
        update(JobShard)
        .where(JobShard.job_id == job_id, JobShard.kind == kind, JobShard.index == index, JobShard.lease_owner == owner,
               JobShard.state != "done")
        .values(progress_done=done)
    )
    stage_progress(db, job_id, kind)


def stage_progress(db: Session, job_id: str, kind: str) -> bool:
    """Write the job's progress over its shards of ``kind`` while its stage is ``kind``:
    finished shards count whole, running ones by their ``progress_done``; True when every
    shard of ``kind`` is done."""
    rows = shards(db, job_id, kind)
    done = sum(s.stop - s.start if s.state == "done" else min(s.progress_done or 0, s.stop - s.start) for s in rows)
    db.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == "running", Job.stage == kind)
        .values(progress_done=done, progress_total=rows[-1].stop if rows else 0, updated_at=utcnow())
    )
    return bool(rows) and all(s.state == "done" for s in rows)


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
