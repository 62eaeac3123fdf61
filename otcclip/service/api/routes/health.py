"""``/healthz`` (process alive) and ``/readyz`` (database and broker reachable)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
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


@router.get("/readyz")
async def readyz(request: Request) -> Any:
    problems = [p for p in (await run_in_threadpool(_check_db, request.app.state.sessions),
                            await run_in_threadpool(_check_broker, request)) if p]
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    return {"status": "ready"}
