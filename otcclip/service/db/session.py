"""Engines and sessions. SQLite runs in WAL mode with a busy timeout (API + worker processes).

An engine is cached per URL and pool shape: the API asks for a pool as large as its
handler threads (``Settings.api_threads``) with a short checkout timeout (answered 503),
the workers and command-line tools take the default pool.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from threading import Lock
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_ENGINES: dict[tuple[str, int | None, float | None], Engine] = {}
_LOCK = Lock()
#: Seconds a SQLite connection waits for another writer's lock before it gives up.
SQLITE_BUSY_TIMEOUT_S: float = 30


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str, *, pool_size: int | None = None, pool_timeout: float | None = None) -> Engine:
    """A new engine for ``url`` (SQLite: WAL, busy timeout, foreign keys on).

    Parameters
    ----------
    url : str
        SQLAlchemy URL.
    pool_size : int, optional
        Connections kept in the pool (default 5); up to half as many again are opened
        on demand.
    pool_timeout : float, optional
        Seconds a checkout waits for a free connection before ``sqlalchemy.exc.TimeoutError``
        (default 30).
    """
    size = pool_size or 5
    pool: dict[str, Any] = {"pool_size": size, "max_overflow": max(2, size // 2), "pool_timeout": pool_timeout or 30}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:
            pool = {}  # in-memory databases use SQLAlchemy's single-connection pool
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def get_engine(url: str, *, pool_size: int | None = None, pool_timeout: float | None = None) -> Engine:
    """One cached engine per URL, pool shape and process."""
    key = (url, pool_size, pool_timeout)
    with _LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            eng = _ENGINES[key] = make_engine(url, pool_size=pool_size, pool_timeout=pool_timeout)
        return eng


def dispose_engines() -> None:
    """Drop cached engines (after a fork, or at the end of tests)."""
    with _LOCK:
        for eng in _ENGINES.values():
            eng.dispose()
        _ENGINES.clear()


def session_factory(url: str, *, pool_size: int | None = None, pool_timeout: float | None = None) -> sessionmaker[Session]:
    """Sessions on the cached engine of ``url`` (objects stay readable after commit)."""
    return sessionmaker(bind=get_engine(url, pool_size=pool_size, pool_timeout=pool_timeout), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session committed on success and rolled back on error."""
    s = session_factory(url)()
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()
