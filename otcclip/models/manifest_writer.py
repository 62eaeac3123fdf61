"""Writing manifests in the format of the one they came from (csv / tsv / jsonl /
parquet / WebDataset), atomically: a cleaned or poisoned manifest, and a whole dataset
with new images (WebDataset: images go inside the shards). Reading is
:mod:`otcclip.models.manifest`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from otcclip.models.atomic import UMASK, atomic_write, replace_dir
from otcclip.models.images import UnsafePath, safe_relpath
from otcclip.models.manifest import (
    EMBEDDED_PREFIX,
    WDS_EXTS,
    EmbeddedImageStore,
    Manifest,
    ManifestError,
    split_key,
    to_str,
)
from otcclip.models.stores import DirImageStore, ShardImageStore

log = logging.getLogger(__name__)

#: Provenance columns a cleaned manifest carries (written by :mod:`otcclip.models.report`).
#: WebDataset samples carry them as keys of their ``.json`` member (no new members).
PROVENANCE = ("original_caption", "otcclip_action", "otcclip_reason", "otcclip_p_clean", "otcclip_review",
              "otcclip_review_reason")
#: Folder of the output directory that ``--copy-images`` copies images to.
COPIED_IMAGES = "images"


def _atomic_file(out: Path, write: Callable[[Path], None]) -> Path:
    return atomic_write(out, lambda tmp: write(Path(tmp)))


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return to_str(v)


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


def input_columns(like: Manifest, table: pa.Table) -> pa.Table:
    """``table`` with the input's own columns back: embedded images as bytes, mapped names restored.

    Parameters
    ----------
    like : Manifest
        The manifest ``table`` derives from (its ``source_names`` and image store).
    table : pyarrow.Table
        Key columns ``id``/``image``/``caption`` as :func:`~otcclip.models.manifest.read_manifest` makes them.
    """
    store = like.images
    if isinstance(store, EmbeddedImageStore) and "image" in table.column_names:
        refs = table.column("image").to_pylist()
        if store.kind == "binary":
            arr = pa.array([None if r is None else store.read_bytes(r) for r in refs], pa.binary())
        else:
            def cell(r: str | None) -> dict[str, Any] | None:
                if r is None:
                    return None
                if r.startswith(EMBEDDED_PREFIX):
                    return {"bytes": store.read_bytes(r), "path": store.embedded_path(r)}
                return {"bytes": None, "path": r}

            arr = pa.array([cell(r) for r in refs], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = table.set_column(table.column_names.index("image"), "image", arr)
        if store.column != "image":
            table = table.rename_columns([store.column if c == "image" else c for c in table.column_names])
    renames = {k: v for k, v in like.source_names.items() if k != "image" or not isinstance(store, EmbeddedImageStore)}
    if renames:
        table = table.rename_columns([renames.get(c, c) for c in table.column_names])
    return table


def _write(like: Manifest, table: pa.Table, out: Path, image_bytes: Callable[[str], bytes]) -> Path:
    fmt = like.format
    if fmt != "webdataset":
        table = input_columns(like, table)
    if fmt == "csv":
        return _atomic_file(out, lambda t: _write_text_table(table, t, delimiter=","))
    if fmt == "tsv":
        return _atomic_file(out, lambda t: _write_text_table(table, t, delimiter="\t"))
    if fmt == "jsonl":
        return _atomic_file(out, lambda t: _write_jsonl(table, t))
    if fmt == "parquet":
        return _atomic_file(out, lambda t: pq.write_table(table, t))
    if fmt == "webdataset":
        names = sorted(like.images.shards) if isinstance(like.images, ShardImageStore) else None
        return _write_webdataset(table, out, image_bytes, shard_names=names)
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


def _json_member(text: str, row: dict[str, Any]) -> str:
    """A sample's ``.json`` with its ``caption`` (when it has one) and the provenance keys set from ``row``."""
    try:
        obj = json.loads(text)
    except ValueError:
        return text
    if not isinstance(obj, dict):
        return text
    if "caption" in obj and row.get("caption") is not None:
        obj["caption"] = row["caption"]
    for c in PROVENANCE:
        if c in row:
            obj[c] = row[c]
    return json.dumps(obj, ensure_ascii=False)


def _write_shard(table: pa.Table, rows: range | list[int], tmp: Path, out: Path, image_bytes: Callable[[str], bytes]) -> None:
    names = table.column_names
    extras = [c for c in names if c not in ("id", "image") and c not in PROVENANCE]
    data = {c: table.column(c).to_pylist() for c in names}
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for i in rows:
            key = _wds_key(out, i + 1, data["id"][i])
            ref = data["image"][i]
            member = ref.partition("#")[2] if "#" in ref else ref
            try:
                ext = split_key(safe_relpath(member))[1] or "jpg"
                blob = image_bytes(ref)
            except (FileNotFoundError, UnsafePath, OSError) as e:
                raise ManifestError(out, i + 1, f"cannot copy image {ref!r}: {e}") from e
            _add(tf, f"{key}.{ext}", blob)
            for c in extras:
                v = data[c][i]
                if v is None:
                    continue
                text = _cell(v)
                if c == "json":
                    text = _json_member(text, {k: data[k][i] for k in ("caption", *PROVENANCE) if k in data})
                _add(tf, f"{key}.{WDS_EXTS.get(c, c)}", text.encode("utf-8"))


def _input_shards(table: pa.Table) -> dict[str, list[int]] | None:
    """Rows grouped by the input shard their image comes from (``shard.tar#member``), or None if any is not."""
    groups: dict[str, list[int]] = {}
    for i, ref in enumerate(table.column("image").to_pylist()):
        shard, sep, _ = (ref or "").partition("#")
        if not sep or "/" in shard or not shard.endswith(".tar"):
            return None
        groups.setdefault(shard, []).append(i)
    return groups


def _write_webdataset(table: pa.Table, out: Path, image_bytes: Callable[[str], bytes], shard_size: int = 10_000,
                      shard_names: list[str] | None = None) -> Path:
    for c in ("id", "image"):
        if c not in table.column_names:
            raise ManifestError(out, None, f"table has no {c!r} column")
    n = table.num_rows
    if out.suffix == ".tar":
        return _atomic_file(out, lambda t: _write_shard(table, range(n), t, out, image_bytes))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        groups = _input_shards(table)
        if groups is not None:  # keep the input's shard names (shards left empty are written empty)
            for name in shard_names or []:
                groups.setdefault(name, [])
            for name, rows in groups.items():
                _write_shard(table, rows, tmpdir / name, out, image_bytes)
        else:
            for s, start in enumerate(range(0, max(n, 1), shard_size)):
                shard = tmpdir / f"shard-{s:06d}.tar"
                _write_shard(table, range(start, min(n, start + shard_size)), shard, out, image_bytes)
        for f in tmpdir.iterdir():
            os.chmod(f, 0o666 & ~UMASK)
        replace_dir(tmpdir, out)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return out


def relocate_images(like: Manifest, table: pa.Table, out_dir: str | Path, *, copy: bool = False) -> pa.Table:
    """``table`` with image references that resolve from ``out_dir`` (a cleaned manifest's folder).

    WebDataset images travel inside the shards and embedded images inside the table, so
    those references stay. Otherwise, with ``copy`` each image is copied to
    ``out_dir/images/<ref>`` and referenced there; without it, images in a directory are
    referenced by their path relative to ``out_dir`` (``../data/img/1.jpg``, read back on the
    command line, which allows ``..``), and images in an archive keep their references (read
    the cleaned manifest with ``images=`` the archive, or copy).
    """
    if like.format == "webdataset" or "image" not in table.column_names:
        return table
    out = Path(out_dir)
    store = like.images
    fallback = store.fallback if isinstance(store, EmbeddedImageStore) else store
    refs = table.column("image").to_pylist()
    new: list[str | None] = []
    if copy:
        for ref in refs:
            if ref is None or ref.startswith(EMBEDDED_PREFIX):
                new.append(ref)
                continue
            try:
                data = fallback.read_bytes(ref)
            except (FileNotFoundError, OSError, UnsafePath) as e:
                log.warning("cannot copy image %s: %s", ref, e)
                new.append(ref)
                continue
            rel = f"{COPIED_IMAGES}/{posixpath.normpath(ref).replace('../', '')}"
            atomic_write(out / rel, lambda t, d=data: Path(t).write_bytes(d))  # type: ignore[misc]
            new.append(rel)
    elif isinstance(fallback, DirImageStore):
        root = os.path.abspath(fallback.root)
        base = os.path.abspath(out)
        for ref in refs:
            if ref is None or ref.startswith(EMBEDDED_PREFIX):
                new.append(ref)
            else:
                new.append(Path(os.path.relpath(os.path.join(root, ref), base)).as_posix())
    else:
        log.info("images stay in %s: read the cleaned manifest with images=%s (or copy the images)",
                 fallback.source, fallback.source)
        return table
    return table.set_column(table.column_names.index("image"), "image", pa.array(new, pa.string()))


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
