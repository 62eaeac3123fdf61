"""Image-caption manifests: read and validate CSV / TSV / JSONL / Parquet / WebDataset, write back.

A manifest is a table with string columns ``id``, ``image`` and ``caption`` (and/or
``label``) plus any extra columns, which are kept (as strings for CSV/TSV and WebDataset,
in their original types for JSONL and Parquet). ``image`` is a path relative to the
dataset root (the manifest's directory, a given directory, or the inside of a zip / tar /
tar.gz archive), or for WebDataset ``"<shard>.tar#<KEY>.<ext>"``.

Reading validates every row without decoding any image (existence checks only), so it is
the service's upload validation too. Every problem raises :class:`ManifestError` naming the
file and the row: ``row N`` is the (first) line number for CSV/TSV/JSONL (the CSV header is
line 1) and the 1-based record number for Parquet and WebDataset. Images that exist but cannot
be decoded are *not* manifest errors: :func:`load_image_batch` reports them per row.

Writing (:func:`write_manifest`) uses the input's own format and is atomic (a temporary
file, or directory for WebDataset, renamed into place).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from otcclip.models.images import (
    DEFAULT_LIMITS,
    IMAGE_EXTENSIONS,
    ArchiveError,
    ArchiveLimits,
    ImageBatch,
    UnreadableImage,
    UnsafePath,
    load_image_batch,
    safe_relpath,
)
from otcclip.models.stores import (
    ImageStore,
    ShardImageStore,
    TarImageStore,
    open_store,
)

__all__ = [
    "FORMATS",
    "ArchiveLimits",
    "ImageBatch",
    "ImageStore",
    "Manifest",
    "ManifestError",
    "UnreadableImage",
    "detect_format",
    "load_image_batch",
    "read_manifest",
]

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("csv", "tsv", "jsonl", "parquet", "webdataset")
_SUFFIXES = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet", ".tar": "webdataset",
}
#: Columns always stored as strings (in this order, first in the table).
_STRING_COLUMNS = ("id", "image", "caption", "label")
#: WebDataset member extensions mapped to columns (others keep their extension as name).
_WDS_COLUMNS = {"txt": "caption", "cls": "label"}
#: Columns mapped back to WebDataset member extensions (the writer's inverse of _WDS_COLUMNS).
WDS_EXTS = {v: k for k, v in _WDS_COLUMNS.items()}


class ManifestError(ValueError):
    """A manifest is unusable; ``str(e) == "<file>[:row N]: <reason>"``.

    Attributes
    ----------
    file : str
    row : int or None
        Line number (CSV/TSV/JSONL) or 1-based record number (Parquet/WebDataset).
    reason : str
    """

    def __init__(self, file: str | Path, row: int | None, reason: str) -> None:
        self.file = str(file)
        self.row = row
        self.reason = reason
        where = self.file if row is None else f"{self.file}:row {row}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (ManifestError, (self.file, self.row, self.reason))


@dataclass(frozen=True)
class Manifest:
    """A validated manifest.

    Attributes
    ----------
    table : pyarrow.Table
        String columns ``id``, ``image``, ``caption`` and/or ``label``, then extras.
    format : str
        One of :data:`FORMATS`.
    path : Path
        The manifest file (the ``.tar`` shard or directory of shards for WebDataset).
    images : ImageStore
        Resolves the ``image`` column.
    sha256 : str
        Hex digest of the manifest file(s).
    """

    table: pa.Table
    format: str
    path: Path
    images: ImageStore
    sha256: str

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def column(self, name: str) -> list[Any]:
        """Column ``name`` as a Python list (``KeyError`` if absent)."""
        if name not in self.table.column_names:
            raise KeyError(f"{self.path}: no column {name!r}")
        return list(self.table.column(name).to_pylist())

    @cached_property
    def ids(self) -> list[str]:
        return self.column("id")

    @cached_property
    def image_paths(self) -> list[str]:
        return self.column("image")

    @cached_property
    def captions(self) -> list[str]:
        return self.column("caption")

    @cached_property
    def labels(self) -> list[str]:
        return self.column("label")


def detect_format(path: str | Path) -> str:
    """The manifest format of ``path`` from its suffix (a directory means WebDataset shards)."""
    p = Path(path)
    if p.is_dir():
        return "webdataset"
    fmt = _SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise ManifestError(p, None, f"unknown manifest format {p.suffix!r} (expected one of "
                            f"{', '.join(sorted(_SUFFIXES))} or a directory of .tar shards)")
    return fmt


def read_manifest(
    path: str | Path,
    *,
    images: str | Path | None = None,
    columns: Sequence[str] = ("image", "caption"),
    limits: ArchiveLimits = DEFAULT_LIMITS,
    check_images: bool = True,
) -> Manifest:
    """Read and validate a manifest.

    Parameters
    ----------
    path : path
        A ``.csv``, ``.tsv``, ``.jsonl``, ``.parquet`` file, a WebDataset ``.tar`` shard or
        a directory of ``*.tar`` shards.
    images : path, optional
        Where the ``image`` paths are resolved: None -> the manifest's directory; a
        directory; or a ``.zip`` / ``.tar`` / ``.tar.gz`` archive. Ignored for WebDataset.
    columns : sequence of str
        Required columns, e.g. ``("image", "caption")`` or ``("image", "label")``.
    limits : ArchiveLimits
        Caps for archives (zip bombs).
    check_images : bool
        Check that every image exists (no decoding).

    Raises
    ------
    ManifestError
        Missing column, empty value, unsafe or missing image path, duplicate id, unparsable
        file, refused archive.
    """
    p = Path(path)
    if not p.exists():
        raise ManifestError(p, None, "manifest not found")
    fmt = detect_format(p)
    if fmt == "webdataset":
        return _read_webdataset(p, columns=columns, limits=limits, check_images=check_images)
    try:
        store = open_store(p.parent if images is None else Path(images), limits=limits)
    except (ArchiveError, FileNotFoundError) as e:
        raise ManifestError(images if images is not None else p, None, str(e)) from e
    if fmt in ("csv", "tsv"):
        cols, rownums = _read_csv(p, delimiter="\t" if fmt == "tsv" else ",")
    elif fmt == "jsonl":
        cols, rownums = _read_jsonl(p)
    else:
        cols, rownums = _read_parquet(p), None
    table = _build_table(p, cols, rownums, columns=columns, store=store if check_images else None)
    return Manifest(table, fmt, p, store, _sha256([p]))


# ---------------------------------------------------------------- readers


def _read_csv(path: Path, *, delimiter: str) -> tuple[dict[str, list[Any]], list[int]]:
    try:
        f = path.open(encoding="utf-8-sig", newline="")
    except OSError as e:
        raise ManifestError(path, None, f"cannot read ({e})") from e
    with f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                raise ManifestError(path, None, "empty file (no header row)")
            header = [h.strip() for h in header]
            dup = {h for h in header if header.count(h) > 1}
            if dup:
                raise ManifestError(path, 1, f"duplicate column name(s) {sorted(dup)}")
            cols: dict[str, list[Any]] = {h: [] for h in header}
            lists = [cols[h] for h in header]
            rownums: list[int] = []
            width = len(header)
            start = reader.line_num + 1
            for rec in reader:
                line, start = start, reader.line_num + 1
                if not rec or (len(rec) == 1 and not rec[0].strip() and width > 1):
                    continue
                if len(rec) != width:
                    raise ManifestError(path, line, f"{len(rec)} fields, the header has {width}")
                for lst, v in zip(lists, rec, strict=True):
                    lst.append(v)
                rownums.append(line)
        except csv.Error as e:
            raise ManifestError(path, reader.line_num, f"malformed {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from e
        except UnicodeDecodeError as e:
            raise ManifestError(path, reader.line_num + 1, f"not UTF-8 text ({e.reason})") from e
    return cols, rownums


def _read_jsonl(path: Path) -> tuple[dict[str, list[Any]], list[int]]:
    cols: dict[str, list[Any]] = {}
    rownums: list[int] = []
    n = 0
    try:
        f = path.open("rb")
    except OSError as e:
        raise ManifestError(path, None, f"cannot read ({e})") from e
    with f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as e:
                raise ManifestError(path, lineno, f"not UTF-8 text ({e.reason})") from e
            except json.JSONDecodeError as e:
                raise ManifestError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from e
            if not isinstance(obj, dict):
                raise ManifestError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
            for k, v in obj.items():
                if k not in cols:
                    cols[k] = [None] * n
                cols[k].append(v)
            n += 1
            for lst in cols.values():
                if len(lst) < n:
                    lst.append(None)
            rownums.append(lineno)
    return cols, rownums


def _read_parquet(path: Path) -> dict[str, list[Any]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(path, None, f"not a readable Parquet file ({e})") from e
    cols: dict[str, Any] = {}
    for name in table.column_names:
        cols[name] = table.column(name).to_pylist() if name in _STRING_COLUMNS else table.column(name)
    return cols


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _build_table(
    path: Path,
    cols: Mapping[str, Any],
    rownums: Sequence[int] | None,
    *,
    columns: Sequence[str],
    store: ImageStore | None,
) -> pa.Table:
    """Validate rows and assemble the Arrow table (string key columns first, extras after)."""
    missing = [c for c in columns if c not in cols]
    if missing:
        found = ", ".join(repr(c) for c in cols) or "none"
        raise ManifestError(path, None, f"missing required column(s) {', '.join(repr(c) for c in missing)} (found: {found})")
    n = len(next(iter(cols.values()))) if cols else 0
    if n == 0:
        raise ManifestError(path, None, "manifest has no rows")

    def row(i: int) -> int:
        return rownums[i] if rownums is not None else i + 1

    out: dict[str, pa.Array] = {}
    for name in _STRING_COLUMNS:
        if name not in cols:
            continue
        values = cols[name]
        required = name in columns or name in ("id", "image")
        strs: list[str | None] = []
        for i, v in enumerate(values):
            if _empty(v):
                if required:
                    raise ManifestError(path, row(i), f"empty {name}")
                strs.append(None)
            else:
                strs.append(v if isinstance(v, str) else to_str(v))
        out[name] = pa.array(strs, type=pa.string())
    if "id" not in out:
        out = {"id": pa.array([str(i) for i in range(n)], type=pa.string()), **out}
    ids = out["id"].to_pylist()
    seen: dict[str, int] = {}
    for i, key in enumerate(ids):
        if key in seen:
            raise ManifestError(path, row(i), f"duplicate id {key!r} (first at row {seen[key]})")
        seen[key] = row(i)
    if "image" in out:
        for i, ref in enumerate(out["image"].to_pylist()):
            try:
                safe_relpath(ref)
                if store is not None and not store.exists(ref):
                    raise ManifestError(path, row(i), f"image {ref!r} not found in {store.source}")
            except UnsafePath as e:
                raise ManifestError(path, row(i), str(e)) from e
    for name, values in cols.items():
        if name in out:
            continue
        out[name] = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else _extra_array(values)
    return pa.table(out)


def to_str(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _extra_array(values: list[Any]) -> pa.Array:
    """An extra column in its original types when Arrow can hold them, else as strings."""
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError):
        return pa.array([None if v is None else to_str(v) for v in values], type=pa.string())


def _sha256(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- WebDataset


def _shard_files(path: Path) -> list[Path]:
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        if not shards:
            raise ManifestError(path, None, "directory holds no .tar shards")
        return shards
    return [path]


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _read_webdataset(
    path: Path, *, columns: Sequence[str], limits: ArchiveLimits, check_images: bool
) -> Manifest:
    files = _shard_files(path)
    shards: dict[str, TarImageStore] = {}
    for f in files:
        try:
            shards[f.name] = TarImageStore(f, limits=limits)
        except ArchiveError as e:
            raise ManifestError(f, None, str(e)) from e
    store = ShardImageStore(shards, source=str(path))
    cols: dict[str, list[Any]] = {"id": [], "image": []}
    shard_of: list[str] = []
    n = 0
    for shard_name, shard in shards.items():
        samples: dict[str, dict[str, str]] = {}
        for member in shard.names():
            key, ext = split_key(member)
            if ext:
                samples.setdefault(key, {})[ext] = member
        for key, members in samples.items():
            n += 1
            img_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if img_ext is None:
                raise ManifestError(shard.path, n, f"sample {key!r} has no image member (.{'/.'.join(IMAGE_EXTENSIONS)})")
            cols["id"].append(key)
            cols["image"].append(f"{shard_name}#{members[img_ext]}")
            shard_of.append(shard_name)
            for ext, member in members.items():
                if ext == img_ext:
                    continue
                col = _WDS_COLUMNS.get(ext, ext)
                if col in ("id", "image"):
                    continue
                try:
                    text = shard._read(member).decode("utf-8")
                except UnicodeDecodeError:
                    log.debug("%s: skipping binary member %s", shard.path, member)
                    continue
                if col not in cols:
                    cols[col] = [None] * (n - 1)
                cols[col].append(text.rstrip("\r\n") if col == "caption" else text)
            for lst in cols.values():
                if len(lst) < n:
                    lst.append(None)
    if n == 0:
        raise ManifestError(path, None, "no samples in the shards")
    if "caption" in columns and "caption" not in cols:
        raise ManifestError(path, None, "no sample has a .txt caption")
    if "label" in columns and "label" not in cols:
        raise ManifestError(path, None, "no sample has a .cls label")
    table = _build_table(path, cols, None, columns=columns, store=store if check_images else None)
    return Manifest(table, "webdataset", path, store, _sha256(files))
