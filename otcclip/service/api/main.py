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


#: Where the Swagger UI assets are served from (the installed ``swagger_ui_bundle`` package).
DOCS_STATIC = "/docs-static"


def as_openapi_30(node: Any) -> Any:
    """The OpenAPI 3.1 document ``node`` in the 3.0 dialect the packaged Swagger UI (4.x) reads:
    ``anyOf: [X, {type: null}]`` becomes ``X`` with ``nullable: true``; the version says 3.0.3."""
    if isinstance(node, list):
        return [as_openapi_30(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_openapi_30(v) for k, v in node.items()}
    if "openapi" in out and isinstance(out["openapi"], str):
        out["openapi"] = "3.0.3"
    variants = out.get("anyOf")
    if isinstance(variants, list) and {"type": "null"} in variants:
        rest = [v for v in variants if v != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1 and isinstance(rest[0], dict):
            out = {**rest[0], **out}
        else:
            out["anyOf"] = rest
        out["nullable"] = True
    return out


def _offline_docs(app: FastAPI) -> None:
    """``GET /docs``: Swagger UI with its JS/CSS served by this app, so it renders without internet.

    The packaged Swagger UI (``swagger_ui_bundle``, 4.x) reads OpenAPI 3.0, so the page loads
    ``/docs/openapi.json``, the same document in that dialect; ``/openapi.json`` stays 3.1.
    """
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_STATIC, StaticFiles(directory=str(swagger_ui_path)), name="docs-static")

    @app.get("/docs/openapi.json", include_in_schema=False)
    async def openapi_30() -> JSONResponse:
        return JSONResponse(as_openapi_30(app.openapi()))

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/docs/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_STATIC}/favicon-32x32.png",
        )


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
        docs_url=None,
        redoc_url=None,  # ReDoc would load its script from a CDN; /docs is served offline
    )
    _offline_docs(app)
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
