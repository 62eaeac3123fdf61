"""Command-line options generated from the core's settings dataclasses.

Every leaf setting of a settings class becomes one option: ``--k``, ``--batch-size``,
nested ones by their dotted path (``--ot.reg``, ``--decisions.trigger-sensitivity.z``).
Help text, choices and the default shown come from the setting's declaration
(:func:`otcclip.models.config.setting`); options the user does not give are not passed
on, so the defaults live only in the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

from otcclip.cli import CliError
from otcclip.models.config.base import from_dict, nested_type

_PREFIX = "setting:"


def _leaves(cls: type, default: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dataclasses.Field[Any], Any, Any]]:
    """``(path, field, type hint, default value)`` of every leaf, defaults read from ``default``'s nested objects."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name) if default is not None else f.default
        sub = nested_type(cls, f.name)
        if sub is not None:
            yield from _leaves(sub, value, (*path, f.name))
        else:
            yield (*path, f.name), f, hints[f.name], value


def _base(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, type(int | None)) and len(args) == 1 else hint


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_settings(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (), title: str | None = None) -> None:
    """Add one option per leaf setting of ``cls`` (top-level names in ``exclude`` skipped)."""
    group = parser.add_argument_group(title or f"settings ({cls.__name__})")
    try:
        defaults: Any = cls()
    except (TypeError, ValueError):
        defaults = None
    for path, f, hint, default in _leaves(cls, defaults):
        if path[0] in exclude:
            continue
        md = f.metadata
        flags = ["--" + ".".join(p.replace("_", "-") for p in path)]
        flags += ["--" + ".".join((*path[:-1], a)).replace("_", "-") for a in md.get("aliases", ())]
        kw: dict[str, Any] = {"dest": _PREFIX + ".".join(path), "default": argparse.SUPPRESS,
                              # argparse %-formats help strings: a literal '%' (as in "30 %") must be doubled
                              "help": f"{md.get('help', '')} (default: {_shown(default)})".replace("%", "%%")}
        base = _base(hint)
        origin = typing.get_origin(base)
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is tuple:
            kw["type"] = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())
            kw["metavar"] = "A,B,..."
        elif base in (int, float, str):
            kw["type"] = base
            kw["metavar"] = {int: "N", float: "X", str: "TEXT"}[base]
            if "choices" in md:
                del kw["metavar"]
                kw["choices"] = md["choices"]
        else:
            continue
        group.add_argument(*flags, **kw)


def settings_from_args(args: argparse.Namespace, cls: type, **given: Any) -> Any:
    """Build ``cls`` from the options the user gave (plus ``given`` top-level values).

    Raises
    ------
    CliError
        A setting out of bounds (exit code 2 with the message).
    """
    data: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith(_PREFIX):
            continue
        *parents, leaf = key[len(_PREFIX):].split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    data.update(given)
    try:
        return from_dict(cls, data)
    except ValueError as e:
        raise CliError(str(e)) from e
