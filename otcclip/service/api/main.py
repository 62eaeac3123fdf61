"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

from otcclip.service.api import errors
from otcclip.service.api.overload import LoadShedding
from otcclip.service.api.routes import artifacts, checkpoints, datasets, health, jobs
from otcclip.service.core.config import Settings, get_settings
from otcclip.service.db.session import session_factory
from otcclip.service.storage import Storage

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, celery: Any = None) -> FastAPI:
    """The API for ``settings`` (default: from the environment). The schema must exist
    (``otcclip migrate``); ``otcclip serve`` migrates before it starts.

    Creating the app removes upload staging folders older than
    ``settings.orphan_upload_grace_s`` (left by an API killed mid-upload).
    """
    from otcclip.service.queue import make_celery

    settings = settings or get_settings()
    app = FastAPI(
        title="otcclip",
        version="0.1.0",
        description="Sanitize image-caption datasets against CLIP poisoning; train robust CLIP models.",
    )
    app.state.settings = settings
    app.state.storage = Storage(settings.storage_root)
    app.state.sessions = session_factory(settings.db_url, pool_size=settings.api_threads,
                                         pool_timeout=settings.db_pool_timeout_s)
    app.state.celery = celery or make_celery(settings)
    app.state.uploads_active = 0
    removed = app.state.storage.clean_staging(older_than_s=settings.orphan_upload_grace_s)
    if removed:
        log.info("removed %d orphaned upload folder(s)", removed)
    for r in (health.router, datasets.router, jobs.router, artifacts.router, checkpoints.router):
        app.include_router(r)
    errors.install(app, retry_after=settings.retry_after_s)
    app.add_middleware(LoadShedding, max_inflight=settings.max_inflight_requests, threads=settings.api_threads,  # type: ignore[arg-type]
                       retry_after=settings.retry_after_s)
    return app
