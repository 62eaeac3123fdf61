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

#: Libraries whose INFO (and, for some, WARNING) lines read as failures to a user; shown with ``-v``.
QUIET_LOGGERS: dict[str, int] = {
    "alembic": logging.WARNING, "faiss": logging.WARNING, "faiss.loader": logging.WARNING,
    "kombu": logging.ERROR, "celery": logging.WARNING, "httpx": logging.WARNING, "httpcore": logging.WARNING,
    "multipart": logging.WARNING, "python_multipart": logging.WARNING, "urllib3": logging.WARNING,
    "filelock": logging.WARNING, "huggingface_hub": logging.WARNING, "PIL": logging.WARNING,
    "uvicorn.access": logging.WARNING,
}


class CliError(Exception):
    """A user error: printed as ``otcclip: error: ...`` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otcclip",
        description="Sanitize image-caption datasets against CLIP poisoning (OTCCLIP).",
    )
    from otcclip import __version__

    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, including the libraries' (alembic, kombu, faiss, ...)")
    parser.add_argument("--version", action="version", version=f"otcclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def configure_logging(*, verbose: bool) -> None:
    """INFO for otcclip, WARNING for the libraries (some quieter: :data:`QUIET_LOGGERS`); all at DEBUG with ``verbose``."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # otcclip's INFO lines; the libraries' (open_clip logs on the root logger) only from WARNING up
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("otcclip").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otcclip`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"otcclip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("otcclip: interrupted", file=sys.stderr)
        return 130
