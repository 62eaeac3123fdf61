"""Load shedding: bounded requests in flight, bounded concurrent uploads, sized thread pool.

The API's blocking work (database, archive checks) runs in AnyIO's worker threads; the
database pool has as many connections as there are threads (``Settings.api_threads``),
so a handler never queues for a connection. What does not fit is refused early with 503
and ``Retry-After`` instead of queueing without bound:

* :class:`LoadShedding` (ASGI middleware) answers 503 once ``max_inflight_requests``
  HTTP requests are in progress, and sets the worker-thread limit of the running event
  loop (the limiter belongs to the loop, so it is set from a request).
* :func:`upload_slot` admits ``max_concurrent_uploads`` uploads at once, before their
  body is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import HTTPException, Request, status

log = logging.getLogger(__name__)


#: Probes an orchestrator must always get an answer from.
EXEMPT = frozenset({"/healthz", "/readyz"})


class LoadShedding:
    """ASGI middleware: at most ``max_inflight`` HTTP requests at once, else 503
    (the health probes in :data:`EXEMPT` are always let through).

    Parameters
    ----------
    app : ASGI app
    max_inflight : int
        Requests in progress before new ones are refused.
    threads : int
        Total tokens of AnyIO's default thread limiter (FastAPI runs ``def`` handlers and
        dependencies there).
    retry_after : int
        ``Retry-After`` seconds of the 503.
    """

    def __init__(self, app: Any, *, max_inflight: int, threads: int, retry_after: int) -> None:
        self.app = app
        self.max_inflight = max_inflight
        self.threads = threads
        self.retry_after = retry_after
        self.inflight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limiter = anyio.to_thread.current_default_thread_limiter()  # one per event loop
        if limiter.total_tokens != self.threads:
            limiter.total_tokens = self.threads
        if self.inflight >= self.max_inflight and scope.get("path") not in EXEMPT:
            log.warning("shedding %s %s: %d requests in flight", scope.get("method"), scope.get("path"), self.inflight)
            await _send_503(send, "the service is overloaded (too many requests in flight); retry later", self.retry_after)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


async def _send_503(send: Any, message: str, retry_after: int) -> None:
    body = json.dumps({"message": message, "detail": [{"loc": [], "msg": message, "type": "unavailable"}]}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
    ]})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def upload_slot(request: Request) -> AsyncIterator[None]:
    """Hold one of the app's ``max_concurrent_uploads`` slots, waiting up to
    ``upload_queue_wait_s`` for one (before the body is read), else raise 503.

    A burst of uploads a little above the cap queues instead of failing; a sustained
    overload is shed. The count lives on ``app.state`` and is only touched from the event
    loop, so no lock is needed.
    """
    state = request.app.state
    cap = state.settings.max_concurrent_uploads
    deadline = time.monotonic() + state.settings.upload_queue_wait_s
    while getattr(state, "uploads_active", 0) >= cap:
        if time.monotonic() >= deadline:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                f"{cap} uploads are already in progress; retry later",
                                headers={"Retry-After": str(state.settings.retry_after_s)})
        await asyncio.sleep(0.05)
    state.uploads_active = getattr(state, "uploads_active", 0) + 1
    try:
        yield
    finally:
        state.uploads_active -= 1
