"""Frozen settings dataclasses that declare each setting once.

Every field is declared with :func:`setting`: its default, a one-line help text and its
bounds. The same declaration validates the object on construction (:func:`check`),
builds the API's request schemas (``otcclip.service.schemas``) and the command line's
options (``otcclip.cli.options``). Nested settings are nested dataclasses; a plain dict of
overrides becomes an object with :func:`from_dict`, and :func:`to_dict` gives it back.

This module and its package import nothing heavier than the standard library, so the API
process validates job settings without loading torch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_BOUNDS = (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="), ("lt", operator.lt, "<"))


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    item_choices: tuple[Any, ...] | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A dataclass field carrying its help text and bounds.

    Parameters
    ----------
    default
        The default value (immutable: a number, a string, a tuple, a frozen dataclass).
    help : str
        One line for the CLI's ``--help`` and the API's schema.
    ge, gt, le, lt : float, optional
        Bounds of a number.
    choices : tuple, optional
        The allowed values.
    item_choices : tuple, optional
        The allowed items of a tuple-valued setting.
    aliases : tuple of str
        Other names users may type for it (another spelling).
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices,
            "item_choices": item_choices, "aliases": aliases}
    return dataclasses.field(default=default, metadata={k: v for k, v in meta.items() if v not in (None, ())})


def check(obj: Any) -> None:
    """Validate ``obj``'s fields against their declarations; tuples given as lists become tuples.

    Raises
    ------
    ValueError
        Naming the first field out of bounds, not finite or not among its choices.
    """
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        sub = nested_type(type(obj), f.name) if isinstance(v, Mapping) else None
        if sub is not None:  # a nested settings object given as a dict of overrides
            v = from_dict(sub, v, base=f.default if isinstance(f.default, sub) else None)
            object.__setattr__(obj, f.name, v)
        if isinstance(f.default, tuple) and isinstance(v, list):
            v = tuple(v)
            object.__setattr__(obj, f.name, v)
        md = f.metadata
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{f.name} must be a finite number, got {v!r}")
        if isinstance(v, bool) or v is None:
            continue
        for key, op, word in _BOUNDS:
            if key in md and isinstance(v, int | float) and not op(v, md[key]):
                raise ValueError(f"{f.name} must be {word} {md[key]}, got {v!r}")
        if "choices" in md and v not in md["choices"]:
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, md['choices']))}; got {v!r}")
        if "item_choices" in md:
            bad = [x for x in v if x not in md["item_choices"]]
            if bad:
                raise ValueError(f"unknown {f.name} {bad}; known: {', '.join(map(str, md['item_choices']))}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def nested_type(cls: type, name: str) -> type | None:
    """The dataclass type of field ``name`` of ``cls`` when it is a nested settings object."""
    hint = _hints(cls)[name]
    return hint if dataclasses.is_dataclass(hint) and isinstance(hint, type) else None


def from_dict(cls: type[T], data: Mapping[str, Any] | None = None, *, base: T | None = None) -> T:
    """Build ``cls`` from a (nested) dict of the settings that differ from the defaults.

    Parameters
    ----------
    cls : dataclass type
    data : mapping, optional
        ``{field: value}``; a nested settings field takes a mapping of its own overrides,
        applied on top of the field's default (or of ``base``'s value). Aliases declared
        with :func:`setting` are accepted.
    base : cls, optional
        Start from this object instead of the defaults.

    Raises
    ------
    ValueError
        An unknown name (with the known ones), or a value :func:`check` refuses.
    """
    data = dict(data or {})
    flds = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for f in flds.values():
        for alias in f.metadata.get("aliases", ()):
            if alias in data:
                if f.name in data:
                    raise ValueError(f"both {f.name!r} and its alias {alias!r} given")
                data[f.name] = data.pop(alias)
    unknown = sorted(set(data) - set(flds))
    if unknown:
        raise ValueError(f"unknown settings {unknown} for {cls.__name__}; known: {', '.join(sorted(flds))}")
    kwargs: dict[str, Any] = {}
    if base is not None:
        kwargs = {name: getattr(base, name) for name in flds if flds[name].init}
    for name, value in data.items():
        sub = nested_type(cls, name)
        if sub is not None and isinstance(value, Mapping):
            start = kwargs.get(name, flds[name].default)
            value = from_dict(sub, value, base=start if isinstance(start, sub) else None)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{cls.__name__}: {e}") from e


def to_dict(obj: Any) -> dict[str, Any]:
    """Nested plain dict of ``obj`` (tuples as lists): JSON-able, and :func:`from_dict`'s input."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return typing.cast(dict[str, Any], plain(obj))


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field[Any], Any]]:
    """Every leaf setting of ``cls``: ``(path, field, type hint)``, nested objects expanded."""
    out: list[tuple[tuple[str, ...], dataclasses.Field[Any], Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        sub = nested_type(cls, f.name)
        if sub is not None:
            out.extend(leaves(sub, (*prefix, f.name)))
        else:
            out.append(((*prefix, f.name), f, hints[f.name]))
    return out


class Settings:
    """Base of the settings dataclasses: :meth:`to_dict` and :meth:`from_dict` as methods."""

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (:func:`to_dict`)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any] | None = None) -> T:
        """Build from a nested dict of overrides (:func:`from_dict`)."""
        return from_dict(cls, data)
