"""``/v1/checkpoints``: upload a model a sanitize job can use without a train job first.

Two forms (``multipart/form-data``):

- ``checkpoint``: a ``.tar``, ``.tar.gz`` or ``.tgz`` of an open_clip ``local-dir`` folder
  (``open_clip_config.json`` and a weights file, at the archive's root or in one folder),
  as ``otcclip train`` writes it or as open_clip publishes models on the Hugging Face Hub;
- ``weights``: a ``.safetensors``, ``.bin``, ``.pt`` or ``.pth`` state dict, with the form
  field ``model`` naming its open_clip architecture (``ViT-B-32``, ``otc-tiny``); it is
  stored as a checkpoint folder in this project's format.

Both are loaded before anything is stored, so a job never meets an unreadable model. The
result is a ``checkpoint`` artifact with no job, laid out like a train job's checkpoint
(``meta.dir`` is the folder, the downloadable file a tar of it): jobs name it in
``settings.checkpoint`` and workers load it the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from otcclip.service.api.deps import DbDep, OwnerDep, SettingsDep, ShortTransactionRoute, StorageDep
from otcclip.service.api.errors import error_responses
from otcclip.service.api.uploads import UploadedFile, staged_upload
from otcclip.service.db import crud
from otcclip.service.db.models import Artifact, new_id
from otcclip.service.schemas import ArtifactOut
from otcclip.service.storage import Storage, tar_directory

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], route_class=ShortTransactionRoute)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Extracted bytes allowed per uploaded byte cap (a compressed tarball may grow this much).
EXTRACT_FACTOR = 2
MAX_MEMBERS = 64
CONFIG_NAME = "open_clip_config.json"


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"message": message})


def _extract(archive: Path, dest: Path, *, max_bytes: int, label: str) -> Path:
    """Extract regular files and folders of ``archive`` into ``dest``; return the folder holding the config.

    Refuses links, devices, absolute or parent-relative names, more than
    :data:`MAX_MEMBERS` entries and more than ``max_bytes`` of content, checking each
    header before its data is read (a compressed bomb stops at the cap).
    """
    total, members = 0, []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                name = PurePosixPath(m.name)
                if name.is_absolute() or ".." in name.parts:
                    raise _unprocessable(f"{label}: unsafe path {m.name!r} in the archive")
                if not (m.isfile() or m.isdir()):
                    raise _unprocessable(f"{label}: {m.name!r} is not a regular file or folder")
                members.append(m)
                total += m.size
                if len(members) > MAX_MEMBERS or total > max_bytes:
                    raise _unprocessable(f"{label}: more than {MAX_MEMBERS} entries or {max_bytes} bytes: "
                                         "not a checkpoint folder")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise _unprocessable(f"{label}: not a readable tar archive ({e})") from e
    configs = [p for p in dest.rglob(CONFIG_NAME) if p.is_file()]
    if len(configs) != 1:
        raise _unprocessable(f"{label}: expected exactly one {CONFIG_NAME} in the archive, found {len(configs)}")
    return configs[0].parent


def _from_tarball(up: UploadedFile, work: Path, *, max_bytes: int) -> tuple[Path, dict[str, Any]]:
    from otcclip.models.checkpoint import CheckpointError, load_checkpoint

    folder = _extract(up.path, work / "extract", max_bytes=max_bytes, label=up.filename)
    try:
        bundle = load_checkpoint(folder, device="cpu")
    except CheckpointError as e:
        raise _unprocessable(f"{up.filename}: {str(e).replace(str(folder), 'checkpoint')}") from e
    dest = work / "checkpoint"
    folder.rename(dest)
    shutil.rmtree(work / "extract", ignore_errors=True)
    return dest, {"model": bundle.name}


def _from_weights(up: UploadedFile, model: str | None, work: Path) -> tuple[Path, dict[str, Any]]:
    from otcclip.models.checkpoint import save_checkpoint
    from otcclip.models.factory import ModelLoadError, load_pretrained
    from otcclip.models.model_names import HF_HUB_PREFIX, UnknownModelError, validate_model_name

    if not model:
        raise _unprocessable("form field 'model' (the open_clip architecture of the weights, e.g. ViT-B-32) is required")
    if model.startswith(HF_HUB_PREFIX):
        raise _unprocessable(f"model {model!r}: weights need a config name (ViT-B-32, otc-tiny), not an hf-hub: repository")
    try:
        validate_model_name(model)
    except UnknownModelError as e:
        raise _unprocessable(str(e)) from e
    suffix = next(s for s in WEIGHT_SUFFIXES if up.filename.lower().endswith(s))
    weights = work / f"weights{suffix}"
    up.path.rename(weights)
    try:
        bundle = load_pretrained(model, weights, device="cpu")
    except ModelLoadError as e:
        raise _unprocessable(str(e).replace(str(weights), up.filename)) from e
    finally:
        weights.unlink(missing_ok=True)
    dest = save_checkpoint(bundle, work / "checkpoint", meta={"source": "upload", "weights": up.filename})
    return dest, {"model": model}


def _build(work: Path, files: dict[str, UploadedFile], fields: dict[str, str], *,
           max_bytes: int) -> tuple[Path, dict[str, Any]]:
    """Validate the upload and lay it out as ``work/checkpoint/`` plus ``work/checkpoint.tar``."""
    if len(files) != 1:
        raise _unprocessable("give one file: 'checkpoint' (a tar of an open_clip folder) or 'weights' with 'model'")
    (field, up), = files.items()
    low = up.filename.lower()
    if field == "checkpoint":
        if not low.endswith(TAR_SUFFIXES):
            raise _unprocessable(f"{up.filename}: a checkpoint must be a {', '.join(TAR_SUFFIXES)} archive")
        folder, meta = _from_tarball(up, work, max_bytes=max_bytes * EXTRACT_FACTOR)
    else:
        if not low.endswith(WEIGHT_SUFFIXES):
            raise _unprocessable(f"{up.filename}: weights must be a {', '.join(WEIGHT_SUFFIXES)} file")
        folder, meta = _from_weights(up, fields.get("model"), work)
    up.path.unlink(missing_ok=True)
    tar_directory(folder, work / "checkpoint.tar", arcname="checkpoint")
    return folder, {**meta, "source": "upload", "upload_sha256": up.sha256, "upload_name": up.filename}


UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "content": {"multipart/form-data": {
        "schema": {
            "type": "object",
            "properties": {
                "checkpoint": {"type": "string", "format": "binary",
                               "description": f"An open_clip checkpoint folder as {', '.join(TAR_SUFFIXES)}"},
                "weights": {"type": "string", "format": "binary",
                            "description": f"A state dict ({', '.join(WEIGHT_SUFFIXES)}); needs 'model'"},
                "model": {"type": "string", "maxLength": 200, "description": "The open_clip architecture of 'weights'"},
                "name": {"type": "string", "maxLength": 300, "description": "A display name (default: the file's name)"},
            },
        },
    }},
}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ArtifactOut,
             responses=error_responses(401, 413, 415, 422, 503), openapi_extra={"requestBody": UPLOAD_BODY})
async def upload_checkpoint(request: Request, response: Response, owner: OwnerDep, settings: SettingsDep,
                            storage: StorageDep) -> Any:
    """Upload a checkpoint tarball or a weights file + ``model``; 201 with the artifact to use as ``settings.checkpoint``.

    Streamed into a staging folder and loaded in a worker thread with no database
    connection held; then moved to ``checkpoints/<id>/`` and recorded in one short
    transaction (as dataset uploads are).
    """
    artifact_id = new_id()
    async with staged_upload(request, artifact_id, file_fields=("checkpoint", "weights")) as (form, staging):
        _, meta = await run_in_threadpool(_build, staging, form.files, form.fields,
                                          max_bytes=settings.max_upload_bytes)
        name = (form.fields.get("name") or next(iter(form.files.values())).filename)[:300]
        out = await run_in_threadpool(_record, request.app.state.sessions, storage, staging, artifact_id,
                                      owner.id, name, meta)
    log.info("checkpoint %s uploaded (%s, %d bytes)", artifact_id, meta.get("model"), out.size_bytes)
    response.headers["Location"] = f"/v1/artifacts/{artifact_id}/meta"
    return out


def _record(sessions: Any, storage: Storage, staging: Path, artifact_id: str, owner_id: str, name: str,
            meta: dict[str, Any]) -> ArtifactOut:
    """Move the checked upload into place and insert its artifact row (one short transaction)."""
    final = storage.path(f"checkpoints/{artifact_id}")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    try:
        stored = storage.register_file(final / "checkpoint.tar")
        art = Artifact(id=artifact_id, owner_id=owner_id, job_id=None, kind="checkpoint", name=name, path=stored.rel,
                       media_type="application/x-tar", size_bytes=stored.size, sha256=stored.sha256,
                       meta={**meta, "dir": storage.rel(final / "checkpoint")})
        with sessions() as db, db.begin():
            db.add(art)
            db.flush()
            return ArtifactOut.model_validate(art)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise


@router.delete("/{artifact_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses=error_responses(401, 404, 422, 503))
def delete_checkpoint(artifact_id: str, db: DbDep, owner: OwnerDep, storage: StorageDep) -> Response:
    """Delete an uploaded checkpoint (a train job's checkpoint goes with its job)."""
    art = crud.get_artifact(db, owner.id, artifact_id)
    if art is None or art.kind != "checkpoint" or art.job_id is not None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"uploaded checkpoint {artifact_id} not found")
    db.delete(art)
    db.commit()  # the row first (a short write), then the files, outside the transaction
    storage.remove(f"checkpoints/{artifact_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
