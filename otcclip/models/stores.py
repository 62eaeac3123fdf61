"""Where a manifest's images come from: a directory, a zip / tar / tar.gz archive, WebDataset shards.

Every store resolves *relative* references only. A directory store refuses absolute
paths, ``..`` escapes and paths that resolve (through symlinks) outside its root. An
archive store checks the whole archive when it is opened and refuses it (raising
:class:`~otcclip.models.images.ArchiveError`, naming the member) if any member is a
symlink, hard link, device or fifo, has an absolute or ``..`` name, or if the archive
breaks the :class:`~otcclip.models.images.ArchiveLimits` (member count, total
uncompressed size, per-member size, compression ratio: zip bombs).

Members are read lazily: zip members through a per-thread ``ZipFile`` handle, plain tar
members with ``os.pread`` at the offsets indexed at open time. Compressed tars
(gzip / bzip2 / xz) are decompressed once into a temporary plain ``.tar`` (deleted when the
store is closed or collected) and then read lazily the same way; nothing is ever extracted
as loose files. The size cap and the compression ratio are checked *while* decompressing
(against the compressed bytes consumed so far), so a decompression bomb is stopped after a
few megabytes rather than after it has been written out; :func:`decompress_tar` does the
same into a file of the caller's choosing (the service stores uploads as plain tars).

The index of a zip or plain tar (member names, offsets) is built once per process and
archive version (path, size, modification time, limits) and reused by every later store
on the same file (:data:`INDEX_CACHE_SIZE` archives are kept).

Every store decodes images with the pixel cap of its limits (``max_image_pixels``).
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import os
import stat
import tarfile
import tempfile
import threading
import weakref
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

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
    """Shared lookup for archive stores: normalised member names, optional common top folder."""

    _names: dict[str, Any]
    _prefix: str

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


#: Archives whose index is kept per process (most recently used first out last).
INDEX_CACHE_SIZE = 8
_INDEX_CACHE: OrderedDict[tuple[Any, ...], tuple[dict[str, Any], str, Any]] = OrderedDict()
_INDEX_LOCK = threading.Lock()


def _index_key(path: Path, kind: str, limits: ArchiveLimits) -> tuple[Any, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (kind, os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, limits)


def _cached_index(key: tuple[Any, ...] | None) -> tuple[dict[str, Any], str, Any] | None:
    """``(names, prefix, shared handle or None)`` of an archive version indexed before."""
    if key is None:
        return None
    with _INDEX_LOCK:
        hit = _INDEX_CACHE.get(key)
        if hit is not None:
            _INDEX_CACHE.move_to_end(key)
        return hit


def _remember_index(key: tuple[Any, ...] | None, names: dict[str, Any], prefix: str, shared: Any = None) -> None:
    if key is None:
        return
    with _INDEX_LOCK:
        _INDEX_CACHE[key] = (names, prefix, shared)
        _INDEX_CACHE.move_to_end(key)
        while len(_INDEX_CACHE) > INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)


class _SharedZip:
    """One parsed ``ZipFile`` shared by every thread and store of a process.

    Opening a ``ZipFile`` parses the whole central directory (seconds for 200,000 members),
    so it is done once per archive version rather than once per thread; members are read
    under a lock (reading a member is short next to decoding it). A forked child opens its
    own handle (a file offset shared across processes would interleave reads).
    """

    def __init__(self, path: Path, zf: zipfile.ZipFile | None = None) -> None:
        self.path = path
        self.zf = zf
        self.pid = os.getpid()
        self.lock = threading.Lock()

    def read(self, name: str) -> bytes:
        with self.lock:
            if self.zf is None or self.pid != os.getpid():
                self.zf, self.pid = zipfile.ZipFile(self.path), os.getpid()
            return self.zf.read(name)


class ZipImageStore(_Indexed):
    """Members of a zip archive, checked against ``limits`` at open and read lazily."""

    def __init__(self, path: str | Path, *, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        self.limits = limits
        self.max_pixels = limits.max_image_pixels
        self._index_id = _index_key(self.path, "zip", limits)
        hit = _cached_index(self._index_id)
        if hit is not None:
            self._names, self._prefix, self._zip = hit
            return
        self._build_index()
        _remember_index(self._index_id, self._names, self._prefix, self._zip)

    def _build_index(self) -> None:
        limits = self.limits
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ArchiveError(f"{self.path}: not a readable zip archive ({e})") from e
        try:
            self._index(zf.infolist(), limits)
        except BaseException:
            zf.close()
            raise
        self._zip = _SharedZip(self.path, zf)

    def _index(self, infos: list[zipfile.ZipInfo], limits: ArchiveLimits) -> None:
        if len(infos) > limits.max_members:
            raise ArchiveError(f"{self.path}: {len(infos)} members exceed the limit of {limits.max_members}")
        total = 0
        self._names = {}
        for info in infos:
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
            self._names[key] = info.filename
        self._set_prefix()

    def _read(self, key: str) -> bytes:
        try:
            return self._zip.read(self._entry(key))
        except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError) as e:
            raise OSError(f"{self.path}: member {key!r} is corrupt ({e})") from e

    def close(self) -> None:
        """Nothing to release: the parsed archive is shared through the process's index cache."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_zip", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        hit = _cached_index(self._index_id)
        self._zip = hit[2] if hit is not None and hit[2] is not None else _SharedZip(self.path)


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
    stopped early. A plain tar's index is cached per process (see the module docstring).
    """

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
            hit = _cached_index(key)
            if hit is not None:
                self._names, self._prefix, _ = hit
                return
        else:
            self._plain = Path(self._decompress(opener))
        self._names = {}
        self._index(self._plain)
        self._set_prefix()
        _remember_index(key, self._names, self._prefix)

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

    def _index(self, plain: Path) -> None:
        total = 0
        count = 0
        try:
            with tarfile.open(plain, "r:") as tf:
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
                    self._names[key] = (m.offset_data, m.size)
                    tf.members = []  # type: ignore[attr-defined]  # keep memory flat on huge archives
        except tarfile.TarError as e:
            self.close()
            raise ArchiveError(f"{self.path}: not a readable tar archive ({e})") from e
        except ArchiveError:
            self.close()
            raise

    def _read(self, key: str) -> bytes:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self._plain, os.O_RDONLY)
        offset, size = self._entry(key)
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
