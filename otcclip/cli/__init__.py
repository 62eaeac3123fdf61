"""The ``otcclip`` command line.

Each sub-command lives in its own module in this package and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
Modules import torch and the engine lazily inside ``func`` so that ``otcclip --help``
and the web-only commands stay fast. Argparse namespaces stop here: commands turn them
into the core's frozen config dataclasses.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence


class CliError(Exception):
    """A user error: printed as ``otcclip: error: ...`` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otcclip",
        description="Sanitize image-caption datasets against CLIP poisoning (OTCCLIP).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otcclip`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"otcclip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("otcclip: interrupted", file=sys.stderr)
        return 130
