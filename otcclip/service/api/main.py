"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from otcclip.service.api.routes import artifacts, checkpoints, datasets, health, jobs
from otcclip.service.core.config import Settings, get_settings
from otcclip.service.storage import Storage

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, celery: Any = None) -> FastAPI:
    """The API for ``settings`` (default: from the environment). The schema must exist
    (``otcclip migrate``); ``otcclip serve`` migrates before it starts."""
    from otcclip.service.queue import make_celery

    settings = settings or get_settings()
    app = FastAPI(
        title="otcclip",
        version="0.1.0",
        description="Sanitize image-caption datasets against CLIP poisoning; train robust CLIP models.",
    )
    app.state.settings = settings
    app.state.storage = Storage(settings.storage_root)
    app.state.celery = celery or make_celery(settings)
    for r in (health.router, datasets.router, jobs.router, artifacts.router, checkpoints.router):
        app.include_router(r)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail
        body: dict[str, Any] = {"detail": detail}
        if isinstance(detail, dict) and "message" in detail:
            body["message"] = detail["message"]
        elif isinstance(detail, str):
            body["message"] = detail
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    return app
