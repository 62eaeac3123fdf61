"""``/v1/datasets``: upload (streamed, capped, checksummed, validated), list, get, rows, delete."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError

from otcclip.service.api.deps import (
    DbDep,
    Offset,
    OwnerDep,
    SettingsDep,
    ShortTransactionRoute,
    StorageDep,
    as_utc,
)
from otcclip.service.api.errors import error_responses
from otcclip.service.api.uploads import UploadedFile, staged_upload
from otcclip.service.core.config import Settings
from otcclip.service.db import crud
from otcclip.service.db.models import Dataset, new_id
from otcclip.service.manifests import archive_limits, open_dataset
from otcclip.service.schemas import DatasetList, DatasetOut, RowsOut

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], route_class=ShortTransactionRoute)

MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet", ".tar")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
MAX_NAME_CHARS = 300
#: Optional form fields naming the input columns that hold the key columns.
MAPPING_FIELDS = {"image_col": "image", "caption_col": "caption", "id_col": "id"}


UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {"multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["manifest"],
            "properties": {
                "manifest": {"type": "string", "format": "binary",
                             "description": f"The manifest ({', '.join(MANIFEST_SUFFIXES)}); a .tar is WebDataset shards"},
                "images": {"type": "string", "format": "binary",
                           "description": f"The images the manifest names ({', '.join(ARCHIVE_SUFFIXES)})"},
                "name": {"type": "string", "maxLength": MAX_NAME_CHARS, "description": "A display name (default: the manifest's file name)"},
                **{f: {"type": "string", "maxLength": 200, "description": f"The manifest's column holding the {key} (default {key!r})"}
                   for f, key in MAPPING_FIELDS.items()},
            },
        },
    }},
}


def _suffix(name: str, allowed: tuple[str, ...]) -> str | None:
    low = name.lower()
    return next((s for s in sorted(allowed, key=len, reverse=True) if low.endswith(s)), None)


def _mapping(fields: dict[str, str]) -> dict[str, str]:
    """The column mapping given in the upload's form fields (``image_col``, ``caption_col``, ``id_col``)."""
    return {key: fields[f].strip() for f, key in MAPPING_FIELDS.items() if (fields.get(f) or "").strip()}


def _validate(settings: Settings, ddir: Path, manifest: UploadedFile, images: UploadedFile | None,
              mapping: dict[str, str] | None = None) -> tuple[Any, dict[str, Any]]:
    from otcclip.models.manifest import ManifestError, read_manifest

    msuf = _suffix(manifest.filename, MANIFEST_SUFFIXES)
    if msuf is None:
        raise _unprocessable(f"{manifest.filename}: unknown manifest format (expected one of {', '.join(MANIFEST_SUFFIXES)})",
                             file=manifest.filename)
    mpath = ddir / f"manifest{msuf}"
    os.replace(manifest.path, mpath)
    ipath = None
    if images is not None:
        isuf = _suffix(images.filename, ARCHIVE_SUFFIXES)
        if isuf is None:
            raise _unprocessable(f"{images.filename}: images must be a .zip, .tar or .tar.gz archive", file=images.filename)
        ipath = ddir / f"images{isuf}"
        os.replace(images.path, ipath)
        ipath = _plain_tar(settings, ipath, images.filename)
    elif msuf not in (".tar", ".parquet"):
        raise _unprocessable("form field 'images' is required: a zip or tar archive holding the manifest's images",
                             file=manifest.filename)
    names = {str(mpath): manifest.filename}
    if ipath is not None and images is not None:
        names[str(ipath)] = images.filename
    try:
        m = read_manifest(mpath, images=ipath, columns=("image",), mapping=mapping, limits=archive_limits(settings),
                          check_images=True)
    except ManifestError as e:
        raise _unprocessable(
            f"{names.get(e.file, Path(e.file).name)}{'' if e.row is None else f':row {e.row}'}: {_scrub(e.reason, names)}",
            file=names.get(e.file, Path(e.file).name), row=e.row, reason=_scrub(e.reason, names),
        ) from e
    try:
        cols = list(m.table.column_names)
        if "caption" not in cols and "label" not in cols:
            raise _unprocessable(f"{manifest.filename}: needs a 'caption' or 'label' column", file=manifest.filename)
        info = {"format": m.format, "n_rows": len(m), "columns": cols, "manifest": mpath, "images": ipath,
                "mapping": mapping or {}}
        _save_index(m.images)
    finally:
        m.images.close()
    return m, info


def _save_index(store: Any) -> None:
    """Store the checked archive's member index beside it (``images.zip.index``, ...), so no
    later open - a rows preview in another API process, every worker - parses the archive
    again. Best effort: without the file each process parses the archive once."""
    try:
        store.save_index()
    except OSError as e:
        log.warning("archive index not stored (%s: %s)", type(e).__name__, e)


def _plain_tar(settings: Settings, path: Path, client_name: str) -> Path:
    """A compressed tar stored as a plain ``images.tar`` (decompressed once, here, with the
    size and ratio caps checked while streaming), so no later open decompresses it again."""
    from otcclip.models.images import ArchiveError
    from otcclip.models.stores import compression_of, decompress_tar

    try:
        opener = compression_of(path)
        if opener is None or zipfile.is_zipfile(path):
            return path
        partial = path.with_name(".images.tar.partial")
        with open(partial, "wb") as fh:
            decompress_tar(path, fh, limits=archive_limits(settings), opener=opener)
    except ArchiveError as e:
        raise _unprocessable(_scrub(str(e), {str(path): client_name}), file=client_name) from e
    plain = path.with_name("images.tar")
    os.replace(partial, plain)
    if path != plain:
        path.unlink()
    return plain


def _scrub(text: str, names: dict[str, str]) -> str:
    """Replace server-side paths in an engine message by the client's file names."""
    for server, client in names.items():
        text = text.replace(server, client)
    return text


def _unprocessable(message: str, **extra: Any) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"message": message, **extra})


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut,
             responses={200: {"model": DatasetOut, "description": "The dataset of an earlier upload with the same "
                                                                   "Idempotency-Key and content"},
                        **error_responses(401, 409, 413, 415, 422, 503)},
             openapi_extra={"requestBody": UPLOAD_BODY})
async def upload_dataset(request: Request, response: Response, owner: OwnerDep, settings: SettingsDep,
                         storage: StorageDep,
                         idempotency_key: str | None = Header(default=None, max_length=200)) -> Any:
    """Upload a manifest (form field ``manifest``) and optionally an ``images`` archive.

    The body is streamed into a staging folder (no database connection is held), checked
    in a worker thread, moved to ``datasets/<id>/`` and recorded in one short transaction.
    Past ``max_concurrent_uploads`` uploads in progress it waits up to ``upload_queue_wait_s``
    for a slot, then answers 503 + ``Retry-After``.

    Optional form fields ``image_col``, ``caption_col`` and ``id_col`` name the manifest's
    columns that hold the image, the caption and the id (default ``image``, ``caption``, ``id``).
    A Parquet manifest whose images are embedded as bytes needs no ``images`` archive.

    With ``Idempotency-Key`` a retried upload (same key, same files and fields) answers 200
    with the dataset the first one created, and the same key with other content 409.
    """
    dataset_id = new_id()
    async with staged_upload(request, dataset_id, file_fields=("manifest", "images")) as (form, staging):
        if "manifest" not in form.files:
            raise _unprocessable("form field 'manifest' (a file) is required")
        mf, imf = form.files["manifest"], form.files.get("images")
        if len(form.fields.get("name", "")) > MAX_NAME_CHARS:
            raise _unprocessable(f"form field 'name' is longer than {MAX_NAME_CHARS} characters")
        request_hash = _request_hash(mf, imf, form.fields)
        if idempotency_key:
            prior = await run_in_threadpool(_prior, request.app.state.sessions, owner.id, idempotency_key, request_hash)
            if prior is not None:
                response.status_code = status.HTTP_200_OK
                response.headers["Location"] = f"/v1/datasets/{prior.id}"
                return prior
        _, info = await run_in_threadpool(_validate, settings, staging, mf, imf, _mapping(form.fields))
        ds = Dataset(
            id=dataset_id, owner_id=owner.id, name=(form.fields.get("name") or mf.filename)[:MAX_NAME_CHARS],
            format=info["format"], manifest_path=f"datasets/{dataset_id}/{info['manifest'].name}",
            images_path=f"datasets/{dataset_id}/{info['images'].name}" if info["images"] else None,
            n_rows=info["n_rows"], sha256=mf.sha256,
            columns={"names": info["columns"], **({"mapping": info["mapping"]} if info["mapping"] else {})},
            images_sha256=imf.sha256 if imf else None, size_bytes=mf.size + (imf.size if imf else 0),
            idempotency_key=idempotency_key, request_hash=request_hash,
        )
        try:
            out = await run_in_threadpool(_record, request.app.state.sessions, storage, staging, ds)
        except IntegrityError:
            # a concurrent upload with the same key won the insert: answer with its dataset
            prior = await run_in_threadpool(_prior, request.app.state.sessions, owner.id, idempotency_key or "",
                                            request_hash)
            if prior is None:
                raise
            response.status_code = status.HTTP_200_OK
            response.headers["Location"] = f"/v1/datasets/{prior.id}"
            return prior
    response.headers["Location"] = f"/v1/datasets/{dataset_id}"
    return out


def _request_hash(mf: UploadedFile, imf: UploadedFile | None, fields: dict[str, str]) -> str:
    """sha256 over what an upload carried: its files' hashes and its form fields."""
    parts = {"manifest": mf.sha256, "images": imf.sha256 if imf else None, "fields": dict(sorted(fields.items()))}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _prior(sessions: Any, owner_id: str, key: str, request_hash: str) -> DatasetOut | None:
    """The dataset an earlier upload with ``key`` created (None: none); 409 when its content differed."""
    with sessions() as db:
        ds = crud.dataset_by_idempotency(db, owner_id, key)
        if ds is None:
            return None
        if ds.request_hash != request_hash:
            raise HTTPException(status.HTTP_409_CONFLICT, "Idempotency-Key was already used with a different upload")
        return _out(ds)


def _record(sessions: Any, storage: Any, staging: Path, ds: Dataset) -> DatasetOut:
    """Move the checked upload into place and insert its row (one short transaction)."""
    final = storage.dataset_dir(ds.id)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    try:
        with sessions() as db, db.begin():
            db.add(ds)
            db.flush()
            return _out(ds)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise


def _out(ds: Dataset) -> DatasetOut:
    return DatasetOut(
        id=ds.id, name=ds.name, format=ds.format, n_rows=ds.n_rows, columns=list(ds.columns.get("names", [])),
        sha256=ds.sha256, images_sha256=ds.images_sha256, size_bytes=ds.size_bytes, created_at=as_utc(ds.created_at),
    )


def _get(db: Any, owner_id: str, dataset_id: str) -> Dataset:
    ds = crud.get_dataset(db, owner_id, dataset_id)
    if ds is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"dataset {dataset_id} not found")
    return ds


@router.get("", response_model=DatasetList, responses=error_responses(401, 422, 503))
def list_datasets(db: DbDep, owner: OwnerDep, offset: Offset = 0, limit: int = Query(50, ge=1, le=500)) -> Any:
    rows, total = crud.list_datasets(db, owner.id, offset=offset, limit=limit)
    return DatasetList(total=total, offset=offset, limit=limit, items=[_out(r) for r in rows])


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(401, 404, 422, 503))
def get_dataset(dataset_id: str, db: DbDep, owner: OwnerDep) -> Any:
    return _out(_get(db, owner.id, dataset_id))


@router.get("/{dataset_id}/rows", response_model=RowsOut, responses=error_responses(401, 404, 422, 503))
def dataset_rows(dataset_id: str, db: DbDep, owner: OwnerDep, settings: SettingsDep, storage: StorageDep,
                 offset: Offset = 0, limit: int = Query(20, ge=1, le=1000)) -> Any:
    """Rows ``offset .. offset+limit`` of the manifest (non-finite numbers are sent as null)."""
    ds = _get(db, owner.id, dataset_id)
    db.commit()  # the connection goes back to the pool while the manifest is read
    table = _preview_table(settings, storage.root, ds)
    part = table.slice(offset, limit)
    return RowsOut(total=table.num_rows, offset=offset, limit=limit, columns=list(part.column_names), rows=part.to_pylist())


#: Manifest tables kept for the rows preview (a stored dataset never changes; paging
#: through a 200,000-row manifest then reads it once, not once per page).
PREVIEW_CACHE_SIZE = 4
#: Tables larger than this are read for each request instead of being kept.
PREVIEW_CACHE_MAX_BYTES = 64 << 20
_PREVIEWS: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_PREVIEWS_LOCK = threading.Lock()


def clear_preview_cache() -> None:
    """Forget the manifest tables kept for the rows preview (benchmarks, tests)."""
    with _PREVIEWS_LOCK:
        _PREVIEWS.clear()


def _preview_table(settings: Settings, root: Path, ds: Dataset) -> Any:
    """The dataset's manifest as a pyarrow table, from a small per-process cache keyed to
    the stored manifest file's version."""
    try:
        st = os.stat(root / ds.manifest_path)
    except OSError:  # open_dataset reports it
        st = None
    key = (ds.id, ds.manifest_path, st.st_size, st.st_mtime_ns) if st is not None else None
    with _PREVIEWS_LOCK:
        table = _PREVIEWS.get(key) if key is not None else None
        if key is not None and table is not None:
            _PREVIEWS.move_to_end(key)
            return table
    m = open_dataset(settings, root, ds)
    try:
        table = m.table
    finally:
        m.images.close()
    if key is not None and table.nbytes <= PREVIEW_CACHE_MAX_BYTES:
        with _PREVIEWS_LOCK:
            _PREVIEWS[key] = table
            while len(_PREVIEWS) > PREVIEW_CACHE_SIZE:
                _PREVIEWS.popitem(last=False)
    return table


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses=error_responses(401, 404, 422, 503))
def delete_dataset(dataset_id: str, db: DbDep, owner: OwnerDep, storage: StorageDep) -> Response:
    ds = _get(db, owner.id, dataset_id)
    db.delete(ds)
    db.commit()  # the row first (a short write), then the files, outside the transaction
    storage.remove(f"datasets/{dataset_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
