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


def sweep_once(settings: Settings, celery: Any) -> dict[str, int]:
    """One pass: re-send or fail the stale jobs; returns counts ``{"resent", "failed"}``."""
    lease_s = settings.lease_s
    counts = {"resent": 0, "failed": 0}
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
