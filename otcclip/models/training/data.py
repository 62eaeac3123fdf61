"""Image-caption data for training and evaluation: manifest rows plus decoded images.

Images are decoded once per run into a ``uint8`` tensor ``(N, 3, S, S)`` (resize of the
shorter side to ``S`` and centre crop, as open_clip's eval transform) when they fit in
memory, so epochs never re-decode files. Larger sets are decoded per batch.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from otcclip.models.progress import ProgressFn, StopFn, check_stop

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The manifest lacks a column we need or has no usable rows."""


@dataclass
class ManifestRows:
    """Columns of a manifest plus a way to open its images.

    Attributes
    ----------
    path : Path
        The manifest file.
    columns : dict[str, list[str]]
        Every column as strings (``id``, ``image``, ``caption``, ``label``, extras).
    manifest : object or None
        The IO engineer's ``Manifest`` when ``otcclip.models.manifest`` is available.
    """

    path: Path
    columns: dict[str, list[str]]
    manifest: Any = None

    def __len__(self) -> int:
        return len(self.columns["image"])

    def col(self, name: str) -> list[str]:
        if name not in self.columns:
            raise DataError(f"{self.path}: missing column {name!r}")
        return self.columns[name]

    @property
    def ids(self) -> list[str]:
        if "id" in self.columns:
            return self.columns["id"]
        return [str(i) for i in range(len(self))]

    def open_image(self, i: int) -> Image.Image:
        rel = self.columns["image"][i]
        if self.manifest is not None:
            return self.manifest.images.open(rel)  # type: ignore[no-any-return]
        p = (self.path.parent / rel).resolve()
        with Image.open(p) as im:
            return im.convert("RGB")


def read_rows(manifest: Any, *, need: Sequence[str] = ("image",)) -> ManifestRows:
    """Read a manifest (a path or an IO ``Manifest``) into :class:`ManifestRows`.

    Uses ``otcclip.models.manifest.read_manifest`` when present (all formats), else reads
    CSV/TSV directly.

    Raises
    ------
    DataError
        If a column in ``need`` is missing or the manifest is empty.
    """
    if hasattr(manifest, "table"):
        rows = ManifestRows(Path(manifest.path), _table_columns(manifest.table), manifest)
    else:
        path = Path(manifest)
        if not path.exists():
            raise DataError(f"{path}: manifest not found")
        try:
            from otcclip.models.manifest import read_manifest

            cols = tuple(c for c in ("image", "caption", "label") if c in need) or ("image",)
            m = read_manifest(path, columns=cols)
            rows = ManifestRows(Path(m.path), _table_columns(m.table), m)
        except ImportError:
            rows = _read_csv(path)
    for c in need:
        rows.col(c)
    if len(rows) == 0:
        raise DataError(f"{rows.path}: manifest has no rows")
    return rows


def _table_columns(table: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in table.column_names:
        out[name] = ["" if v is None else str(v) for v in table.column(name).to_pylist()]
    return out


def _read_csv(path: Path) -> ManifestRows:
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter=delim)
        fields = list(reader.fieldnames or [])
        cols: dict[str, list[str]] = {k: [] for k in fields}
        for r in reader:
            for k in fields:
                cols[k].append(r.get(k) or "")
    return ManifestRows(path, cols)


def load_image(img: Image.Image, size: int) -> np.ndarray:
    """PIL image -> ``uint8`` array ``(3, size, size)`` (shorter side resize + centre crop)."""
    im = ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


class ImageSource:
    """Indexable images: ``source[idx] -> (uint8 (n, 3, S, S), ok bool (n,))``.

    Parameters
    ----------
    rows : ManifestRows
    size : int
        Side ``S`` of the decoded images.
    cache_bytes : int
        Decode everything up front when ``N * 3 * S * S`` fits in this many bytes.
    """

    def __init__(
        self,
        rows: ManifestRows,
        size: int,
        *,
        cache_bytes: int = 4 << 30,
        progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> None:
        self.rows = rows
        self.size = size
        self.cached: torch.Tensor | None = None
        self.ok_cached: torch.Tensor | None = None
        n = len(rows)
        if n * 3 * size * size <= cache_bytes:
            arr = torch.zeros((n, 3, size, size), dtype=torch.uint8)
            ok = torch.ones(n, dtype=torch.bool)
            for i in range(n):
                px, good = self._decode(i)
                arr[i] = torch.from_numpy(px)
                ok[i] = good
                if i % 256 == 0:
                    check_stop(should_stop)
                    if progress is not None:
                        progress("decode", i, n)
            if progress is not None:
                progress("decode", n, n)
            self.cached, self.ok_cached = arr, ok
            bad = int((~ok).sum())
            if bad:
                log.warning("%s: %d unreadable images (skipped in training)", rows.path, bad)

    def __len__(self) -> int:
        return len(self.rows)

    def _decode(self, i: int) -> tuple[np.ndarray, bool]:
        try:
            return load_image(self.rows.open_image(i), self.size), True
        except (OSError, ValueError) as e:
            log.debug("unreadable image row %d: %s", i, e)
            return np.zeros((3, self.size, self.size), dtype=np.uint8), False

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cached is not None and self.ok_cached is not None:
            return self.cached[idx], self.ok_cached[idx]
        out = [self._decode(int(i)) for i in idx.tolist()]
        pix = torch.from_numpy(np.stack([o[0] for o in out])) if out else torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        return pix, torch.tensor([o[1] for o in out], dtype=torch.bool)

    @property
    def trainable(self) -> torch.Tensor:
        """(N,) bool: rows the loop trains on - the readable ones when the images are
        cached (their readability is known), else all (an unreadable one is a blank image)."""
        if self.cached is not None and self.ok_cached is not None:
            return self.ok_cached
        return torch.ones(len(self), dtype=torch.bool)

    @property
    def ok(self) -> torch.Tensor:
        """Readable mask for all rows (decodes everything when not cached)."""
        if self.ok_cached is None:
            self.ok_cached = torch.tensor([self._decode(i)[1] for i in range(len(self))])
        return self.ok_cached
