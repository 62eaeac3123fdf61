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
import os
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
    source_names : mapping of str to str
        Input column name of each renamed key column (``{"caption": "text"}``), so that the
        writer gives the columns their input names back.
    """

    table: pa.Table
    format: str
    path: Path
    images: ImageStore
    sha256: str
    source_names: Mapping[str, str] = field(default_factory=dict)

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
        if any(f.suffix == ".tar" for f in p.iterdir()):
            return "webdataset"
        if any(f.suffix in (".parquet", ".pq") for f in p.iterdir()):
            return "parquet"
        raise ManifestError(p, None, "directory holds no .tar shards (WebDataset) and no .parquet files")
    fmt = _SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise ManifestError(p, None, f"unknown manifest format {p.suffix!r} (expected one of "
                            f"{', '.join(sorted(_SUFFIXES))} or a directory of .tar shards)")
    return fmt


@dataclass(frozen=True)
class ColumnMapping:
    """Which input columns hold the key columns (``--image-col``, ``--caption-col``, ``--id-col``).

    A column given here is renamed to its key name when read and gets its input name back
    when the cleaned manifest is written. Columns left None are found by the usual names,
    then by the layouts of known exporters: ``text`` for the caption (Hugging Face), ``key``
    for the id and ``{shard}/{key}.jpg`` or a ``jpg`` bytes column for the image
    (img2dataset).
    """

    image: str | None = None
    caption: str | None = None
    id: str | None = None

    @classmethod
    def of(cls, value: ColumnMapping | Mapping[str, str | None] | None) -> ColumnMapping:
        """A mapping from ``value`` (a ColumnMapping, a dict with keys image/caption/id, or None)."""
        if value is None:
            return cls()
        if isinstance(value, ColumnMapping):
            return value
        unknown = set(value) - {"image", "caption", "id"}
        if unknown:
            raise ValueError(f"unknown key column(s) {sorted(unknown)} in the column mapping (expected image, caption, id)")
        return cls(**{k: (v or None) for k, v in value.items()})

    def to_dict(self) -> dict[str, str]:
        """The columns given (JSON-ready, empty when none)."""
        return {k: v for k, v in (("image", self.image), ("caption", self.caption), ("id", self.id)) if v}


#: img2dataset marks downloaded rows with this ``status``; other rows have no image.
IMG2DATASET_SUCCESS = "success"
#: Prefix of the references of images stored inside the manifest (Parquet bytes).
EMBEDDED_PREFIX = "@embedded/"


class EmbeddedImageStore(ImageStore):
    """Images stored as bytes in a manifest column (Hugging Face ``image`` struct, img2dataset ``jpg``).

    References are ``"@embedded/<row>"``; other references are resolved by ``fallback``
    (e.g. the ``path`` of a struct whose ``bytes`` are null).

    Attributes
    ----------
    column : str
        The input column holding the bytes.
    kind : str
        ``"struct"`` (``{bytes, path}``) or ``"binary"``.
    """

    def __init__(self, data: Sequence[bytes | None], paths: Sequence[str | None], *, column: str, kind: str,
                 fallback: ImageStore, source: str) -> None:
        self._data = list(data)
        self._paths = list(paths)
        self.column = column
        self.kind = kind
        self.fallback = fallback
        self.source = source

    @staticmethod
    def ref(row: int) -> str:
        """The reference of embedded image ``row``."""
        return f"{EMBEDDED_PREFIX}{row}"

    def _index(self, ref: str) -> int | None:
        if not ref.startswith(EMBEDDED_PREFIX):
            return None
        try:
            i = int(ref[len(EMBEDDED_PREFIX):])
        except ValueError:
            return None
        return i if 0 <= i < len(self._data) and self._data[i] is not None else None

    def exists(self, ref: str) -> bool:
        if ref.startswith(EMBEDDED_PREFIX):
            return self._index(ref) is not None
        return self.fallback.exists(ref)

    def read_bytes(self, ref: str) -> bytes:
        if ref.startswith(EMBEDDED_PREFIX):
            i = self._index(ref)
            if i is None:
                raise FileNotFoundError(f"{self.source}: no embedded image {ref!r}")
            data = self._data[i]
            assert data is not None
            return data
        return self.fallback.read_bytes(ref)

    def embedded_path(self, ref: str) -> str | None:
        """The ``path`` field stored beside embedded image ``ref`` (None if none)."""
        i = self._index(ref)
        return None if i is None else self._paths[i]

    def close(self) -> None:
        self.fallback.close()


class LocalDirImageStore(DirImageStore):
    """A directory store that also follows references up from its root (``../images/x.jpg``).

    For the command line only, reading the user's own files (e.g. a cleaned manifest in an
    output folder pointing back at the input's images); never for uploads. URLs, absolute
    paths and NUL bytes are still refused.
    """

    def _key(self, ref: str) -> str:
        if ".." not in ref.replace("\\", "/").split("/"):
            return safe_relpath(ref)
        safe_relpath(ref.replace("..", "_"))  # everything but the '..' components is checked
        return posixpath.normpath(ref.replace("\\", "/"))

    def _path(self, key: str) -> str:
        return os.path.realpath(os.path.join(self._real, key))

    def _has(self, key: str) -> bool:
        if key.startswith("../"):
            return os.path.isfile(self._path(key))
        return super()._has(key)


def read_manifest(
    path: str | Path,
    *,
    images: str | Path | None = None,
    columns: Sequence[str] = ("image", "caption"),
    mapping: ColumnMapping | Mapping[str, str | None] | None = None,
    limits: ArchiveLimits = DEFAULT_LIMITS,
    check_images: bool = True,
    local: bool = False,
) -> Manifest:
    """Read and validate a manifest.

    Parameters
    ----------
    path : path
        A ``.csv``, ``.tsv``, ``.jsonl``, ``.parquet`` file, a WebDataset ``.tar`` shard, a
        directory of ``*.tar`` shards, or a directory of ``*.parquet`` files (read as one
        table with ``pyarrow.dataset``; an img2dataset output folder is either of the two).
    images : path, optional
        Where the ``image`` paths are resolved: None -> the manifest's directory (the
        directory itself for a directory of Parquet files); a directory; or a ``.zip`` /
        ``.tar`` / ``.tar.gz`` archive. Ignored for WebDataset.
    columns : sequence of str
        Required columns, e.g. ``("image", "caption")`` or ``("image", "label")``.
    mapping : ColumnMapping or dict, optional
        Input columns holding ``image``, ``caption`` and ``id`` (see :class:`ColumnMapping`).
    limits : ArchiveLimits
        Caps for archives (zip bombs).
    check_images : bool
        Check that every image exists (no decoding).
    local : bool
        The user's own files (the command line): image paths in a directory may go up
        from it with ``..`` (a cleaned manifest in an output folder points back at the
        input's images that way). Never set it for uploaded data.

    Notes
    -----
    Rows with a ``status`` other than ``"success"`` in a table with ``key`` and ``status``
    columns (img2dataset's failed downloads) are skipped. An ``image`` column of Parquet
    binary or ``{bytes, path}`` structs holds the images themselves: they are served by an
    :class:`EmbeddedImageStore`. A ``caption`` column must be non-empty on every row.

    Raises
    ------
    ManifestError
        Missing column, empty value, unsafe or missing image path, duplicate id, unparsable
        file, refused archive.
    """
    p = Path(path)
    if not p.exists():
        raise ManifestError(p, None, "manifest not found")
    try:
        cmap = ColumnMapping.of(mapping)
    except (TypeError, ValueError) as e:
        raise ManifestError(p, None, str(e)) from e
    fmt = detect_format(p)
    if fmt == "webdataset":
        return _read_webdataset(p, columns=columns, mapping=cmap, limits=limits, check_images=check_images)
    root = images if images is not None else (p if p.is_dir() else p.parent)
    try:
        store = LocalDirImageStore(root) if local and Path(root).is_dir() else open_store(Path(root), limits=limits)
    except (ArchiveError, FileNotFoundError) as e:
        raise ManifestError(images if images is not None else p, None, str(e)) from e
    files = [p]
    if fmt in ("csv", "tsv"):
        cols, locs = _read_csv(p, delimiter="\t" if fmt == "tsv" else ",")
    elif fmt == "jsonl":
        cols, locs = _read_jsonl(p)
    else:
        cols, locs, files = _read_parquet(p)
    cols, locs = _successful(cols, locs)
    cols, renamed, store = _map_columns(p, cols, locs, cmap, store=store, files=files)
    table = _build_table(p, cols, locs, columns=columns, store=store if check_images else None,
                         keycheck=store._key if local else safe_relpath)
    return Manifest(table, fmt, p, store, _sha256(files), source_names=renamed)


#: Where a row came from: ``(file, row number)`` as :class:`ManifestError` reports it.
Locs = list[tuple[Path, int]]


def _take(values: Any, keep: Sequence[int]) -> Any:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.take(pa.array(keep, pa.int64()))
    return [values[i] for i in keep]


def _successful(cols: dict[str, Any], locs: Locs) -> tuple[dict[str, Any], Locs]:
    """Drop img2dataset rows whose download failed (``key`` and ``status`` columns, status not success)."""
    if "key" not in cols or "status" not in cols:
        return cols, locs
    status = cols["status"]
    values = status.to_pylist() if isinstance(status, (pa.Array, pa.ChunkedArray)) else status
    keep = [i for i, v in enumerate(values) if v == IMG2DATASET_SUCCESS]
    if len(keep) == len(values):
        return cols, locs
    log.info("skipping %d of %d rows whose status is not %r", len(values) - len(keep), len(values), IMG2DATASET_SUCCESS)
    return {k: _take(v, keep) for k, v in cols.items()}, [locs[i] for i in keep]


def _is_bytes_type(t: pa.DataType) -> bool:
    return bool(pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t))


def _embedded_kind(values: Any) -> str | None:
    """``"struct"`` / ``"binary"`` when an Arrow column holds image bytes, else None."""
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        return None
    t = values.type
    if _is_bytes_type(t):
        return "binary"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_bytes_type(t.field("bytes").type):
        return "struct"
    return None


def _map_columns(
    path: Path, cols: dict[str, Any], locs: Locs, cmap: ColumnMapping, *, store: ImageStore, files: Sequence[Path]
) -> tuple[dict[str, Any], dict[str, str], ImageStore]:
    """Rename mapped (or recognised) input columns to ``id``/``image``/``caption``; embedded images to refs."""
    names = list(cols)
    given = {"image": cmap.image, "caption": cmap.caption, "id": cmap.id}
    flag = {"image": "--image-col", "caption": "--caption-col", "id": "--id-col"}
    for key, src in given.items():
        if src is None:
            continue
        if src not in cols:
            found = ", ".join(repr(c) for c in names) or "none"
            raise ManifestError(path, None, f"{flag[key]} {src!r}: no such column (found: {found})")
        if src != key and key in cols:
            raise ManifestError(path, None, f"{flag[key]} {src!r}: the manifest already has a column {key!r}; "
                                            f"rename one of them")
    # recognised layouts when not mapped explicitly
    if given["caption"] is None and "caption" not in cols and "text" in cols:
        given["caption"] = "text"
    if given["id"] is None and "id" not in cols and "key" in cols:
        given["id"] = "key"
    if given["image"] is None and "image" not in cols:
        if "jpg" in cols and _embedded_kind(cols["jpg"]) is not None:
            given["image"] = "jpg"
        elif "key" in cols:
            cols = dict(cols)
            cols["image"] = _img2dataset_paths(cols["key"], locs, files, store)
    out: dict[str, Any] = {}
    renamed: dict[str, str] = {}
    for name, values in cols.items():
        key = next((k for k, v in given.items() if v == name), name)
        if key != name:
            renamed[key] = name
        out[key] = values
    image = out.get("image")
    kind = _embedded_kind(image)
    if kind is not None:
        out["image"], store = _embed(path, image, kind, locs, column=renamed.get("image", "image"), fallback=store)
    elif isinstance(image, (pa.Array, pa.ChunkedArray)):
        out["image"] = image.to_pylist()
    return out, renamed, store


def _img2dataset_paths(keys: Any, locs: Locs, files: Sequence[Path], store: ImageStore) -> list[str | None]:
    """img2dataset ``files`` layout: ``{shard}/{key}.jpg`` beside ``{shard}.parquet`` (or ``{key}.jpg``)."""
    values = keys.to_pylist() if isinstance(keys, (pa.Array, pa.ChunkedArray)) else keys
    out: list[str | None] = []
    for key, (f, _) in zip(values, locs, strict=True):
        if key is None:
            out.append(None)
            continue
        cands = [f"{f.stem}/{key}.jpg", f"{key}.jpg"]
        ref = next((c for c in cands if _exists(store, c)), cands[0])
        out.append(ref)
    return out


def _exists(store: ImageStore, ref: str) -> bool:
    try:
        return store.exists(ref)
    except UnsafePath:
        return False


def _embed(path: Path, values: Any, kind: str, locs: Locs, *, column: str,
           fallback: ImageStore) -> tuple[list[str | None], EmbeddedImageStore]:
    """References for an image-bytes column and the store that serves them."""
    rows = values.to_pylist()
    data: list[bytes | None] = []
    paths: list[str | None] = []
    refs: list[str | None] = []
    for i, v in enumerate(rows):
        if kind == "binary":
            b, ref_path = v, None
        else:
            b, ref_path = (v or {}).get("bytes"), (v or {}).get("path")
        data.append(b if b else None)
        paths.append(ref_path)
        if b:
            refs.append(EmbeddedImageStore.ref(i))
        elif ref_path:
            refs.append(ref_path)
        else:
            f, row = locs[i]
            raise ManifestError(f, row, f"empty image (column {column!r} has neither bytes nor a path)")
    store = EmbeddedImageStore(data, paths, column=column, kind=kind, fallback=fallback, source=str(path))
    return refs, store


# ---------------------------------------------------------------- readers


def _read_csv(path: Path, *, delimiter: str) -> tuple[dict[str, Any], Locs]:
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
    return cols, [(path, r) for r in rownums]


def _read_jsonl(path: Path) -> tuple[dict[str, Any], Locs]:
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
    return cols, [(path, r) for r in rownums]


def _read_parquet(path: Path) -> tuple[dict[str, Any], Locs, list[Path]]:
    """A Parquet file or a directory of them (``pyarrow.dataset``, files in name order)."""
    import pyarrow.dataset as pads

    try:
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix in (".parquet", ".pq") and f.is_file())
            # one schema for all files (a column that is all-null in one shard is typed null there)
            schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
            dataset = pads.dataset([str(f) for f in files], format="parquet", schema=schema)
            parts = [(Path(frag.path), frag.to_table(schema=schema)) for frag in dataset.get_fragments()]
        else:
            files = [path]
            parts = [(path, pq.read_table(path))]
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(path, None, f"not a readable Parquet file ({e})") from e
    parts.sort(key=lambda fp: str(fp[0]))
    table = pa.concat_tables([t for _, t in parts]) if len(parts) > 1 else parts[0][1]
    locs: Locs = [(f, r) for f, t in parts for r in range(1, t.num_rows + 1)]
    cols: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        cols[name] = col.to_pylist() if name in _STRING_COLUMNS and _embedded_kind(col) is None else col
    return cols, locs, files


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _build_table(
    path: Path,
    cols: Mapping[str, Any],
    locs: Locs,
    *,
    columns: Sequence[str],
    store: ImageStore | None,
    keycheck: Callable[[str], str] = safe_relpath,
) -> pa.Table:
    """Validate rows and assemble the Arrow table (string key columns first, extras after)."""
    missing = [c for c in columns if c not in cols]
    if missing:
        found = ", ".join(repr(c) for c in cols) or "none"
        raise ManifestError(path, None, f"missing required column(s) {', '.join(repr(c) for c in missing)} (found: {found})")
    n = len(next(iter(cols.values()))) if cols else 0
    if n == 0:
        raise ManifestError(path, None, "manifest has no rows")

    def err(i: int, reason: str) -> ManifestError:
        return ManifestError(locs[i][0], locs[i][1], reason)

    out: dict[str, pa.Array] = {}
    for name in _STRING_COLUMNS:
        if name not in cols:
            continue
        values = cols[name]
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            values = values.to_pylist()
        required = name in columns or name in ("id", "image", "caption")
        strs: list[str | None] = []
        for i, v in enumerate(values):
            if _empty(v):
                if required:
                    raise err(i, f"empty {name}" + (" (every pair needs a caption)" if name == "caption" else ""))
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
            raise err(i, f"duplicate id {key!r} (first at row {seen[key]})")
        seen[key] = locs[i][1]
    if "image" in out:
        for i, ref in enumerate(out["image"].to_pylist()):
            try:
                keycheck(ref)
                if store is not None and not store.exists(ref):
                    raise err(i, f"image {ref!r} not found in {store.source}")
            except UnsafePath as e:
                raise err(i, str(e)) from e
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
    path: Path, *, columns: Sequence[str], mapping: ColumnMapping, limits: ArchiveLimits, check_images: bool
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
    locs: Locs = []
    n = 0
    for shard_name, shard in shards.items():
        samples: dict[str, dict[str, str]] = {}
        for member in shard.names():
            key, ext = split_key(member)
            if ext:
                samples.setdefault(key, {})[ext] = member
        for key, members in samples.items():
            n += 1
            locs.append((path, n))
            img_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if img_ext is None:
                raise ManifestError(shard.path, n, f"sample {key!r} has no image member (.{'/.'.join(IMAGE_EXTENSIONS)})")
            cols["id"].append(key)
            cols["image"].append(f"{shard_name}#{members[img_ext]}")
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
    if mapping.caption is not None:
        if mapping.caption not in cols:
            raise ManifestError(path, None, f"--caption-col {mapping.caption!r}: no sample has a .{mapping.caption} member")
        cols["caption"] = [None if v is None else v.rstrip("\r\n") for v in cols.pop(mapping.caption)]
    if "caption" in columns and "caption" not in cols:
        raise ManifestError(path, None, "no sample has a .txt caption")
    if "label" in columns and "label" not in cols:
        raise ManifestError(path, None, "no sample has a .cls label")
    table = _build_table(path, cols, locs, columns=columns, store=store if check_images else None)
    renamed = {"caption": mapping.caption} if mapping.caption is not None else {}
    return Manifest(table, "webdataset", path, store, _sha256(files), source_names=renamed)
