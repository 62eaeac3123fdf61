"""Streaming multipart parsing: file parts go straight to storage, with size and part caps.

Starlette's ``request.form()`` spools whole files before the handler runs; this parser
writes each part as it arrives and stops at the cap (413) without buffering. The body is
read on the event loop in chunks of up to :data:`BATCH_BYTES`; parsing, hashing and
writing each batch run in a worker thread, so a slow disk never stalls other requests.
Parts beyond ``max_parts`` (422), part headers beyond :data:`MAX_HEADER_BYTES` and text fields
beyond :data:`MAX_FIELD_BYTES` are refused as soon as they are seen.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import anyio.to_thread
from fastapi import HTTPException, Request, status
from python_multipart.multipart import MultipartParser, parse_options_header

from otcclip.service.storage import HashingWriter, TooLarge

MAX_FIELD_BYTES = 4096
MAX_HEADER_BYTES = 16384
BATCH_BYTES = 1 << 20


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing with an HTTP status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class UploadedFile:
    field: str
    filename: str
    path: Path
    size: int
    sha256: str


@dataclass
class ParsedForm:
    files: dict[str, UploadedFile] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    def cleanup(self) -> None:
        for f in self.files.values():
            f.path.unlink(missing_ok=True)


def client_filename(name: str) -> str:
    """The last path component of a client-supplied file name (never used as a path)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    return base.strip() or "upload"


async def parse_upload(request: Request, tmp_dir: Path, *, file_fields: tuple[str, ...], max_bytes: int,
                       max_parts: int = 8) -> ParsedForm:
    """Parse a ``multipart/form-data`` body into temporary files under ``tmp_dir``.

    Raises HTTPException 413 past ``max_bytes`` (whole request), 422 past ``max_parts``
    parts, for a malformed body or unexpected file fields, 415 for another content type.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "expected multipart/form-data with a boundary")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"upload of {declared} bytes exceeds the size limit of {max_bytes} bytes")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    form = ParsedForm()
    state: dict[str, Any] = {"headers": {}, "hname": b"", "hval": b"", "writer": None, "fh": None, "buf": None}
    errors: list[str] = []

    parts = 0

    def on_part_begin() -> None:
        nonlocal parts
        parts += 1
        if parts > max_parts:
            raise _Refused(status.HTTP_422_UNPROCESSABLE_CONTENT, f"more than {max_parts} form parts")
        state.update(headers={}, hname=b"", hval=b"", hbytes=0, writer=None, fh=None, buf=None, name=None, filename=None)

    def _header_bytes(n: int) -> None:
        state["hbytes"] += n
        if state["hbytes"] > MAX_HEADER_BYTES:
            raise _Refused(status.HTTP_413_CONTENT_TOO_LARGE, f"form part headers longer than {MAX_HEADER_BYTES} bytes")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        _header_bytes(end - start)
        state["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        _header_bytes(end - start)
        state["hval"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["hname"].lower()] = state["hval"]
        state["hname"], state["hval"] = b"", b""

    def on_headers_finished() -> None:
        disp, dparams = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = dparams.get(b"name", b"").decode("utf-8", "replace")
        filename = dparams.get(b"filename")
        state["name"] = name
        if filename is not None:
            if name not in file_fields:
                errors.append(f"unexpected file field {name!r} (expected {', '.join(file_fields)})")
                return
            if name in form.files:
                errors.append(f"file field {name!r} given twice")
                return
            fd, tmp = tempfile.mkstemp(prefix=f".up-{name}-", dir=tmp_dir)
            fh = os.fdopen(fd, "wb")
            state["fh"] = fh
            state["writer"] = HashingWriter(fh, max_bytes=None)
            state["filename"] = client_filename(filename.decode("utf-8", "replace"))
            state["tmp"] = Path(tmp)
        else:
            state["buf"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["writer"] is not None:
            state["writer"].write(data[start:end])
        elif state["buf"] is not None:
            state["buf"] += data[start:end]
            if len(state["buf"]) > MAX_FIELD_BYTES:
                errors.append(f"form field {state['name']!r} is longer than {MAX_FIELD_BYTES} bytes")
                state["buf"] = None

    def on_part_end() -> None:
        w = state["writer"]
        if w is not None:
            state["fh"].close()
            form.files[state["name"]] = UploadedFile(state["name"], state["filename"], state["tmp"], w.size, w.hash.hexdigest())
        elif state["buf"] is not None and state.get("name"):
            form.fields[state["name"]] = state["buf"].decode("utf-8", "replace")
        state["writer"], state["fh"], state["buf"] = None, None, None

    parser = MultipartParser(
        params[b"boundary"],
        callbacks={  # type: ignore[arg-type]
            "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
            "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        },
    )
    total = 0
    batch = bytearray()

    def feed(data: bytes) -> None:
        parser.write(data)
        if errors:
            raise _Refused(status.HTTP_422_UNPROCESSABLE_CONTENT, errors[0])

    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise TooLarge(max_bytes)
            batch += chunk
            if len(batch) >= BATCH_BYTES:
                await anyio.to_thread.run_sync(feed, bytes(batch))
                batch.clear()
        if batch:
            await anyio.to_thread.run_sync(feed, bytes(batch))
        parser.finalize()
    except _Refused as e:
        _abort(state, form)
        raise HTTPException(e.code, str(e)) from e
    except TooLarge as e:
        _abort(state, form)
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(e)) from e
    except HTTPException:
        _abort(state, form)
        raise
    except Exception as e:  # malformed multipart
        _abort(state, form)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"malformed multipart body: {e}") from e
    if errors:
        _abort(state, form)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, errors[0])
    return form


def _abort(state: dict[str, Any], form: ParsedForm) -> None:
    if state.get("fh") is not None:
        state["fh"].close()
        Path(state["tmp"]).unlink(missing_ok=True)
    form.cleanup()


@asynccontextmanager
async def staged_upload(request: Request, upload_id: str, *, file_fields: tuple[str, ...]) -> AsyncIterator[tuple[ParsedForm, Path]]:
    """The shared first half of an upload route: an upload slot, the body streamed into a
    fresh staging folder (no database connection held), and the parsed form.

    Yields ``(form, staging)``. On exit the form's files still in place and the staging
    folder are removed: what the route keeps it has moved out of the folder by then.
    """
    from otcclip.service.api.overload import upload_slot

    settings, storage = request.app.state.settings, request.app.state.storage
    async with upload_slot(request):
        staging = storage.staging_dir(upload_id)
        staging.mkdir(parents=True, exist_ok=True)
        try:
            form = await parse_upload(request, staging, file_fields=file_fields,
                                      max_bytes=settings.max_upload_bytes, max_parts=settings.max_form_parts)
            try:
                yield form, staging
            finally:
                form.cleanup()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
