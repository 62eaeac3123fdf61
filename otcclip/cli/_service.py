"""How the service's commands (``serve``, ``worker``, ``keys``, ``migrate``) find their
settings, and how they name the database they use."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from otcclip.service.core.config import Settings


def service_settings() -> Settings:
    """The service's settings, found the same way by every command: the ``OTCCLIP_*``
    environment variables, else the defaults, which lie under the working directory
    (``./.otcclip``: the SQLite database, storage and broker folders). A command run
    elsewhere without the server's variables uses another database."""
    from otcclip.service.core.config import Settings

    return Settings()


def database_label(settings: Settings) -> str:
    """The effective database URL with any password masked (``***``)."""
    from sqlalchemy.engine import make_url

    return make_url(settings.db_url).render_as_string(hide_password=True)


def sqlite_file(settings: Settings) -> Path | None:
    """The database file when the database is SQLite (None otherwise or in memory)."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.db_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)
