"""The lease sweeper: recovers jobs whose executions died or whose messages were lost.

Every task execution renews its job's heartbeat (:meth:`otcclip.workers.jobctl.JobContext.hold`).
A queued or running job without a sign of life for ``lease_s`` seconds has lost its
worker (killed, out of memory, partitioned) or its message (a publish that never
landed, a broker that lost its queue). The sweeper re-sends the job's entry task, which
resumes it where it stopped: sanitize re-publishes the unfinished shards of its stage,
training resumes from its last checkpoint. Each re-send backs off exponentially (a job
waiting in a long queue gets at most one duplicate per ``lease_s * 2**n``); a running job
that has used ``max_attempts`` executions is failed instead. Duplicates are harmless:
the consumers are idempotent and hold leases.

Sharded work is recovered shard by shard: an encode or match shard of a running sanitize
job whose execution stopped renewing its shard lease for ``lease_s`` seconds is re-sent on
its own (only that shard's task), while the other shards' executions carry on and their
finished outputs are kept. A shard already started ``max_attempts`` times fails its job
instead, naming the shard. This runs before the job-level pass, and a claimed shard
recovery renews the job's heartbeat, so one lost shard is re-sent once, not twice.

Every worker process runs one in a daemon thread (started on ``worker_ready``), and so
does the embedded runner; concurrent sweepers claim each recovery with a conditional
update, so one of them re-sends it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from otcclip.service.core.config import Settings, get_settings
from otcclip.service.db import crud
from otcclip.service.db.models import Job
from otcclip.service.db.session import session_scope
from otcclip.service.queue import ENTRY, enqueue

log = logging.getLogger(__name__)

#: Cap of the exponent of the re-send backoff (at most ``lease_s * 2**5`` between re-sends).
MAX_BACKOFF_DOUBLINGS = 5


def _exhausted(db: Any, job: Job, max_attempts: int) -> bool:
    """True when the unit the job is stuck on was already started ``max_attempts`` times."""
    if job.state != "running":
        return False
    if job.kind == "sanitize" and job.stage in ("encode", "match", "finalize"):
        return any(s.attempts >= max_attempts for s in crud.shards(db, job.id, job.stage) if s.state != "done")
    return job.attempts >= max_attempts


def sweep_shards(settings: Settings, celery: Any) -> dict[str, int]:
    """Re-send (or fail the job of) each stale shard; returns ``{"shards_resent", "failed"}``."""
    lease_s, limit = settings.lease_s, settings.max_attempts
    counts = {"shards_resent": 0, "failed": 0}
    with session_scope(settings.db_url) as db:
        stale = [(s.job_id, s.kind, s.index, s.attempts) for s in crud.stale_shards(db, lease_s=lease_s)]
    failed: set[str] = set()
    for job_id, kind, index, attempts in stale:
        if job_id in failed:
            continue
        exhausted = attempts >= limit
        with session_scope(settings.db_url) as db:
            if not crud.claim_shard_recovery(db, job_id, kind, index, lease_s=lease_s):
                continue
            if exhausted:
                crud.finish(db, job_id, "failed",
                            error=f"{kind} shard {index}: gave up after {attempts} attempts (the worker was lost each time)")
        if exhausted:
            log.error("job %s: %s shard %d lost its worker %d times; job failed", job_id, kind, index, attempts)
            failed.add(job_id)
            counts["failed"] += 1
            continue
        log.warning("job %s: %s shard %d has no heartbeat for %.0fs; re-sending its task (attempt %d of %d next)",
                    job_id, kind, index, lease_s, attempts + 1, limit)
        try:
            enqueue(celery, f"otcclip.sanitize.{kind}", job_id, index, key=f"{job_id}:{kind}:{index}:recover{attempts}")
        except Exception as e:  # the shard now looks unstarted: the job-level sweep re-sends it with the job
            log.warning("job %s: re-send of %s shard %d failed (%s: %s)", job_id, kind, index, type(e).__name__, e)
            continue
        counts["shards_resent"] += 1
    return counts


def sweep_once(settings: Settings, celery: Any) -> dict[str, int]:
    """One pass: re-send stale shards (:func:`sweep_shards`), then re-send or fail the stale
    jobs; returns counts ``{"shards_resent", "resent", "failed"}``."""
    lease_s = settings.lease_s
    shard_counts = sweep_shards(settings, celery)
    counts = {"shards_resent": shard_counts["shards_resent"], "resent": 0, "failed": shard_counts["failed"]}
    with session_scope(settings.db_url) as db:
        stale = [(j.id, j.kind, j.recoveries, _exhausted(db, j, settings.max_attempts), j.attempts)
                 for j in crud.stale_jobs(db, lease_s=lease_s)]
    for job_id, kind, recoveries, exhausted, attempts in stale:
        wait = lease_s * 2 ** min(recoveries, MAX_BACKOFF_DOUBLINGS)
        with session_scope(settings.db_url) as db:
            if not crud.claim_recovery(db, job_id, recoveries, lease_s=wait):
                continue
            if exhausted:
                crud.finish(db, job_id, "failed",
                            error=f"gave up after {settings.max_attempts} attempts (the worker was lost each time)")
        if exhausted:
            log.error("job %s: lease expired after %d attempts; failed", job_id, attempts)
            counts["failed"] += 1
            continue
        log.warning("job %s: no heartbeat for %.0fs; re-sending its %s task (recovery %d)", job_id, wait, kind, recoveries + 1)
        try:
            enqueue(celery, ENTRY[kind], job_id, key=f"{job_id}:recover{recoveries + 1}")
        except Exception as e:  # the claim moved the heartbeat: the next try comes after the next lease
            log.warning("job %s: re-send failed (%s: %s)", job_id, type(e).__name__, e)
            continue
        counts["resent"] += 1
    return counts


class Sweeper(threading.Thread):
    """A daemon thread running :func:`sweep_once` at once and then every ``sweep_interval_s``."""

    def __init__(self, settings: Settings, celery: Any) -> None:
        super().__init__(name="otcclip-sweeper", daemon=True)
        self.settings = settings
        self.celery = celery
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                sweep_once(self.settings, self.celery)
            except Exception as e:  # the database is down: try again next interval
                log.warning("lease sweep failed (%s: %s)", type(e).__name__, e)
            if self._stop_event.wait(self.settings.sweep_interval_s):
                return

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_event.set()
        self.join(timeout)


def start_sweeper(settings: Settings, celery: Any) -> Sweeper:
    """Start a :class:`Sweeper` thread for ``settings``, publishing with ``celery``."""
    sweeper = Sweeper(settings, celery)
    sweeper.start()
    return sweeper


_WORKER_SWEEPER: Sweeper | None = None


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Each worker's main process sweeps (pool children do not)."""
    global _WORKER_SWEEPER
    if _WORKER_SWEEPER is None and sender is not None:
        _WORKER_SWEEPER = start_sweeper(get_settings(), sender.app)


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    global _WORKER_SWEEPER
    if _WORKER_SWEEPER is not None:
        _WORKER_SWEEPER.stop()
        _WORKER_SWEEPER = None
