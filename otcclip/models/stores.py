"""Where a manifest's images come from: a directory, a zip / tar / tar.gz archive, WebDataset shards.

Every store resolves *relative* references only. A directory store refuses absolute
paths, ``..`` escapes and paths that resolve (through symlinks) outside its root. An
archive store checks the whole archive when it is opened and refuses it (raising
:class:`~otcclip.models.images.ArchiveError`, naming the member) if any member is a
symlink, hard link, device or fifo, has an absolute or ``..`` name, or if the archive
breaks the :class:`~otcclip.models.images.ArchiveLimits` (member count, total
uncompressed size, per-member size, compression ratio: zip bombs).

Members are read lazily with ``os.pread`` at the offsets indexed at open time (zip members
are then decompressed and checked against their size and CRC-32). Compressed tars
(gzip / bzip2 / xz) are decompressed once into a temporary plain ``.tar`` (deleted when the
store is closed or collected) and then read lazily the same way; nothing is ever extracted
as loose files. The size cap and the compression ratio are checked *while* decompressing
(against the compressed bytes consumed so far), so a decompression bomb is stopped after a
few megabytes rather than after it has been written out; :func:`decompress_tar` does the
same into a file of the caller's choosing (the service stores uploads as plain tars).

The index of a zip or plain tar (member names, offsets, sizes) is built once per process and
archive version (path, size, modification time, limits) and reused by every later store
on the same file (:data:`INDEX_CACHE_SIZE` archives are kept). :meth:`ImageStore.save_index`
also stores it beside the archive (``<archive>.index``, see :func:`index_path`), keyed to the
archive's size, modification time, first and last 64 KiB and the limits it was checked
against; a store opened on an archive with a matching index loads it instead of parsing
the archive (a 200,000-member zip: tens of milliseconds instead of seconds), and one whose
index no longer matches (the archive was replaced) parses the archive and rewrites it.
Zip members are then read straight from the file at the indexed offsets (stored, deflate
and bzip2 members; their size and CRC-32 checked), so no process ever parses the central
directory again.

Every store decodes images with the pixel cap of its limits (``max_image_pixels``).
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import json
import logging
import lzma
import os
import stat
import struct
import tarfile
import tempfile
import threading
import weakref
import zipfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from otcclip.models.atomic import atomic_write
from otcclip.models.images import (
    DEFAULT_LIMITS,
    ArchiveError,
    ArchiveLimits,
    UnreadableImage,
    UnsafePath,
    decode_image,
    safe_relpath,
)

log = logging.getLogger(__name__)


class ImageStore:
    """Where a manifest's images come from. Subclasses implement ``_read`` and ``_has``.

    ``open(ref)`` returns an RGB PIL image or raises :class:`UnreadableImage` (also for a
    missing file, so a broken row never stops a run) or :class:`UnsafePath`.
    """

    #: A human-readable description of the source (a directory or archive path).
    source: str = ""
    #: Images with more pixels are unreadable (checked from the header, before decoding).
    max_pixels: int = DEFAULT_LIMITS.max_image_pixels

    def exists(self, ref: str) -> bool:
        """Whether ``ref`` names a readable member/file (no decoding); raises :class:`UnsafePath`."""
        return self._has(self._key(ref))

    def read_bytes(self, ref: str) -> bytes:
        """The raw bytes behind ``ref``; ``FileNotFoundError`` if absent."""
        key = self._key(ref)
        if not self._has(key):
            raise FileNotFoundError(f"{self.source}: no image {ref!r}")
        return self._read(key)

    def open(self, ref: str) -> Image.Image:
        """Decode the image behind ``ref`` to RGB; :class:`UnreadableImage` if it cannot."""
        try:
            data = self.read_bytes(ref)
        except (FileNotFoundError, OSError) as e:
            raise UnreadableImage(f"{ref}: {e}") from e
        return decode_image(data, name=ref, max_pixels=self.max_pixels)

    def close(self) -> None:
        """Release handles and temporary files (the store may not be used afterwards)."""

    def save_index(self) -> list[Path]:
        """Store the member index of each archive behind this store beside it (see the
        module docstring); returns the files written (none for a directory, or a
        compressed tar that was decompressed into a temporary file)."""
        return []

    def _key(self, ref: str) -> str:
        return safe_relpath(ref)

    def _has(self, key: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, key: str) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DirImageStore(ImageStore):
    """Image files below ``root``; symlinks are followed only if they stay inside ``root``."""

    def __init__(self, root: str | Path, *, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
        self.root = Path(root)
        self.max_pixels = limits.max_image_pixels
        if not self.root.is_dir():
            raise FileNotFoundError(f"image directory {self.root} does not exist")
        self._real = os.path.realpath(self.root)
        self._parents: dict[str, str] = {}
        self.source = str(self.root)

    def _path(self, key: str) -> str:
        real = os.path.realpath(os.path.join(self._real, key))
        if not real.startswith(self._real + os.sep):
            raise UnsafePath(f"image path {key!r} resolves outside the dataset directory {self.root}")
        return real

    def _has(self, key: str) -> bool:
        # Fast path for validation: resolve each parent directory once (cached), then one
        # lstat per file; a file that is itself a symlink gets the full realpath check.
        head, _, base = key.rpartition("/")
        parent = self._parents.get(head)
        if parent is None:
            parent = os.path.realpath(os.path.join(self._real, head))
            if parent != self._real and not parent.startswith(self._real + os.sep):
                raise UnsafePath(f"image path {key!r} resolves outside the dataset directory {self.root}")
            self._parents[head] = parent
        try:
            st = os.lstat(os.path.join(parent, base))
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode):
            return os.path.isfile(self._path(key))
        return stat.S_ISREG(st.st_mode)

    def _read(self, key: str) -> bytes:
        with open(self._path(key), "rb") as f:
            return f.read()


def _member_name(name: str, archive: str) -> str:
    """Validate and normalise an archive member name (raise :class:`ArchiveError`)."""
    try:
        key = safe_relpath(name)
    except UnsafePath as e:
        raise ArchiveError(f"{archive}: member {name!r} refused: {e}") from e
    return key


class _Indexed(ImageStore):
    """Shared lookup for archive stores: normalised member names, optional common top folder.

    ``_names`` maps each normalised name to its row of ``_table`` (an int64 array whose
    columns :attr:`COLUMNS` name); ``_kind`` is the archive kind in the index files.
    """

    _names: dict[str, Any]
    _prefix: str
    _table: np.ndarray
    _keys: list[str]
    _kind: str = ""
    path: Path
    limits: ArchiveLimits

    #: The columns of the index table (one row per regular-file member).
    COLUMNS: tuple[str, ...] = ()

    def _set_prefix(self) -> None:
        tops = {k.split("/", 1)[0] for k in self._names}
        self._prefix = ""
        if len(tops) == 1 and all("/" in k for k in self._names):
            self._prefix = next(iter(tops)) + "/"

    def _has(self, key: str) -> bool:
        return key in self._names or (bool(self._prefix) and self._prefix + key in self._names)

    def _entry(self, key: str) -> Any:
        if key in self._names:
            return self._names[key]
        return self._names[self._prefix + key]

    def names(self) -> list[str]:
        """Normalised names of the regular-file members."""
        return list(self._names)

    def _open_index(self, plain: Path, key: tuple[Any, ...] | None, parse: Callable[[], tuple[list[str], np.ndarray]]) -> None:
        """Fill ``_names``/``_prefix``/``_table`` of the archive ``plain``: from the process
        cache, else from its index file, else by ``parse()`` (keys in row order, table)."""
        hit = _cached_index(key)
        if hit is not None:
            self._names, self._prefix, self._table, self._keys = hit
            INDEX_COUNTS["cached"] += 1
            return
        side = index_path(plain) if plain == self.path else None
        loaded = _load_index(side, plain, self._kind, self.limits) if side is not None else None
        if loaded is not None:
            keys, self._table, self._prefix = loaded
            self._names = dict(zip(keys, range(len(keys)), strict=True))
            INDEX_COUNTS["loaded"] += 1
        else:
            keys, self._table = parse()
            self._names = dict(zip(keys, range(len(keys)), strict=True))
            self._set_prefix()
            INDEX_COUNTS["parsed"] += 1
        self._keys = keys
        _remember_index(key, (self._names, self._prefix, self._table, keys))
        if loaded is None and side is not None and side.exists():
            log.info("%s: its index file does not match the archive (replaced?); rebuilt", plain)
            try:
                self.save_index()
            except OSError as e:  # a read-only volume: the archive is parsed on each open
                log.warning("%s: could not rewrite its index file (%s)", plain, e)

    def save_index(self) -> list[Path]:
        plain = getattr(self, "_plain", self.path)
        if plain != self.path:
            return []
        return [_write_index(index_path(self.path), self.path, self._kind, self.limits, self._keys, self._table,
                             self._prefix)]


#: Archives whose index is kept per process (most recently used first out last).
INDEX_CACHE_SIZE = 8
#: ``(names -> row, common top folder, table, names in row order)`` per archive version.
_IndexEntry = tuple[dict[str, int], str, np.ndarray, list[str]]
_INDEX_CACHE: OrderedDict[tuple[Any, ...], _IndexEntry] = OrderedDict()
_INDEX_LOCK = threading.Lock()
#: How archive indexes were obtained in this process: ``parsed`` (the archive was read),
#: ``loaded`` (from its index file), ``cached`` (from the process cache).
INDEX_COUNTS: Counter[str] = Counter()
#: Version of the index file layout; files of another version are ignored (and rewritten).
INDEX_FORMAT = 1
#: Suffix of the index file stored beside an archive.
INDEX_SUFFIX = ".index"
_PROBE = 64 << 10


def clear_index_cache() -> None:
    """Forget the archive indexes of this process (the next open loads or parses again)."""
    with _INDEX_LOCK:
        _INDEX_CACHE.clear()


def index_path(archive: str | Path) -> Path:
    """The index file of ``archive``: ``<archive>.index`` beside it."""
    archive = Path(archive)
    return archive.with_name(archive.name + INDEX_SUFFIX)


def _index_key(path: Path, kind: str, limits: ArchiveLimits) -> tuple[Any, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (kind, os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, limits)


def _cached_index(key: tuple[Any, ...] | None) -> _IndexEntry | None:
    """The index of an archive version indexed before in this process."""
    if key is None:
        return None
    with _INDEX_LOCK:
        hit = _INDEX_CACHE.get(key)
        if hit is not None:
            _INDEX_CACHE.move_to_end(key)
        return hit


def _remember_index(key: tuple[Any, ...] | None, entry: _IndexEntry) -> None:
    if key is None:
        return
    with _INDEX_LOCK:
        _INDEX_CACHE[key] = entry
        _INDEX_CACHE.move_to_end(key)
        while len(_INDEX_CACHE) > INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)


def _fingerprint(path: Path) -> dict[str, Any]:
    """What identifies one version of an archive: size, modification time and a hash of its
    first and last 64 KiB (a zip's central directory ends there, a tar's last members)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        h = hashlib.sha256(f.read(_PROBE))
        if st.st_size > _PROBE:
            f.seek(max(_PROBE, st.st_size - _PROBE))
            h.update(f.read(_PROBE))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def _index_meta(archive: Path, kind: str, limits: ArchiveLimits) -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "kind": kind, "archive": _fingerprint(archive), "limits": dataclasses.asdict(limits)}


def _write_index(side: Path, archive: Path, kind: str, limits: ArchiveLimits, keys: list[str], table: np.ndarray,
                 prefix: str) -> Path:
    """Write the index file ``side`` of ``archive`` atomically (numpy ``.npz``: ``meta``, the
    JSON header with the archive's fingerprint, the limits and the common top folder;
    ``keys``, the names joined by NUL bytes in row order; ``table``, int64)."""
    meta = json.dumps({**_index_meta(archive, kind, limits), "prefix": prefix}).encode()
    blob = "\0".join(keys).encode()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.frombuffer(meta, np.uint8), keys=np.frombuffer(blob, np.uint8),
                     table=np.ascontiguousarray(table, dtype=np.int64))

    atomic_write(side, write)
    log.info("%s: index of %d members stored in %s", archive, len(keys), side.name)
    return side


def _load_index(side: Path, archive: Path, kind: str, limits: ArchiveLimits) -> tuple[list[str], np.ndarray, str] | None:
    """``(keys, table, prefix)`` from the index file ``side`` if it exists and matches this
    version of ``archive``, its kind, the index format and ``limits``; None otherwise."""
    try:
        with np.load(side, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            prefix = meta.pop("prefix", None)
            if meta != _index_meta(archive, kind, limits) or not isinstance(prefix, str):
                return None
            blob = z["keys"].tobytes().decode()
            table = z["table"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:  # truncated or foreign: parse instead
        log.warning("%s: unreadable index file (%s); parsing the archive", side, e)
        return None
    keys = blob.split("\0") if blob or len(table) else []
    if table.ndim != 2 or len(keys) != len(table):
        log.warning("%s: inconsistent index file; parsing the archive", side)
        return None
    return keys, table, prefix


class _ZipReader:
    """Reads zip members at their indexed local-header offsets with ``os.pread`` (one file
    descriptor per process, no lock: ``pread`` does not move a shared offset).

    Stored, deflate and bzip2 members are decompressed here, at most their declared size,
    and checked against it and their CRC-32; any other method falls back to one ``ZipFile``
    parsed on first need.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO | None = None
        self._pid = 0
        self._zip: zipfile.ZipFile | None = None
        self._lock = threading.Lock()

    def _file(self) -> int:
        if self._fh is None or self._pid != os.getpid():
            with self._lock:
                if self._fh is None or self._pid != os.getpid():
                    if self._fh is not None:  # inherited over a fork: this process's copy
                        self._fh.close()
                    self._fh, self._pid, self._zip = open(self.path, "rb", buffering=0), os.getpid(), None
        return self._fh.fileno()

    def read(self, row: np.ndarray) -> bytes:
        offset, csize, size, method, crc, flags, pos = (int(v) for v in row)
        if flags & 0x1:
            raise OSError("the member is encrypted")
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2):
            return self._fallback(pos)
        fd = self._file()
        head = os.pread(fd, 30, offset)
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise OSError("bad local file header")
        n, m = struct.unpack("<HH", head[26:30])
        data = os.pread(fd, csize, offset + 30 + n + m)
        if len(data) != csize:
            raise OSError("the member is truncated")
        if method == zipfile.ZIP_DEFLATED:
            data = zlib.decompressobj(-15).decompress(data, size + 1)
        elif method == zipfile.ZIP_BZIP2:
            data = bz2.BZ2Decompressor().decompress(data, max_length=size + 1)
        if len(data) != size or zlib.crc32(data) != crc:
            raise OSError("bad CRC-32 or size")
        return data

    def _fallback(self, pos: int) -> bytes:
        with self._lock:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            zf = self._zip
            return zf.read(zf.infolist()[pos])

    def close(self) -> None:
        with self._lock:
            if self._fh is not None and self._pid == os.getpid():
                self._fh.close()
            self._fh = None
            if self._zip is not None:
                self._zip.close()
                self._zip = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]


class ZipImageStore(_Indexed):
    """Members of a zip archive, checked against ``limits`` at open and read lazily."""

    _kind = "zip"
    COLUMNS = ("header_offset", "compress_size", "file_size", "compress_type", "crc", "flag_bits", "position")

    def __init__(self, path: str | Path, *, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        self.limits = limits
        self.max_pixels = limits.max_image_pixels
        self._open_index(self.path, _index_key(self.path, "zip", limits), self._parse)
        self._reader = _ZipReader(self.path)

    def _parse(self) -> tuple[list[str], np.ndarray]:
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ArchiveError(f"{self.path}: not a readable zip archive ({e})") from e
        with zf:
            return self._index(zf.infolist(), self.limits)

    def _index(self, infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> tuple[list[str], np.ndarray]:
        if len(infos) > limits.max_members:
            raise ArchiveError(f"{self.path}: {len(infos)} members exceed the limit of {limits.max_members}")
        total = 0
        keys: list[str] = []
        rows: list[tuple[int, ...]] = []
        for pos, info in enumerate(infos):
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                what = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                raise ArchiveError(f"{self.path}: member {info.filename!r} is {what}")
            key = _member_name(info.filename, self.source)
            if info.is_dir():
                continue
            _check_size(self.source, info.filename, info.file_size, info.compress_size, limits)
            total += info.file_size
            if total > limits.max_total_bytes:
                raise ArchiveError(
                    f"{self.path}: total uncompressed size exceeds {limits.max_total_bytes} bytes "
                    f"(at member {info.filename!r})"
                )
            keys.append(key)
            rows.append((info.header_offset, info.compress_size, info.file_size, info.compress_type, info.CRC,
                         info.flag_bits, pos))
        return keys, np.array(rows, dtype=np.int64).reshape(len(rows), len(self.COLUMNS))

    def _read(self, key: str) -> bytes:
        try:
            return self._reader.read(self._table[self._entry(key)])
        except (zipfile.BadZipFile, zlib.error, OSError, RuntimeError, NotImplementedError, EOFError, ValueError) as e:
            raise OSError(f"{self.path}: member {key!r} is corrupt ({e})") from e

    def close(self) -> None:
        self._reader.close()


def _check_size(archive: str, member: str, size: int, compressed: int, limits: ArchiveLimits) -> None:
    if size > limits.max_member_bytes:
        raise ArchiveError(f"{archive}: member {member!r} is {size} bytes, over the limit of {limits.max_member_bytes}")
    if size > limits.ratio_min_bytes and size > limits.max_ratio * max(compressed, 1):
        raise ArchiveError(
            f"{archive}: member {member!r} has compression ratio {size / max(compressed, 1):.0f}, "
            f"over the limit of {limits.max_ratio:g} (zip bomb?)"
        )


_MAGIC: tuple[tuple[bytes, Callable[..., Any]], ...] = (
    (b"\x1f\x8b", gzip.open),
    (b"BZh", bz2.open),
    (b"\xfd7zXZ\x00", lzma.open),
)


class _Counting:
    """A read-only binary file that counts the bytes read from it (the compressed side)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.count += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        pass  # the caller closes the underlying file


def compression_of(path: str | Path) -> Callable[..., Any] | None:
    """The opener (``gzip.open``, ``bz2.open``, ``lzma.open``) for a compressed file, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise ArchiveError(f"{path}: cannot read archive ({e})") from e
    return next((opener for magic, opener in _MAGIC if head.startswith(magic)), None)


def decompress_tar(src: str | Path, dst: BinaryIO, *, limits: ArchiveLimits = DEFAULT_LIMITS,
                   opener: Callable[..., Any] | None = None) -> int:
    """Decompress the gzip / bzip2 / xz file ``src`` into ``dst``; returns the bytes written.

    The caps are checked after every chunk, *while* streaming: the output may not exceed
    ``limits.max_total_bytes`` (plus room for tar headers), and once past
    ``limits.ratio_min_bytes`` it may not exceed ``limits.max_ratio`` times the compressed
    bytes consumed so far. A bomb raises :class:`ArchiveError` after a few megabytes.
    """
    opener = opener or compression_of(src)
    if opener is None:
        raise ArchiveError(f"{src}: not a gzip, bzip2 or xz file")
    cap = limits.max_total_bytes + min(64 << 20, 1024 * limits.max_members + 10240)  # + headers
    done = 0
    try:
        with open(src, "rb") as raw:
            counted = _Counting(raw)
            with opener(counted, "rb") as z:
                while chunk := z.read(1 << 20):
                    done += len(chunk)
                    if done > cap:
                        raise ArchiveError(f"{src}: decompressed size exceeds {cap} bytes")
                    consumed = max(counted.count, 1)
                    if done > limits.ratio_min_bytes and done > limits.max_ratio * consumed:
                        raise ArchiveError(
                            f"{src}: compression ratio {done / consumed:.0f} (so far) is over the limit of "
                            f"{limits.max_ratio:g} (decompression bomb?)"
                        )
                    dst.write(chunk)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise ArchiveError(f"{src}: cannot decompress ({e})") from e
    return done


class TarImageStore(_Indexed):
    """Regular-file members of a tar (plain or gzip/bzip2/xz-compressed), read lazily.

    A compressed tar is decompressed once into a temporary plain tar with the size and
    ratio caps checked while streaming (:func:`decompress_tar`), so a decompression bomb is
    stopped early. A plain tar's index is cached per process and may be stored beside it
    (see the module docstring).
    """

    _kind = "tar"
    COLUMNS = ("offset_data", "size")

    def __init__(self, path: str | Path, *, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        self.limits = limits
        self.max_pixels = limits.max_image_pixels
        self._tmp: str | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        opener = compression_of(self.path)
        key = None
        if opener is None:
            self._plain = self.path
            key = _index_key(self.path, "tar", limits)
        else:
            self._plain = Path(self._decompress(opener))
        self._open_index(self._plain, key, self._parse)

    def _decompress(self, opener: Callable[..., Any]) -> str:
        fd, tmp = tempfile.mkstemp(prefix="otcclip-", suffix=".tar")
        self._tmp = tmp
        self._finalizer = weakref.finalize(self, _unlink, tmp)
        try:
            with os.fdopen(fd, "wb") as dst:
                decompress_tar(self.path, dst, limits=self.limits, opener=opener)
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    def _parse(self) -> tuple[list[str], np.ndarray]:
        total = 0
        count = 0
        keys: list[str] = []
        rows: list[tuple[int, int]] = []
        try:
            with tarfile.open(self._plain, "r:") as tf:
                for m in tf:
                    count += 1
                    if count > self.limits.max_members:
                        raise ArchiveError(f"{self.path}: more than {self.limits.max_members} members")
                    if m.issym() or m.islnk():
                        what = "a symlink" if m.issym() else "a hard link"
                        raise ArchiveError(f"{self.path}: member {m.name!r} is {what}")
                    if not (m.isreg() or m.isdir()) or m.issparse():
                        raise ArchiveError(f"{self.path}: member {m.name!r} is not a regular file")
                    key = _member_name(m.name, self.source)
                    if m.isdir():
                        continue
                    _check_size(self.source, m.name, m.size, m.size, self.limits)
                    total += m.size
                    if total > self.limits.max_total_bytes:
                        raise ArchiveError(
                            f"{self.path}: total size exceeds {self.limits.max_total_bytes} bytes "
                            f"(at member {m.name!r})"
                        )
                    keys.append(key)
                    rows.append((m.offset_data, m.size))
                    tf.members = []  # type: ignore[attr-defined]  # keep memory flat on huge archives
        except tarfile.TarError as e:
            self.close()
            raise ArchiveError(f"{self.path}: not a readable tar archive ({e})") from e
        except ArchiveError:
            self.close()
            raise
        return keys, np.array(rows, dtype=np.int64).reshape(len(rows), len(self.COLUMNS))

    def _read(self, key: str) -> bytes:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self._plain, os.O_RDONLY)
        offset, size = (int(v) for v in self._table[self._entry(key)])
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise OSError(f"{self.path}: member {key!r} is truncated")
        return data

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fd"] = None
        state.pop("_lock", None)
        state.pop("_finalizer", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ShardImageStore(ImageStore):
    """Images inside WebDataset shards, referenced as ``"<shard name>#<member name>"``."""

    def __init__(self, shards: dict[str, TarImageStore], *, source: str) -> None:
        self.shards = shards
        self.source = source
        self.max_pixels = min((s.max_pixels for s in shards.values()), default=DEFAULT_LIMITS.max_image_pixels)

    def _key(self, ref: str) -> str:
        shard, sep, member = ref.partition("#")
        if not sep or shard not in self.shards:
            raise UnsafePath(f"image reference {ref!r} is not '<shard>#<member>' of {self.source}")
        return f"{shard}#{safe_relpath(member)}"

    def _has(self, key: str) -> bool:
        shard, _, member = key.partition("#")
        return self.shards[shard]._has(member)

    def _read(self, key: str) -> bytes:
        shard, _, member = key.partition("#")
        return self.shards[shard]._read(member)

    def save_index(self) -> list[Path]:
        return [p for s in self.shards.values() for p in s.save_index()]

    def close(self) -> None:
        for s in self.shards.values():
            s.close()


def open_store(images: str | Path, *, limits: ArchiveLimits = DEFAULT_LIMITS) -> ImageStore:
    """A store for a directory or a ``.zip`` / ``.tar`` / ``.tar.gz`` / ``.tgz`` archive."""
    p = Path(images)
    if p.is_dir():
        return DirImageStore(p, limits=limits)
    if not p.is_file():
        raise FileNotFoundError(f"image source {p} does not exist")
    if zipfile.is_zipfile(p):
        return ZipImageStore(p, limits=limits)
    return TarImageStore(p, limits=limits)
