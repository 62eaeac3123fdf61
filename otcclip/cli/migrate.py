"""``otcclip migrate``: create or upgrade the database schema (``alembic upgrade head``)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("migrate", help="create/upgrade the service database schema")
    p.add_argument("--revision", default="head")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from otcclip.migrations import upgrade
    from otcclip.service.core.config import Settings

    settings = Settings()
    upgrade(settings.db_url, args.revision)
    print(f"database at {args.revision}: {settings.db_url.split('@')[-1]}")
    return 0
