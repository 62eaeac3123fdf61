"""``/v1/artifacts/{id}``: downloads with ``ETag``, ``If-None-Match`` and single HTTP ranges."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse

from otcclip.service.api.deps import (
    DbDep,
    OwnerDep,
    ShortTransactionRoute,
    StorageDep,
    artifact_out,
)
from otcclip.service.api.errors import error_body, error_responses
from otcclip.service.db import crud
from otcclip.service.schemas import ArtifactOut
from otcclip.service.storage import RangeNotSatisfiable, iter_file, parse_range

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"], route_class=ShortTransactionRoute)


def _artifact(db: Any, owner_id: str, artifact_id: str) -> Any:
    art = crud.get_artifact(db, owner_id, artifact_id)
    if art is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"artifact {artifact_id} not found")
    return art


_BYTES: dict[str, Any] = {"content": {"*/*": {}}}  # any media type: the artifact's own
DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The artifact's bytes", **_BYTES},
    206: {"description": "The requested range of the artifact's bytes", **_BYTES},
    304: {"description": "Not modified (``If-None-Match`` matched the ``ETag``)"},
    **error_responses(401, 404, 410, 416, 422, 503),
}


@router.get("/{artifact_id}/meta", response_model=ArtifactOut, responses=error_responses(401, 404, 422, 503))
def artifact_meta(artifact_id: str, db: DbDep, owner: OwnerDep) -> Any:
    return artifact_out(_artifact(db, owner.id, artifact_id))


@router.get("/{artifact_id}", operation_id="download_artifact", response_class=Response, responses=DOWNLOAD_RESPONSES)
def download(artifact_id: str, request: Request, db: DbDep, owner: OwnerDep, storage: StorageDep) -> Response:
    """The artifact's bytes; ``Range: bytes=a-b`` answers 206 (416 when out of range)."""
    art = _artifact(db, owner.id, artifact_id)
    path = storage.path(art.path)
    if not path.is_file():
        raise HTTPException(status.HTTP_410_GONE, f"artifact {artifact_id} is no longer stored")
    size = path.stat().st_size
    etag = f'"{art.sha256}"'
    filename = art.name.replace('"', "")
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{filename}"'}
    if request.headers.get("if-none-match") in (etag, "*"):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    rng = request.headers.get("range")
    if_range = request.headers.get("if-range")
    span = None
    if rng and (if_range is None or if_range == etag):
        try:
            span = parse_range(rng, size)
        except RangeNotSatisfiable as e:
            return JSONResponse(error_body(str(e), kind="range_not_satisfiable"),
                                status_code=status.HTTP_416_RANGE_NOT_SATISFIABLE,
                                headers={**headers, "Content-Range": f"bytes */{size}"})
    start, end = span if span is not None else (0, size - 1)
    length = max(0, end - start + 1)
    headers["Content-Length"] = str(length)
    code = status.HTTP_200_OK
    if span is not None:
        code = status.HTTP_206_PARTIAL_CONTENT
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if request.method == "HEAD" or length == 0:
        return Response(status_code=code, headers=headers, media_type=art.media_type)
    return StreamingResponse(iter_file(path, start, end), status_code=code, headers=headers, media_type=art.media_type)


router.add_api_route("/{artifact_id}", download, methods=["HEAD"], operation_id="head_artifact", response_class=Response,
                     responses=DOWNLOAD_RESPONSES)
