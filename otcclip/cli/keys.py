"""``otcclip keys create NAME``: create an API key and print it (shown once; stored hashed)."""

from __future__ import annotations

import argparse
from typing import Any

from otcclip.cli import CliError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("keys", help="manage API keys of the service")
    sub = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="create a key and print it")
    c.add_argument("name", help="who or what the key is for")
    c.set_defaults(func=create)
    ls = sub.add_parser("list", help="list keys (names and prefixes only)")
    ls.set_defaults(func=list_keys)
    rv = sub.add_parser("revoke", help="revoke a key by its id")
    rv.add_argument("key_id")
    rv.set_defaults(func=revoke)


def create(args: argparse.Namespace) -> int:
    from otcclip.cli.embedded import create_key
    from otcclip.migrations import upgrade
    from otcclip.service.core.config import Settings

    if not args.name.strip():
        raise CliError("key name must not be empty")
    settings = Settings()
    upgrade(settings.db_url)
    print(create_key(settings, args.name))
    return 0


def list_keys(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from otcclip.migrations import upgrade
    from otcclip.service.core.config import Settings
    from otcclip.service.db.models import ApiKey
    from otcclip.service.db.session import session_scope

    settings = Settings()
    upgrade(settings.db_url)
    with session_scope(settings.db_url) as db:
        for k in db.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            print(f"{k.id}\t{k.prefix}...\t{k.name}\t{'revoked' if k.revoked else 'active'}")
    return 0


def revoke(args: argparse.Namespace) -> int:
    from otcclip.service.core.config import Settings
    from otcclip.service.db.models import ApiKey
    from otcclip.service.db.session import session_scope

    with session_scope(Settings().db_url) as db:
        k = db.get(ApiKey, args.key_id)
        if k is None:
            raise CliError(f"no key with id {args.key_id}")
        k.revoked = True
    return 0
