"""``otcclip keys create NAME``: create an API key and print it (shown once; stored hashed).

The database is found as ``otcclip serve`` finds it (:func:`otcclip.cli._service.service_settings`);
the command says which one it used, password masked.
"""

from __future__ import annotations

import argparse
import sys
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
    """Create a key in the database ``serve`` uses with the same settings; print the key
    on stdout and the database it went to on stderr (a new database is pointed out)."""
    from otcclip.cli._service import database_label, service_settings, sqlite_file
    from otcclip.cli.embedded import create_key
    from otcclip.migrations import upgrade

    if not args.name.strip():
        raise CliError("key name must not be empty")
    settings = service_settings()
    db_file = sqlite_file(settings)
    new = db_file is not None and not db_file.exists()
    upgrade(settings.db_url)
    key = create_key(settings, args.name)
    print(key, flush=True)
    print(f"otcclip: key {args.name!r} written to {database_label(settings)}", file=sys.stderr)
    if new:
        print("otcclip: warning: that database did not exist and was created; a server started with other settings "
              "(another working directory, OTCCLIP_DATA_DIR or OTCCLIP_DATABASE_URL) will not accept this key",
              file=sys.stderr)
    return 0


def list_keys(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from otcclip.cli._service import database_label, service_settings
    from otcclip.migrations import upgrade
    from otcclip.service.db.models import ApiKey
    from otcclip.service.db.session import session_scope

    settings = service_settings()
    upgrade(settings.db_url)
    print(f"otcclip: keys in {database_label(settings)}", file=sys.stderr)
    with session_scope(settings.db_url) as db:
        for k in db.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            print(f"{k.id}\t{k.prefix}...\t{k.name}\t{'revoked' if k.revoked else 'active'}")
    return 0


def revoke(args: argparse.Namespace) -> int:
    from otcclip.cli._service import database_label, service_settings
    from otcclip.service.db.models import ApiKey
    from otcclip.service.db.session import session_scope

    settings = service_settings()
    with session_scope(settings.db_url) as db:
        k = db.get(ApiKey, args.key_id)
        if k is None:
            raise CliError(f"no key with id {args.key_id} in {database_label(settings)}")
        k.revoked = True
    print(f"otcclip: key {args.key_id} revoked in {database_label(settings)}", file=sys.stderr)
    return 0
