"""Request dependencies: settings, storage, database session, the calling API key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from otcclip.service.core.config import Settings
from otcclip.service.db import crud
from otcclip.service.db.models import ApiKey
from otcclip.service.db.session import session_factory
from otcclip.service.storage import Storage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_storage(request: Request) -> Storage:
    return request.app.state.storage  # type: ignore[no-any-return]


def get_db(request: Request) -> Iterator[Session]:
    db = session_factory(request.app.state.settings.db_url)()
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


def get_owner(request: Request, db: DbDep) -> ApiKey:
    """The API key of ``Authorization: Bearer <key>``; 401 when missing or unknown."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    row = crud.key_by_plaintext(db, key.strip())
    if row is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return row


OwnerDep = Annotated[ApiKey, Depends(get_owner)]
