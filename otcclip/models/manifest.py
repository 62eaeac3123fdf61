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
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from otcclip.models.atomic import atomic_write, replace_dir
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
    DirImageStore,
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
    "write_dataset",
    "write_manifest",
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
_WDS_EXTS = {v: k for k, v in _WDS_COLUMNS.items()}


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
                strs.append(v if isinstance(v, str) else _to_str(v))
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


def _to_str(v: Any) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _extra_array(values: list[Any]) -> pa.Array:
    """An extra column in its original types when Arrow can hold them, else as strings."""
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError):
        return pa.array([None if v is None else _to_str(v) for v in values], type=pa.string())


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


def _split_key(name: str) -> tuple[str, str]:
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
            key, ext = _split_key(member)
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


# ---------------------------------------------------------------- writers


def _atomic_file(out: Path, write: Callable[[Path], None]) -> Path:
    return atomic_write(out, lambda tmp: write(Path(tmp)))


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return _to_str(v)


def _write_text_table(table: pa.Table, tmp: Path, *, delimiter: str) -> None:
    names = table.column_names
    data = [table.column(c).to_pylist() for c in names]
    with tmp.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        w.writerow(names)
        for row in zip(*data, strict=True):
            w.writerow([_cell(v) for v in row])


def _write_jsonl(table: pa.Table, tmp: Path) -> None:
    with tmp.open("w", encoding="utf-8") as f:
        for rec in table.to_pylist():
            f.write(json.dumps(rec, ensure_ascii=False, default=str))
            f.write("\n")


def write_manifest(like: Manifest, table: pa.Table, out_path: str | Path) -> Path:
    """Write ``table`` in ``like``'s format to ``out_path`` atomically; extra columns kept.

    For CSV/TSV/JSONL/Parquet the ``image`` column is written as is (paths relative to
    ``like``'s image root; read it back with ``images=`` if ``out_path`` is elsewhere). For
    WebDataset, ``out_path`` is a ``.tar`` file (one shard) or a directory (shards of
    10,000 samples); images are copied from ``like.images`` (references ``shard#member``)
    or, for a plain relative path, from a file below ``out_path``'s directory (e.g. a
    poisoned image written there first); each row's caption, label and extra columns
    become ``KEY.txt``, ``KEY.cls`` and ``KEY.<column>``.

    Returns
    -------
    Path
        ``out_path``.
    """
    out = Path(out_path)
    if like.format != "webdataset":
        return _write(like, table, out, like.images.read_bytes)
    local: list[DirImageStore] = []

    def image_bytes(ref: str) -> bytes:
        if "#" in ref:
            return like.images.read_bytes(ref)
        if not local:  # a new image written beside the output (e.g. by poisoning)
            local.append(DirImageStore(out.parent))
        return local[0].read_bytes(ref)

    return _write(like, table, out, image_bytes)


def _write(like: Manifest, table: pa.Table, out: Path, image_bytes: Callable[[str], bytes]) -> Path:
    fmt = like.format
    if fmt == "csv":
        return _atomic_file(out, lambda t: _write_text_table(table, t, delimiter=","))
    if fmt == "tsv":
        return _atomic_file(out, lambda t: _write_text_table(table, t, delimiter="\t"))
    if fmt == "jsonl":
        return _atomic_file(out, lambda t: _write_jsonl(table, t))
    if fmt == "parquet":
        return _atomic_file(out, lambda t: pq.write_table(table, t))
    if fmt == "webdataset":
        return _write_webdataset(table, out, image_bytes)
    raise ManifestError(like.path, None, f"cannot write format {fmt!r}")


def _wds_key(out: Path, row: int, key: Any) -> str:
    try:
        k = safe_relpath(str(key))
    except UnsafePath as e:
        raise ManifestError(out, row, f"id {key!r} cannot be a WebDataset key: {e}") from e
    if "." in k.rsplit("/", 1)[-1]:
        raise ManifestError(out, row, f"id {key!r} cannot be a WebDataset key (it contains a dot)")
    return k


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def _write_shard(table: pa.Table, rows: range, tmp: Path, out: Path, image_bytes: Callable[[str], bytes]) -> None:
    names = table.column_names
    extras = [c for c in names if c not in ("id", "image")]
    cols = {c: table.column(c).to_pylist()[rows.start : rows.stop] for c in names}
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for j, i in enumerate(rows):
            key = _wds_key(out, i + 1, cols["id"][j])
            ref = cols["image"][j]
            member = ref.partition("#")[2] if "#" in ref else ref
            try:
                ext = _split_key(safe_relpath(member))[1].rsplit(".", 1)[-1] or "jpg"
                data = image_bytes(ref)
            except (FileNotFoundError, UnsafePath, OSError) as e:
                raise ManifestError(out, i + 1, f"cannot copy image {ref!r}: {e}") from e
            _add(tf, f"{key}.{ext}", data)
            for c in extras:
                v = cols[c][j]
                if v is None:
                    continue
                _add(tf, f"{key}.{_WDS_EXTS.get(c, c)}", _cell(v).encode("utf-8"))


def _write_webdataset(table: pa.Table, out: Path, image_bytes: Callable[[str], bytes], shard_size: int = 10_000) -> Path:
    for c in ("id", "image"):
        if c not in table.column_names:
            raise ManifestError(out, None, f"table has no {c!r} column")
    n = table.num_rows
    if out.suffix == ".tar":
        return _atomic_file(out, lambda t: _write_shard(table, range(n), t, out, image_bytes))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for s, start in enumerate(range(0, max(n, 1), shard_size)):
            shard = tmpdir / f"shard-{s:06d}.tar"
            _write_shard(table, range(start, min(n, start + shard_size)), shard, out, image_bytes)
        replace_dir(tmpdir, out)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return out


def write_dataset(
    like: Manifest,
    table: pa.Table,
    out_dir: str | Path,
    *,
    new_images: Mapping[str, bytes] | None = None,
    name: str | None = None,
) -> Path:
    """Materialise ``table`` as a self-contained dataset in ``out_dir`` (images + manifest).

    Every image referenced by ``table`` is written below ``out_dir`` at its relative path
    (from ``new_images[ref]`` when given, else copied from ``like.images``), then the
    manifest is written last, in ``like``'s format, as ``out_dir / (name or like.path.name)``.
    For WebDataset the images go inside the shards. Use it e.g. to add poisoned images.

    Returns
    -------
    Path
        The new manifest, readable with ``read_manifest(path)`` (images beside it).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(new_images or {})

    def image_bytes(ref: str) -> bytes:
        return extra[ref] if ref in extra else like.images.read_bytes(ref)

    target = out_dir / (name or like.path.name)
    if like.format == "webdataset":
        return _write(like, table, target, image_bytes)
    root = os.path.realpath(out_dir)
    done: set[str] = set()
    for i, ref in enumerate(table.column("image").to_pylist()):
        if ref in done:
            continue
        done.add(ref)
        try:
            rel = safe_relpath(ref)
            data = image_bytes(ref)
        except (UnsafePath, FileNotFoundError, OSError) as e:
            raise ManifestError(target, i + 1, f"cannot copy image {ref!r}: {e}") from e
        dest = Path(root) / rel
        if not os.path.realpath(dest).startswith(root + os.sep):
            raise ManifestError(target, i + 1, f"image path {ref!r} resolves outside {out_dir}")
        _atomic_file(dest, lambda t, d=data: t.write_bytes(d))  # type: ignore[misc]
    return _write(like, table, target, image_bytes)
