"""Safe image access for manifests: a directory, a zip / tar / tar.gz archive, WebDataset shards.

Every store resolves *relative* references only. A directory store refuses absolute
paths, ``..`` escapes and paths that resolve (through symlinks) outside its root. An
archive store checks the whole archive when it is opened and refuses it (raising
:class:`ArchiveError`, naming the member) if any member is a symlink, hard link, device
or fifo, has an absolute or ``..`` name, or if the archive breaks the
:class:`ArchiveLimits` (member count, total uncompressed size, per-member size,
compression ratio: zip bombs).

Members are read lazily: zip members through a per-thread ``ZipFile`` handle, plain tar
members with ``os.pread`` at the offsets indexed at open time. Compressed tars
(gzip / bzip2 / xz) are first decompressed, with the size cap enforced while streaming,
into one temporary plain ``.tar`` (deleted when the store is closed or collected) and then
read lazily the same way; nothing is ever extracted as loose files.

Decoding always calls ``Image.load()``, so truncated files fail (``LOAD_TRUNCATED_IMAGES``
is never set) and raise :class:`UnreadableImage`.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import re
import stat
import tarfile
import tempfile
import threading
import weakref
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
#: PIL decoders allowed (never EPS/PDF-like formats that call external programs).
DECODE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DRIVE = re.compile(r"^[A-Za-z]:")


class UnreadableImage(ValueError):
    """An image exists but cannot be decoded (corrupt, truncated, not an image)."""


class UnsafePath(ValueError):
    """A reference is absolute, escapes the dataset root, or is otherwise refused."""


class ArchiveError(ValueError):
    """An archive is refused as a whole (unsafe member, limits exceeded, not an archive)."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps checked when an archive is opened (zip-bomb and resource guards).

    Attributes
    ----------
    max_total_bytes : int
        Sum of the members' uncompressed sizes.
    max_members : int
        Number of members (directories included).
    max_member_bytes : int
        Uncompressed size of one member.
    max_ratio : float
        Uncompressed / compressed size of one zip member, or of a whole compressed tar.
    ratio_min_bytes : int
        The ratio is only checked for members (or tars) larger than this when uncompressed.
    """

    max_total_bytes: int = 16 << 30
    max_members: int = 2_000_000
    max_member_bytes: int = 64 << 20
    max_ratio: float = 100.0
    ratio_min_bytes: int = 1 << 20


DEFAULT_LIMITS = ArchiveLimits()


def safe_relpath(ref: str) -> str:
    """Normalise a relative reference to ``a/b/c.jpg`` or raise :class:`UnsafePath`.

    Refuses empty strings, URLs, absolute paths (POSIX, ``\\\\`` or drive letters), NUL
    bytes and any ``..`` component. ``./`` components and duplicate slashes are dropped.
    """
    if not ref or not ref.strip():
        raise UnsafePath("empty image path")
    if "\x00" in ref:
        raise UnsafePath(f"image path {ref!r} contains a NUL byte")
    if _URL.match(ref):
        raise UnsafePath(f"image path {ref!r} is a URL; only relative paths are allowed")
    if ref.startswith(("/", "\\")) or _DRIVE.match(ref):
        raise UnsafePath(f"image path {ref!r} is absolute; only relative paths are allowed")
    parts = [p for p in PurePosixPath(ref.replace("\\", "/")).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafePath(f"image path {ref!r} escapes the dataset directory")
    if not parts:
        raise UnsafePath(f"image path {ref!r} names no file")
    return "/".join(parts)


def decode_image(data: bytes, *, name: str = "image") -> Image.Image:
    """Decode ``data`` fully into an RGB image; raise :class:`UnreadableImage` on any failure."""
    try:
        with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as im:
            im.load()
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"{name}: image too large ({e})") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise UnreadableImage(f"{name}: cannot decode image ({e})") from e


class ImageStore:
    """Where a manifest's images come from. Subclasses implement ``_read`` and ``_has``.

    ``open(ref)`` returns an RGB PIL image or raises :class:`UnreadableImage` (also for a
    missing file, so a broken row never stops a run) or :class:`UnsafePath`.
    """

    #: A human-readable description of the source (a directory or archive path).
    source: str = ""

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
        return decode_image(data, name=ref)

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

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
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


class ZipImageStore(_Indexed):
    """Members of a zip archive, checked against ``limits`` at open and read lazily."""

    def __init__(self, path: str | Path, *, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        self.limits = limits
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ArchiveError(f"{self.path}: not a readable zip archive ({e})") from e
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
        self._local = threading.local()

    def _read(self, key: str) -> bytes:
        zf = getattr(self._local, "zf", None)
        if zf is None:
            zf = zipfile.ZipFile(self.path)
            self._local.zf = zf
        try:
            return zf.read(self._entry(key))
        except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError) as e:
            raise OSError(f"{self.path}: member {key!r} is corrupt ({e})") from e

    def close(self) -> None:
        zf = getattr(self._local, "zf", None)
        if zf is not None:
            zf.close()
            self._local.zf = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


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


class TarImageStore(_Indexed):
    """Regular-file members of a tar (plain or gzip/bzip2/xz-compressed), read lazily.

    A compressed tar is decompressed once into a temporary plain tar with the total size
    capped while streaming, so a decompression bomb is stopped early.
    """

    def __init__(self, path: str | Path, *, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        self.limits = limits
        self._tmp: str | None = None
        try:
            with open(self.path, "rb") as f:
                head = f.read(6)
        except OSError as e:
            raise ArchiveError(f"{self.path}: cannot read archive ({e})") from e
        plain = self.path
        for magic, opener in _MAGIC:
            if head.startswith(magic):
                plain = Path(self._decompress(opener))
                break
        self._plain = plain
        self._names = {}
        self._index(plain)
        self._set_prefix()
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _decompress(self, opener: Callable[..., Any]) -> str:
        fd, tmp = tempfile.mkstemp(prefix="otcclip-", suffix=".tar")
        self._tmp = tmp
        self._finalizer = weakref.finalize(self, _unlink, tmp)
        cap = self.limits.max_total_bytes + min(64 << 20, 1024 * self.limits.max_members + 10240)  # + headers
        done = 0
        try:
            with opener(self.path, "rb") as src, os.fdopen(fd, "wb") as dst:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    done += len(chunk)
                    if done > cap:
                        raise ArchiveError(f"{self.path}: decompressed size exceeds {cap} bytes")
                    dst.write(chunk)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise ArchiveError(f"{self.path}: cannot decompress ({e})") from e
        except ArchiveError:
            _unlink(tmp)
            raise
        packed = self.path.stat().st_size
        if done > self.limits.ratio_min_bytes and done > self.limits.max_ratio * max(packed, 1):
            _unlink(tmp)
            raise ArchiveError(
                f"{self.path}: compression ratio {done / max(packed, 1):.0f} is over the limit of "
                f"{self.limits.max_ratio:g} (decompression bomb?)"
            )
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
        return DirImageStore(p)
    if not p.is_file():
        raise FileNotFoundError(f"image source {p} does not exist")
    if zipfile.is_zipfile(p):
        return ZipImageStore(p, limits=limits)
    return TarImageStore(p, limits=limits)


@dataclass(frozen=True)
class ImageBatch:
    """Decoded, transformed images of some manifest rows.

    Attributes
    ----------
    pixels : Tensor, shape (n, 3, H, W)
        Transformed images; zeros where unreadable.
    ok : Tensor, shape (n,), bool
        False where the image was missing, unreadable or truncated.
    errors : tuple of str
        One message per row (empty string where ok).
    """

    pixels: torch.Tensor
    ok: torch.Tensor
    errors: tuple[str, ...] = ()


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="otcclip-decode")
        return _POOL


def load_images(
    store: ImageStore,
    refs: Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
) -> ImageBatch:
    """Decode and transform ``refs`` from ``store`` in a small thread pool (order kept)."""

    def one(ref: str) -> tuple[torch.Tensor | None, str]:
        try:
            return transform(store.open(ref)), ""
        except (UnreadableImage, UnsafePath, OSError) as e:
            log.debug("unreadable image %s: %s", ref, e)
            return None, str(e)

    results: Iterable[tuple[torch.Tensor | None, str]]
    results = list(_pool().map(one, refs)) if len(refs) > 1 else [one(r) for r in refs]
    tensors = [t for t, _ in results]
    shape_src = next((t for t in tensors if t is not None), None)
    if shape_src is None:
        shape_src = transform(Image.new("RGB", (32, 32)))
    pixels = torch.zeros((len(refs), *shape_src.shape), dtype=shape_src.dtype)
    ok = torch.zeros(len(refs), dtype=torch.bool)
    for i, t in enumerate(tensors):
        if t is not None:
            pixels[i] = t
            ok[i] = True
    return ImageBatch(pixels, ok, tuple(err for _, err in results))


def load_image_batch(
    manifest: Any,
    rows: Sequence[int],
    transform: Callable[[Image.Image], torch.Tensor],
) -> ImageBatch:
    """Decode and transform the images of ``manifest`` rows ``rows`` (a thread pool, order kept).

    Parameters
    ----------
    manifest : Manifest
        Anything with ``images`` (an :class:`ImageStore`) and ``image_paths`` (list of str).
    rows : sequence of int
        Row indices.
    transform : callable
        PIL RGB image -> tensor ``(3, H, W)`` (e.g. ``ClipBundle.preprocess``).

    Returns
    -------
    ImageBatch
        ``pixels (n, 3, H, W)``, ``ok (n,)``: missing, unreadable or truncated images give
        ``ok=False`` and zeros, so the caller drops them (reason ``unreadable_image``).
    """
    paths = manifest.image_paths
    return load_images(manifest.images, [paths[int(r)] for r in rows], transform)
