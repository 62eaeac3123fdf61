"""Image references, decoding and batch loading for manifests.

A reference is always *relative* to the dataset's own files (:func:`safe_relpath`
refuses absolute paths, ``..`` escapes, URLs and drive letters); the stores that resolve
references (a directory, a zip / tar archive, WebDataset shards) are in
:mod:`otcclip.models.stores`.

Decoding always calls ``Image.load()``, so truncated files fail (``LOAD_TRUNCATED_IMAGES``
is never set) and raise :class:`UnreadableImage`. The pixel count is checked from the
header first: an image larger than ``max_pixels`` is refused before anything is decoded
(a 17 KB PNG can declare 12,000 x 12,000 pixels).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Protocol

import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
#: PIL decoders allowed (never EPS/PDF-like formats that call external programs).
DECODE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DRIVE = re.compile(r"^[A-Za-z]:")
#: Already-normal relative paths (no ``.``/``..`` parts, separators, colons or NULs): the fast path.
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+ -]*(?:/[A-Za-z0-9_][A-Za-z0-9_.+ -]*)*")


class ImageOpener(Protocol):
    """Anything that opens an image reference (every :class:`~otcclip.models.stores.ImageStore`)."""

    def open(self, ref: str) -> Image.Image:
        """The decoded RGB image of ``ref``."""
        ...


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
    max_image_pixels : int
        Width x height of one image; larger images are unreadable (not decoded).
    """

    max_total_bytes: int = 16 << 30
    max_members: int = 2_000_000
    max_member_bytes: int = 64 << 20
    max_ratio: float = 100.0
    ratio_min_bytes: int = 1 << 20
    max_image_pixels: int = 64_000_000


DEFAULT_LIMITS = ArchiveLimits()


def safe_relpath(ref: str) -> str:
    """Normalise a relative reference to ``a/b/c.jpg`` or raise :class:`UnsafePath`.

    Refuses empty strings, URLs, absolute paths (POSIX, ``\\\\`` or drive letters), NUL
    bytes and any ``..`` component. ``./`` components and duplicate slashes are dropped.
    """
    if _PLAIN.fullmatch(ref):
        return ref
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


def decode_image(data: bytes, *, name: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Decode ``data`` fully into an RGB image; raise :class:`UnreadableImage` on any failure.

    ``max_pixels`` (default :data:`DEFAULT_LIMITS`' ``max_image_pixels``) is checked
    against the size in the header, before the pixels are decoded.
    """
    cap = DEFAULT_LIMITS.max_image_pixels if max_pixels is None else max_pixels
    try:
        with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as im:
            w, h = im.size
            if w * h > cap:
                raise UnreadableImage(f"{name}: image too large ({w} x {h} pixels, over the limit of {cap})")
            im.load()
            return im.convert("RGB")
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"{name}: image too large ({e})") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise UnreadableImage(f"{name}: cannot decode image ({e})") from e


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
    hashes : tuple of int
        With ``content_hash``: per row, :func:`pixel_hash` of the decoded image (0 where
        unreadable); else empty.
    """

    pixels: torch.Tensor
    ok: torch.Tensor
    errors: tuple[str, ...] = ()
    hashes: tuple[int, ...] = ()


def pixel_hash(img: Image.Image) -> int:
    """Stable signed 64-bit hash of a decoded image's pixels (RGB) and size: equal for
    byte-identical files and for any two encodings of the same pixels."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    h = hashlib.blake2b(f"{rgb.size[0]}x{rgb.size[1]}:".encode(), digest_size=8)
    h.update(rgb.tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="otcclip-decode")
        return _POOL


def load_images(
    store: ImageOpener,
    refs: Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    content_hash: bool = False,
) -> ImageBatch:
    """Decode and transform ``refs`` from ``store`` in a small thread pool (order kept);
    with ``content_hash`` also :func:`pixel_hash` each decoded image."""

    def one(ref: str) -> tuple[torch.Tensor | None, str, int]:
        try:
            img = store.open(ref)
            return transform(img), "", pixel_hash(img) if content_hash else 0
        except (UnreadableImage, UnsafePath, OSError) as e:
            log.debug("unreadable image %s: %s", ref, e)
            return None, str(e), 0

    results: Iterable[tuple[torch.Tensor | None, str, int]]
    results = list(_pool().map(one, refs)) if len(refs) > 1 else [one(r) for r in refs]
    tensors = [t for t, _, _ in results]
    shape_src = next((t for t in tensors if t is not None), None)
    if shape_src is None:
        shape_src = transform(Image.new("RGB", (32, 32)))
    pixels = torch.zeros((len(refs), *shape_src.shape), dtype=shape_src.dtype)
    ok = torch.zeros(len(refs), dtype=torch.bool)
    for i, t in enumerate(tensors):
        if t is not None:
            pixels[i] = t
            ok[i] = True
    return ImageBatch(pixels, ok, tuple(err for _, err, _ in results),
                      tuple(h for _, _, h in results) if content_hash else ())


def load_image_batch(
    manifest: Any,
    rows: Sequence[int],
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    content_hash: bool = False,
) -> ImageBatch:
    """Decode and transform the images of ``manifest`` rows ``rows`` (a thread pool, order kept).

    Parameters
    ----------
    manifest : Manifest
        Anything with ``images`` (an :class:`ImageOpener`, e.g. an ``ImageStore``) and ``image_paths`` (list of str).
    rows : sequence of int
        Row indices.
    transform : callable
        PIL RGB image -> tensor ``(3, H, W)`` (e.g. ``ClipBundle.preprocess``).
    content_hash : bool
        Also hash each decoded image's pixels (``ImageBatch.hashes``; exact duplicates).

    Returns
    -------
    ImageBatch
        ``pixels (n, 3, H, W)``, ``ok (n,)``: missing, unreadable or truncated images give
        ``ok=False`` and zeros, so the caller drops them (reason ``unreadable_image``).
    """
    paths = manifest.image_paths
    return load_images(manifest.images, [paths[int(r)] for r in rows], transform, content_hash=content_hash)
