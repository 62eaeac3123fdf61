"""``/healthz`` (process alive) and ``/readyz`` (database and broker reachable)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from otcclip.service.api.errors import error_body, error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: answered on the event loop, so it never waits behind busy handler threads."""
    return {"status": "ok"}


def _check_db(sessions: Any) -> str | None:
    try:
        with sessions() as db:
            db.execute(text("SELECT 1 FROM alembic_version"))
        return None
    except Exception as e:
        return f"database: {type(e).__name__}: {e}"[:300]


def _check_broker(request: Request) -> str | None:
    try:
        celery = request.app.state.celery
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return None
    except Exception as e:
        return f"broker: {type(e).__name__}: {e}"[:300]


@router.get("/readyz", responses=error_responses(503))
async def readyz(request: Request) -> Any:
    problems = [p for p in (await run_in_threadpool(_check_db, request.app.state.sessions),
                            await run_in_threadpool(_check_broker, request)) if p]
    if problems:
        items = [{"loc": [p.split(":", 1)[0]], "msg": p, "type": "unavailable"} for p in problems]
        return JSONResponse({**error_body("; ".join(problems), items), "status": "unavailable"}, status_code=503,
                            headers={"Retry-After": str(request.app.state.settings.retry_after_s)})
    return {"status": "ready"}
