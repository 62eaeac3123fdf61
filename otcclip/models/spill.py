"""Per-pair work arrays that live in memory-mapped files instead of RAM.

:func:`~otcclip.models.sanitize.decide` on saved shards gives the decision pass a spill
directory (``DetectorEnv.spill``); every array with one entry (or one row) per pair is
then a file there, memory-mapped, so the process's anonymous memory does not grow with
the number of pairs (the kernel can drop the file pages and read them back). Without a
directory the same functions hold the arrays in RAM, as plain numpy would.

The order statistics here (:func:`median`, :func:`median_abs_dev`) give bit for bit what
``np.median`` gives on the same values: they partition a copy of the values in place
(``overwrite_input``), a copy that is a spilled file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["empty", "full", "copy_of", "select", "nonzero", "median", "median_abs_dev"]


def empty(spill: str | Path | None, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array: in RAM without ``spill``, else memory-mapped from a new
    file in that directory. The file is unlinked as soon as it is mapped (POSIX keeps a
    mapped file's pages until the last map goes), so each array's disk is freed when the
    array is dropped, not when the directory is removed; where the unlink fails (a
    system that refuses to unlink an open file) the file stays until the directory goes.

    Parameters
    ----------
    spill : path or None
        Directory of the files.
    shape : int or tuple of int
    dtype : numpy dtype (not object)

    Returns
    -------
    ndarray
        A plain ndarray view of the map (not an ``np.memmap``).
    """
    shp = (shape,) if isinstance(shape, int) else tuple(shape)
    dt = np.dtype(dtype)
    if spill is None or dt.hasobject or int(np.prod(shp)) == 0:
        return np.empty(shp, dtype=dt)
    fd, name = tempfile.mkstemp(dir=spill, suffix=".npy")
    os.close(fd)
    out = np.asarray(np.lib.format.open_memmap(name, mode="w+", dtype=dt, shape=shp))
    try:
        os.unlink(name)
    except OSError:
        pass
    return out


def full(spill: str | Path | None, shape: int | tuple[int, ...], value: Any, dtype: Any) -> np.ndarray:
    """:func:`empty` filled with ``value``."""
    out = empty(spill, shape, dtype)
    out[...] = value
    return out


def copy_of(spill: str | Path | None, x: np.ndarray, *, block: int = 1 << 16) -> np.ndarray:
    """A copy of ``x`` (see :func:`empty`), made in row blocks (no RAM-wide temporary)."""
    out = empty(spill, x.shape, x.dtype)
    for s in range(0, len(x), block):
        out[s : s + block] = x[s : s + block]
    return out



Mask = Callable[[int, int], np.ndarray] | np.ndarray


def _mask(keep: Mask, s: int, e: int) -> np.ndarray:
    return np.asarray(keep(s, e) if callable(keep) else keep[s:e], dtype=bool)


def select(x: np.ndarray, keep: Mask, spill: str | Path | None, *, dtype: Any = None,
           block: int = 1 << 16) -> np.ndarray:
    """``x[mask].astype(dtype)`` of a 1-D ``x`` (N,), built in row blocks into a spilled
    array (:func:`empty`; in RAM without ``spill``).

    ``keep`` is the (N,) bool mask, or a function ``keep(start, stop)`` giving the mask of
    rows ``start:stop`` (so no (N,) mask need exist)."""
    n = len(x)
    count = sum(int(np.count_nonzero(_mask(keep, s, min(s + block, n)))) for s in range(0, n, block))
    out = empty(spill, count, x.dtype if dtype is None else dtype)
    pos = 0
    for s in range(0, n, block):
        b = x[s : s + block][_mask(keep, s, min(s + block, n))]
        out[pos : pos + len(b)] = b
        pos += len(b)
    return out


def nonzero(n: int, keep: Mask, spill: str | Path | None, *, block: int = 1 << 16) -> np.ndarray:
    """(R,) int64: ``np.nonzero(mask)[0]`` of the (N,) mask ``keep`` (an array, or a
    function ``keep(start, stop)`` as in :func:`select`), built in row blocks into a
    spilled array."""
    count = sum(int(np.count_nonzero(_mask(keep, s, min(s + block, n)))) for s in range(0, n, block))
    out = empty(spill, count, np.int64)
    pos = 0
    for s in range(0, n, block):
        v = np.flatnonzero(_mask(keep, s, min(s + block, n))) + s
        out[pos : pos + len(v)] = v
        pos += len(v)
    return out

def median(x: np.ndarray, spill: str | Path | None) -> Any:
    """``np.median(x)`` of a 1-D array, from a spilled copy partitioned in place."""
    if spill is None:
        return np.median(x)
    return np.median(copy_of(spill, x), overwrite_input=True)


def median_abs_dev(x: np.ndarray, center: Any, spill: str | Path | None, *, block: int = 1 << 16) -> Any:
    """``np.median(np.abs(x - center))`` of a 1-D array (same dtypes, same value),
    with the deviations in a spilled array."""
    if spill is None:
        return np.median(np.abs(x - center))
    dt = (x[:1] - center).dtype
    dev = empty(spill, x.shape, dt)
    for s in range(0, len(x), block):
        np.abs(x[s : s + block] - center, out=dev[s : s + block])
    return np.median(dev, overwrite_input=True)
