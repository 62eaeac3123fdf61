"""Job bookkeeping for the tasks: leases and their heartbeat, database writes that ride
out an outage, throttled progress and cancel polls, attempt limits, client-safe error
messages, model and manifest loading in the worker child (never in the parent process).

Leases
------
Every task execution holds a lease before it works: the job row's for whole-job stages
(ingest, finalize, train, evaluate), the shard row's for one encode/match shard. A
daemon thread renews it every third of ``lease_s``; a message for work whose lease
another live execution holds is acknowledged and dropped (that execution does the
work, and if it dies the sweeper re-sends that shard, or the job), so no unit of work
runs twice at once. An execution whose renewal finds the lease taken over stops at its next
``should_stop`` poll and writes nothing more.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from otcclip.models.progress import ProgressFn
from otcclip.service.core.config import Settings, get_settings
from otcclip.service.db import crud
from otcclip.service.db.models import Artifact, Dataset, Job
from otcclip.service.db.session import session_scope
from otcclip.service.queue import is_broker_error
from otcclip.service.storage import Storage

log = logging.getLogger(__name__)

T = TypeVar("T")


class GiveUp(Exception):
    """A job or shard was started more often than ``max_attempts`` (the worker kept dying)."""


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` means the database or the broker is unreachable for now.

    Such failures are never turned into a failed job: the write is retried, and past the
    retry budget the job is left to the lease sweeper.
    """
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return is_broker_error(exc)


def retry_transient(fn: Callable[[], T], *, budget_s: float, what: str) -> T:
    """Call ``fn`` until it succeeds, retrying transient errors with exponential backoff
    (0.25 s doubling, at most 5 s apart) for ``budget_s`` seconds; other errors, and the
    last transient one, are raised."""
    deadline = time.monotonic() + budget_s
    delay = 0.25
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_transient(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: unreachable (%s); retrying in %.2fs", what, type(e).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# An absolute POSIX or Windows path, not preceded by a word character (so "1/2" or a
# URL's "//host" are left alone).
_PATH = re.compile(r"(?<![\w./:])(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\"():,;]+)+[/\\]?")


def client_error(exc: BaseException) -> str:
    """The error of a failed job as a client sees it: one line, at most 300 characters,
    absolute paths reduced to their last component (the traceback goes to the log)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    text = _PATH.sub(lambda m: Path(m.group().rstrip("/\\").replace("\\", "/")).name or "<path>", text)
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:299] + "…"


def execution_id() -> str:
    """A lease owner: ``host:pid:nonce`` (unique per task execution)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobContext:
    """One task's view of its job: settings, storage, progress and cancel callbacks."""

    def __init__(self, job_id: str, settings: Settings | None = None) -> None:
        self.job_id = job_id
        self.settings = settings or get_settings()
        self.storage = Storage(self.settings.storage_root)
        self.owner = execution_id()
        #: Set by the heartbeat when another execution took the lease over.
        self.lease_lost = threading.Event()
        # -inf: the first write and the first poll go through whatever the clock reads
        self._last_progress = float("-inf")
        self._last_poll = float("-inf")
        self._last_stage: str | None = None
        self._stopped = False

    def db(self) -> Any:
        return session_scope(self.settings.db_url)

    def run(self, fn: Callable[[Session], T], *, what: str = "database") -> T:
        """``fn(session)`` in one transaction, retried through a database outage for
        ``outage_retry_s`` seconds (``fn`` must be safe to repeat)."""

        def once() -> T:
            with self.db() as db:
                return fn(db)

        return retry_transient(once, budget_s=self.settings.outage_retry_s, what=f"job {self.job_id}: {what}")

    def job(self) -> Job:
        def get(db: Session) -> Job:
            job = db.get(Job, self.job_id)
            if job is None:
                raise LookupError(f"job {self.job_id} does not exist")
            db.expunge(job)
            return job

        return self.run(get)

    def dataset(self, job: Job) -> Dataset:
        def get(db: Session) -> Dataset:
            ds = db.get(Dataset, job.dataset_id) if job.dataset_id else None
            if ds is None:
                raise LookupError(f"the dataset of job {job.id} was deleted")
            db.expunge(ds)
            return ds

        return self.run(get)

    # -- leases -----------------------------------------------------------------------

    @contextmanager
    def hold(self, shard: tuple[str, int] | None = None) -> Iterator[bool]:
        """Hold the job's lease (``shard`` None) or one shard's for the block.

        Yields False, holding nothing, when another live execution holds it or the job
        is finished; True otherwise, with a heartbeat thread renewing the lease until the
        block exits and the lease is released.
        """
        unit = f"{shard[0]}:{shard[1]}" if shard else "job"
        lease_s = self.settings.lease_s
        if shard is None:
            got = self.run(lambda db: crud.acquire_job_lease(db, self.job_id, self.owner, lease_s=lease_s), what="lease")
            held = got == "acquired"
        else:
            kind, index = shard
            held = self.run(lambda db: crud.acquire_shard_lease(db, self.job_id, kind, index, self.owner, lease_s=lease_s),
                            what="lease")
            got = "acquired" if held else "held"
        if not held:
            log.info("job %s %s: %s, nothing to do", self.job_id, unit,
                     "finished" if got == "terminal" else "another live execution holds the lease")
            yield False
            return
        log.info("execution start job=%s unit=%s owner=%s t=%.3f", self.job_id, unit, self.owner, time.time())
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(shard, stop), name=f"lease-{self.job_id[:8]}", daemon=True)
        beat.start()
        try:
            yield True
        finally:
            stop.set()
            beat.join(5)
            if not self.lease_lost.is_set():
                try:
                    if shard is None:
                        self.run(lambda db: crud.release_job_lease(db, self.job_id, self.owner), what="lease release")
                    else:
                        self.run(lambda db: crud.release_shard_lease(db, self.job_id, shard[0], shard[1], self.owner),
                                 what="lease release")
                except Exception as e:  # the lease then simply expires
                    log.warning("job %s %s: could not release the lease (%s)", self.job_id, unit, e)
            log.info("execution end job=%s unit=%s owner=%s t=%.3f", self.job_id, unit, self.owner, time.time())

    def _heartbeat(self, shard: tuple[str, int] | None, stop: threading.Event) -> None:
        """Renew the lease every third of ``lease_s`` until ``stop``; a failed write (the
        database is down) is retried at the next beat, a lease found taken over sets
        :attr:`lease_lost` and ends the thread."""
        interval = self.settings.lease_s / 3
        while not stop.wait(interval):
            try:
                with self.db() as db:
                    if shard is None:
                        ok = crud.renew_job_lease(db, self.job_id, self.owner)
                    else:
                        ok = crud.renew_shard_lease(db, self.job_id, shard[0], shard[1], self.owner)
            except Exception as e:
                log.warning("job %s: lease renewal failed (%s: %s); retrying", self.job_id, type(e).__name__, e)
                continue
            if not ok:
                log.error("job %s: the lease was taken over by another execution; stopping", self.job_id)
                self.lease_lost.set()
                return

    def job_dir(self) -> Path:
        d = self.storage.job_dir(self.job_id)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- callbacks into the core ------------------------------------------------------

    def progress(self, stage: str, done: int, total: int, *, force: bool = False) -> None:
        """``ProgressFn``: writes the job row at most every ``progress_interval_s``, and
        always when a stage starts (its first report: the stage's clock starts then) or
        completes (``done >= total``), so a finished job never shows a stage short of its end."""
        now = time.monotonic()
        edge = stage != self._last_stage or (total > 0 and done >= total)
        if not (force or edge) and now - self._last_progress < self.settings.progress_interval_s:
            return
        self._last_progress = now
        self._last_stage = stage
        self._write_progress(lambda db: crud.set_progress(db, self.job_id, stage, int(done), int(total)))

    def shard_progress(self, kind: str, index: int, size: int) -> ProgressFn:
        """A ``ProgressFn`` for the core's work on one shard of ``size`` rows: each report
        (an encode batch, an OT batch of a match: ``done`` of ``total`` in the core's own
        unit) becomes rows of the shard, written to the shard row and the job's progress
        over the stage at most every ``progress_interval_s`` (the shard's end is written
        when it is recorded done)."""

        def report(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            if now - self._last_progress < self.settings.progress_interval_s or total <= 0:
                return
            self._last_progress = now
            rows = size * min(int(done), int(total)) // int(total)
            self._write_progress(lambda db: crud.set_shard_progress(db, self.job_id, kind, index, self.owner, rows))

        return report

    def _write_progress(self, write: Callable[[Session], None]) -> None:
        try:
            with self.db() as db:
                write(db)
        except Exception as e:  # progress is advisory: work goes on through a database outage
            if not is_transient(e):
                raise
            log.warning("job %s: progress not written (%s)", self.job_id, type(e).__name__)

    def should_stop(self) -> bool:
        """``StopFn``: True once the lease was lost; polls the job row for a cancel request
        at most every ``stop_poll_interval_s`` (through a database outage: not stopping)."""
        if self._stopped or self.lease_lost.is_set():
            return True
        now = time.monotonic()
        if now - self._last_poll < self.settings.stop_poll_interval_s:
            return False
        self._last_poll = now
        try:
            with self.db() as db:
                self._stopped = crud.cancel_requested(db, self.job_id)
        except Exception as e:
            if not is_transient(e):
                raise
            log.warning("job %s: cancel poll failed (%s)", self.job_id, type(e).__name__)
        return self._stopped

    # -- state ------------------------------------------------------------------------

    def start(self, stage: str | None = None, *, count_attempt: bool = False) -> bool:
        """Mark running; False when the job is terminal or cancelled. Raises :class:`GiveUp`."""

        def mark(db: Session) -> bool:
            if not crud.mark_running(db, self.job_id, stage=stage):
                return False
            if count_attempt:
                job = db.get(Job, self.job_id)
                assert job is not None
                job.attempts += 1
                if job.attempts > self.settings.max_attempts:
                    raise GiveUp(f"gave up after {job.attempts - 1} attempts (the worker was lost each time)")
            return True

        return self.run(mark)

    def count_shard_attempt(self, kind: str, index: int) -> int:
        def count(db: Session) -> int:
            shard = crud.get_shard(db, self.job_id, kind, index)
            if shard is None:
                raise LookupError(f"job {self.job_id} has no {kind} shard {index}")
            shard.attempts += 1
            shard.progress_done = 0
            if shard.attempts > self.settings.max_attempts:
                raise GiveUp(f"{kind} shard {index}: gave up after {shard.attempts - 1} attempts (the worker was lost each time)")
            return shard.attempts

        return self.run(count)

    def finish(self, state: str, *, error: str | None = None, result: dict[str, Any] | None = None) -> None:
        """Move the job to a terminal state, unless this execution lost its lease (the
        execution that took it over finishes the job)."""
        if self.lease_lost.is_set():
            log.warning("job %s: not marking %s: the lease was taken over", self.job_id, state)
            return
        self.run(lambda db: crud.finish(db, self.job_id, state, error=error, result=result), what=f"mark {state}")

    def register(self, job: Job, path: Path, *, kind: str, name: str, media_type: str, meta: dict[str, Any] | None = None) -> str:
        """Record a file under storage as an artifact of the job; returns the artifact id."""
        f = self.storage.register_file(path)
        return self.run(lambda db: crud.add_artifact(db, owner_id=job.owner_id, job_id=job.id, kind=kind, name=name, path=f.rel,
                                                     media_type=media_type, size_bytes=f.size, sha256=f.sha256, meta=meta).id)


# -- per-child caches ------------------------------------------------------------------

_BUNDLES: OrderedDict[str, Any] = OrderedDict()
_MAX_BUNDLES = 2


def load_bundle(
    ctx: JobContext, *, owner_id: str, checkpoint: str | None, model: str, seed: int, device: str,
    pretrained: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The model for a job, loaded lazily in this worker child and cached (LRU of 2).

    ``checkpoint`` is an artifact id (a train job's or an uploaded checkpoint); without it
    ``model`` is loaded through open_clip with its ``pretrained`` weights (or an
    ``hf-hub:`` name), or initialised randomly when neither is given.
    """
    from otcclip.models.checkpoint import load_checkpoint
    from otcclip.models.factory import create_model, load_pretrained, resolve_device

    dev = resolve_device(device)
    if checkpoint:
        art = ctx.run(lambda db: crud.get_artifact(db, owner_id, checkpoint))
        if art is None or art.kind != "checkpoint":
            raise LookupError(f"checkpoint artifact {checkpoint} not found")
        ckpt_dir = ctx.storage.path(art.meta["dir"])
        key = f"ckpt:{checkpoint}:{dev}"
        info: dict[str, Any] = {"name": None, "checkpoint": checkpoint}
    elif pretrained or model.startswith("hf-hub:"):
        key = f"pretrained:{model}:{pretrained}:{dev}"
        info = {"name": model, "pretrained": pretrained, "checkpoint": None}
    else:
        key = f"preset:{model}:{seed}:{dev}"
        info = {"name": model, "checkpoint": None, "random_init": True}
    bundle = _BUNDLES.get(key)
    if bundle is None:
        if checkpoint:
            bundle = load_checkpoint(ckpt_dir, device=dev)
        elif info.get("random_init"):
            bundle = create_model(model, device=dev, seed=seed)
        else:
            bundle = load_pretrained(model, pretrained, device=dev)
        _BUNDLES[key] = bundle
        while len(_BUNDLES) > _MAX_BUNDLES:
            _BUNDLES.popitem(last=False)
    _BUNDLES.move_to_end(key)
    info["name"] = info["name"] or getattr(bundle, "name", None)
    info["device"] = str(dev)
    return bundle, info


def open_manifest(ctx: JobContext, ds: Dataset, *, columns: tuple[str, ...] = ("image",)) -> Any:
    from otcclip.service.manifests import open_dataset

    return open_dataset(ctx.settings, ctx.storage.root, ds, columns=columns, check_images=False)


def artifact_path_dir(ctx: JobContext, art: Artifact) -> Path:
    return ctx.storage.path(art.meta["dir"])
