"""Upload and artifact storage on a local directory (a shared volume when distributed).

Every file is written to a temporary name in its destination folder and renamed into
place, so readers never see a half-written file. Paths stored in the database are
relative to the storage root; :meth:`Storage.path` refuses anything that escapes it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


class TooLarge(ValueError):
    """An upload exceeded the configured size cap."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"upload exceeds the size limit of {limit} bytes")
        self.limit = limit


class RangeNotSatisfiable(ValueError):
    """A ``Range`` header that selects nothing in the file (HTTP 416)."""


@dataclass(frozen=True)
class StoredFile:
    """A file written to storage.

    Attributes
    ----------
    rel : str
        Path relative to the storage root.
    size : int
        Bytes.
    sha256 : str
        Hex digest of the content.
    """

    rel: str
    size: int
    sha256: str


class HashingWriter:
    """A binary sink that hashes, counts and caps what is written to it."""

    def __init__(self, fh: BinaryIO, *, max_bytes: int | None) -> None:
        self.fh = fh
        self.max_bytes = max_bytes
        self.size = 0
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise TooLarge(self.max_bytes)
        self.hash.update(data)
        self.fh.write(data)


class Storage:
    """A directory of datasets (``datasets/<id>/``), job outputs (``jobs/<id>/``) and
    uploads in progress (``uploads/<id>/``, renamed to ``datasets/<id>/`` once valid)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, rel: str) -> Path:
        """Absolute path of ``rel``; raises ValueError when it leaves the root."""
        p = (self.root / rel).resolve()
        if p != self.root and self.root not in p.parents:
            raise ValueError(f"storage path {rel!r} escapes the storage root")
        return p

    def rel(self, path: str | Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.path(f"datasets/{dataset_id}")

    def job_dir(self, job_id: str) -> Path:
        return self.path(f"jobs/{job_id}")

    def staging_dir(self, upload_id: str) -> Path:
        """Where an upload is streamed and checked before it becomes a dataset."""
        return self.path(f"uploads/{upload_id}")

    def clean_staging(self, *, older_than_s: float) -> int:
        """Remove upload folders untouched for ``older_than_s`` seconds; returns how many.

        A folder's age is that of its newest entry, so an upload still being written is
        never taken for an orphan.
        """
        base = self.path("uploads")
        if not base.is_dir():
            return 0
        now = time.time()
        removed = 0
        for d in base.iterdir():
            try:
                newest = max([d.lstat().st_mtime, *(p.lstat().st_mtime for p in d.rglob("*"))])
            except OSError:
                continue
            if now - newest >= older_than_s:
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                removed += 1
        return removed

    @contextmanager
    def writer(self, rel: str, *, max_bytes: int | None = None) -> Iterator[HashingWriter]:
        """Write ``rel`` atomically; the result is in ``writer.size`` / ``writer.hash``."""
        dest = self.path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                w = HashingWriter(fh, max_bytes=max_bytes)
                yield w
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def register_file(self, path: str | Path) -> StoredFile:
        """Size and sha256 of a file already under the root."""
        p = Path(path)
        return StoredFile(self.rel(p), p.stat().st_size, file_sha256(p))

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tar_directory(src: str | Path, dest: str | Path, *, arcname: str) -> Path:
    """Pack ``src`` into an uncompressed tar at ``dest`` (atomic; deterministic order)."""
    src, dest = Path(src), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tar", dir=dest.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(src, arcname=arcname, recursive=False)
            for p in sorted(src.rglob("*")):
                tar.add(p, arcname=f"{arcname}/{p.relative_to(src).as_posix()}", recursive=False)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
#: Positions with more digits than this are beyond any file (and beyond ``int()``'s limit).
_MAX_DIGITS = 18


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Parse a single-range ``Range`` header into inclusive ``(start, end)``.

    Returns None for headers this server ignores (multiple ranges, other units: the
    full file is sent with 200). Raises :class:`RangeNotSatisfiable` when the range
    selects nothing (416). Numbers of any length are accepted: a huge start is past the
    end (416), a huge end or suffix length reaches the end of the file.
    """
    m = _RANGE.match(header.strip())
    if m is None:
        return None
    a, b = m.group(1).lstrip("0") or m.group(1)[:1], m.group(2).lstrip("0") or m.group(2)[:1]
    if a == "" and b == "":
        return None
    if a == "":
        n = int(b) if len(b) <= _MAX_DIGITS else size
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"a suffix range of {n} bytes selects nothing in a {size}-byte file")
        return max(0, size - n), size - 1
    if b and (len(b), b) < (len(a), a):  # last < first (digit strings without leading zeros)
        return None
    if len(a) > _MAX_DIGITS:
        raise RangeNotSatisfiable(f"the range starts past the end of a {size}-byte file")
    start = int(a)
    end = size - 1 if not b or len(b) > _MAX_DIGITS else int(b)
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start}, past the end of a {size}-byte file")
    return start, min(end, size - 1)


def iter_file(path: str | Path, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``start..end`` (inclusive) of a file in chunks."""
    with open(path, "rb") as fh:
        fh.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
