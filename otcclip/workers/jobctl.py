"""Job bookkeeping for the tasks: throttled progress and cancel polls, attempt limits,
model and manifest loading in the worker child (never in the parent process)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from otcclip.service.core.config import Settings, get_settings
from otcclip.service.db import crud
from otcclip.service.db.models import Artifact, Dataset, Job
from otcclip.service.db.session import session_scope
from otcclip.service.storage import Storage

log = logging.getLogger(__name__)


class GiveUp(Exception):
    """A task was delivered more often than ``max_attempts`` (the worker kept dying)."""


class JobContext:
    """One task's view of its job: settings, storage, progress and cancel callbacks."""

    def __init__(self, job_id: str, settings: Settings | None = None) -> None:
        self.job_id = job_id
        self.settings = settings or get_settings()
        self.storage = Storage(self.settings.storage_root)
        # -inf: the first write and the first poll go through whatever the clock reads
        self._last_progress = float("-inf")
        self._last_poll = float("-inf")
        self._stopped = False

    def db(self) -> Any:
        return session_scope(self.settings.db_url)

    def job(self) -> Job:
        with self.db() as db:
            job = db.get(Job, self.job_id)
            if job is None:
                raise LookupError(f"job {self.job_id} does not exist")
            db.expunge(job)
            return job

    def dataset(self, job: Job) -> Dataset:
        with self.db() as db:
            ds = db.get(Dataset, job.dataset_id) if job.dataset_id else None
            if ds is None:
                raise LookupError(f"the dataset of job {job.id} was deleted")
            db.expunge(ds)
            return ds

    def job_dir(self) -> Path:
        d = self.storage.job_dir(self.job_id)
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- callbacks into the core ------------------------------------------------------

    def progress(self, stage: str, done: int, total: int, *, force: bool = False) -> None:
        """``ProgressFn``: writes the job row at most every ``progress_interval_s``, and
        always when a stage completes (``done >= total``), so a finished job never shows
        a stage short of its end."""
        now = time.monotonic()
        last = total > 0 and done >= total
        if not (force or last) and now - self._last_progress < self.settings.progress_interval_s:
            return
        self._last_progress = now
        with self.db() as db:
            crud.set_progress(db, self.job_id, stage, int(done), int(total))

    def should_stop(self) -> bool:
        """``StopFn``: polls the job row at most every ``stop_poll_interval_s``."""
        if self._stopped:
            return True
        now = time.monotonic()
        if now - self._last_poll < self.settings.stop_poll_interval_s:
            return False
        self._last_poll = now
        with self.db() as db:
            self._stopped = crud.cancel_requested(db, self.job_id)
        return self._stopped

    # -- state ------------------------------------------------------------------------

    def start(self, stage: str | None = None, *, count_attempt: bool = False) -> bool:
        """Mark running; False when the job is terminal or cancelled. Raises :class:`GiveUp`."""
        with self.db() as db:
            if not crud.mark_running(db, self.job_id, stage=stage):
                return False
            if count_attempt:
                job = db.get(Job, self.job_id)
                assert job is not None
                job.attempts += 1
                if job.attempts > self.settings.max_attempts:
                    raise GiveUp(f"gave up after {job.attempts - 1} attempts (the worker was lost each time)")
        return True

    def count_shard_attempt(self, kind: str, index: int) -> int:
        with self.db() as db:
            shard = crud.get_shard(db, self.job_id, kind, index)
            if shard is None:
                raise LookupError(f"job {self.job_id} has no {kind} shard {index}")
            shard.attempts += 1
            if shard.attempts > self.settings.max_attempts:
                raise GiveUp(f"{kind} shard {index}: gave up after {shard.attempts - 1} attempts (the worker was lost each time)")
            return shard.attempts

    def finish(self, state: str, *, error: str | None = None, result: dict[str, Any] | None = None) -> None:
        with self.db() as db:
            crud.finish(db, self.job_id, state, error=error, result=result)

    def register(self, job: Job, path: Path, *, kind: str, name: str, media_type: str, meta: dict[str, Any] | None = None) -> str:
        """Record a file under storage as an artifact of the job; returns the artifact id."""
        f = self.storage.register_file(path)
        with self.db() as db:
            art = crud.add_artifact(db, owner_id=job.owner_id, job_id=job.id, kind=kind, name=name, path=f.rel,
                                    media_type=media_type, size_bytes=f.size, sha256=f.sha256, meta=meta)
            return art.id


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
        with ctx.db() as db:
            art = crud.get_artifact(db, owner_id, checkpoint)
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
