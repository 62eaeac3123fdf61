"""``otcclip migrate``: create or upgrade the database schema (``alembic upgrade head``)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("migrate", help="create/upgrade the service database schema")
    p.add_argument("--revision", default="head")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from otcclip.cli._service import database_label, service_settings
    from otcclip.migrations import upgrade

    settings = service_settings()
    upgrade(settings.db_url, args.revision)
    print(f"database at {args.revision}: {database_label(settings)}")
    return 0
