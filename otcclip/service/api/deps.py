"""Request dependencies: settings, storage, database session, the calling API key."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from otcclip.service.core.config import Settings
from otcclip.service.db import crud
from otcclip.service.db.models import ApiKey
from otcclip.service.storage import Storage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


def get_db(request: Request) -> Iterator[Session]:
    """A session on the API's pool (``app.state.sessions``), committed before the response.

    It connects lazily, in the worker thread of the first query, and gives the connection
    back at every commit, so a request holds one only while its handler runs.
    """
    db = request.app.state.sessions()
    try:
        yield db
        db.commit()
    except BaseException:
        db.rollback()
        raise
    finally:
        db.close()


# scope="function": commit before the response is sent. With the default ("request")
# FastAPI runs the code after ``yield`` once the response is out, so a client could be
# told 201/204 and read the old state (or a failed commit would go unreported).
DbDep = Annotated[Session, Depends(get_db, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]


#: The ``bearer`` security scheme of the OpenAPI document (the check is :func:`get_owner`'s).
bearer = HTTPBearer(auto_error=False, scheme_name="bearer", description="An API key: `otcclip keys create NAME`")


def get_owner(db: DbDep, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey:
    """The API key of ``Authorization: Bearer <key>``; 401 when missing or unknown.

    The lookup's transaction ends here, so the connection goes back to the pool while
    the request waits for its handler (an upload streams its body without holding one).
    """
    key = credentials.credentials.strip() if credentials is not None else ""
    if not key:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    row = crud.key_by_plaintext(db, key)
    db.commit()
    if row is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return row


OwnerDep = Annotated[ApiKey, Depends(get_owner)]

#: Largest ``offset`` of a listing (a 64-bit database integer cannot take any int a client sends).
MAX_OFFSET = 2**31 - 1
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Items to skip")]


def as_utc(t: datetime) -> datetime:
    """``t`` with its time zone: SQLite returns naive datetimes, and every stored time is UTC."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def artifact_out(art: Any) -> Any:
    """The ``ArtifactOut`` of an artifact row (``created_at`` in UTC, as the schema's date-time)."""
    from otcclip.service.schemas import ArtifactOut

    out = ArtifactOut.model_validate(art)
    out.created_at = as_utc(out.created_at)
    return out


class ShortTransactionRoute(APIRoute):
    """A route whose ``def`` handler commits its ``db`` session before it returns.

    FastAPI runs a ``def`` handler in a worker thread and the session's teardown later, after
    the response has been serialized on the event loop. Committing at the end of the handler
    (still in its thread; rolling back when it raises) gives the connection back at once,
    so the connections in use never exceed the handler threads, however busy the event
    loop is.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint) and "db" in inspect.signature(endpoint).parameters:
            endpoint = _committing(endpoint)
        super().__init__(path, endpoint, **kwargs)


def _committing(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def handler(*args: Any, **kwargs: Any) -> Any:
        db = kwargs["db"]
        try:
            out = fn(*args, **kwargs)
        except BaseException:
            db.rollback()
            raise
        db.commit()
        return out

    return handler
