"""Alembic migrations of the service database (the only way the schema is made).

``env.py`` and ``versions/`` are the Alembic environment; :func:`upgrade` and
:func:`downgrade` run them programmatically (``otcclip migrate``, ``otcclip serve``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` using the packaged migrations."""
    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """``alembic upgrade head`` against ``url``."""
    from otcclip.service.db.session import make_engine

    if url.startswith("sqlite"):
        make_engine(url).dispose()  # creates the parent directory
    log.info("migrating %s to %s", url.split("@")[-1], revision)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)
