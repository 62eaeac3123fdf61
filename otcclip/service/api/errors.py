"""One error model for every non-2xx answer of the API, and the handlers that produce it.

Every error body is ``{"message": str, "detail": [{"loc", "msg", "type", ...}]}``: ``message``
is one human-readable line, ``detail`` the list the OpenAPI document promises (the same
shape as FastAPI's request validation errors, so a 422 looks the same whether FastAPI or a
handler raised it). Overload (a full database pool, a locked or unreachable database, too
many uploads or requests in flight) is answered 503 with ``Retry-After``, never 500.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class ErrorItem(BaseModel):
    """One problem: where (``loc``), what (``msg``) and its kind (``type``).

    Upload errors add ``file`` (the client's file name) and ``row`` (0-based manifest row).
    """

    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    """The body of every error response."""

    message: str
    detail: list[ErrorItem]


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}
_DESCRIPTIONS = {
    400: "The body could not be parsed",
    401: "Missing or unknown API key",
    404: "Not found (or owned by another API key)",
    409: "Conflict",
    410: "Gone",
    413: "Request too large",
    415: "Unsupported media type",
    416: "Range not satisfiable",
    422: "Validation error",
    503: "Overloaded or a dependency is unavailable; retry after ``Retry-After`` seconds",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for ``codes``, all with the :class:`ErrorOut` model."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorOut, "description": _DESCRIPTIONS[code]}
        if code == 503:
            entry["headers"] = _RETRY_AFTER
        out[code] = entry
    return out


def error_body(message: str, detail: list[dict[str, Any]] | None = None, *, kind: str = "error") -> dict[str, Any]:
    """An :class:`ErrorOut` body; without ``detail`` the message is its single item."""
    return {"message": message, "detail": detail if detail is not None else [{"loc": [], "msg": message, "type": kind}]}


def unavailable(message: str, *, retry_after: int) -> JSONResponse:
    """A 503 with ``Retry-After`` and the error model."""
    return JSONResponse(error_body(message, kind="unavailable"), status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                        headers={"Retry-After": str(retry_after)})


def _items(detail: Any) -> tuple[str, list[dict[str, Any]]]:
    """Normalise an ``HTTPException.detail`` (str, dict with ``message``, list) to (message, items)."""
    if isinstance(detail, list):
        items = [d if isinstance(d, dict) else {"loc": [], "msg": str(d), "type": "error"} for d in detail]
        return "; ".join(str(i.get("msg", "")) for i in items) or "error", items
    if isinstance(detail, dict):
        message = str(detail.get("message", detail))
        errors = detail.get("errors")
        extra = {k: v for k, v in detail.items() if k not in ("message", "errors") and v is not None}
        if errors:
            items = [{"loc": list(e.get("loc", [])), "msg": str(e.get("msg", "")), "type": str(e.get("type", "value_error")),
                      **extra} for e in errors]
        else:
            items = [{"loc": [], "msg": message, "type": "value_error", **extra}]
        return message, items
    message = str(detail)
    return message, [{"loc": [], "msg": message, "type": "error"}]


def _validation_items(errors: Any) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        out.append({"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                    "type": str(e.get("type", "value_error"))})
    return out


_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 409: "conflict", 410: "gone", 413: "too_large",
          415: "unsupported_media_type", 416: "range_not_satisfiable", 503: "unavailable"}

_LOCKED = re.compile(r"database is locked|database table is locked", re.I)


def install(app: FastAPI, *, retry_after: int) -> None:
    """Register the handlers that turn exceptions into :class:`ErrorOut` responses."""

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message, items = _items(exc.detail)
        kind = _KINDS.get(exc.status_code)
        if kind:
            items = [{**i, "type": kind} if i.get("type") == "error" else i for i in items]
        headers = dict(exc.headers or {})
        if exc.status_code == status.HTTP_503_SERVICE_UNAVAILABLE:
            headers.setdefault("Retry-After", str(retry_after))
        return JSONResponse(jsonable_encoder({"message": message, "detail": items}), status_code=exc.status_code,
                            headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        items = _validation_items(exc.errors())
        message = "; ".join(f"{'.'.join(map(str, i['loc']))}: {i['msg']}" for i in items) or "invalid request"
        return JSONResponse({"message": message, "detail": items}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(PoolTimeout)
    async def _pool_timeout(request: Request, exc: PoolTimeout) -> JSONResponse:
        log.warning("database pool exhausted: %s %s", request.method, request.url.path)
        return unavailable("the service is overloaded (no database connection free); retry later", retry_after=retry_after)

    @app.exception_handler(DBAPIError)
    async def _db_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            kind = "busy" if _LOCKED.search(str(exc.orig)) else "unreachable"
            log.warning("database %s on %s %s: %s", kind, request.method, request.url.path, type(exc.orig).__name__)
            return unavailable(f"the database is {kind}; retry later", retry_after=retry_after)
        log.exception("database error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal error", kind="internal"), status_code=500)
