"""``POST /v1/checkpoints``: upload weights or an open_clip folder, then sanitize with it.

Through real HTTP with the embedded service and its Celery worker: a weights file of the
``otc-micro`` architecture plus ``model``, and an open_clip Hugging Face-layout tarball
(partial ``preprocess_cfg``, ``open_clip_pytorch_model.bin``) of the same weights, give
sanitize jobs with the same cleaned manifest; bad uploads are refused before storage.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otcclip.service.core.config import Settings
from tests.service.conftest import SANITIZE, Api

MAX_UPLOAD = 24 << 20


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The embedded service with an upload cap that fits an ``otc-micro`` checkpoint (about 13 MB)."""
    from otcclip.cli.embedded import run_service

    root = tmp_path_factory.mktemp("ckpt-svc")
    settings = Settings(data_dir=root / "data", max_upload_bytes=MAX_UPLOAD, progress_interval_s=0.5,
                        stop_poll_interval_s=0.2)
    with run_service(settings, worker_log=root / "worker.log") as svc:
        yield svc


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``otc-micro`` weights as a safetensors file and as an open_clip HF-layout ``.tar.gz``."""
    import open_clip
    import safetensors.torch
    import torch

    from otcclip.models.factory import get_model_config, register_shipped_configs

    register_shipped_configs()
    torch.manual_seed(4)
    state = {k: v.contiguous() for k, v in open_clip.create_model("otc-micro").state_dict().items()}
    root = tmp_path_factory.mktemp("weights")
    st = root / "micro.safetensors"
    safetensors.torch.save_file(state, str(st))
    folder = root / "hf"
    folder.mkdir()
    pp = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
          "interpolation": "bicubic"}  # open_clip's defaults, given partially as published configs do
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": get_model_config("otc-micro"),
                                                               "preprocess_cfg": pp}))
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    tgz = root / "micro-hf.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(folder, arcname="micro-hf")
    return {"safetensors": st, "tgz": tgz, "folder": folder}


def _post(api: Api, files: dict[str, Any], **fields: str) -> Any:
    return api.http.post("/v1/checkpoints", files=files, data=fields or None)


def _tar(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def _stored(service: Any) -> set[str]:
    root = Path(service.settings.storage_root) / "checkpoints"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


@pytest.mark.slow
def test_upload_then_sanitize(service: Any, tiny_dataset: dict[str, Path], weights: dict[str, Any]) -> None:
    api = Api(service.url, service.create_key("ckpt"))
    r = _post(api, {"weights": ("micro.safetensors", weights["safetensors"].read_bytes())}, model="otc-micro", name="mine")
    assert r.status_code == 201, r.text
    a = r.json()
    assert a["kind"] == "checkpoint" and a["job_id"] is None and a["name"] == "mine" and a["meta"]["model"] == "otc-micro"
    assert r.headers["location"] == f"/v1/artifacts/{a['id']}/meta"
    assert api.http.get(r.headers["location"]).json()["sha256"] == a["sha256"]
    blob = api.http.get(f"/v1/artifacts/{a['id']}").content
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert {"checkpoint/open_clip_config.json", "checkpoint/open_clip_model.safetensors"} <= set(tar.getnames())

    r = _post(api, {"checkpoint": ("micro-hf.tar.gz", weights["tgz"].read_bytes())})
    assert r.status_code == 201, r.text
    b = r.json()
    assert b["name"] == "micro-hf.tar.gz" and b["meta"]["source"] == "upload"

    ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
    cleaned = []
    for art in (a, b):
        job = api.wait(api.job("sanitize", ds, {**SANITIZE, "random_init": False, "checkpoint": art["id"]}).json()["id"])
        assert job["state"] == "succeeded", job
        assert sum(job["result"]["counts"]["action"].values()) == 40
        cleaned.append(api.http.get(f"/v1/artifacts/{api.artifact(job['id'], 'cleaned.csv')['id']}").content)
    assert cleaned[0] == cleaned[1]  # the same weights, uploaded in both forms

    other = Api(service.url, service.create_key("other"))
    ods = other.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
    assert other.job("sanitize", ods, {**SANITIZE, "random_init": False, "checkpoint": a["id"]}).status_code == 422
    assert other.http.delete(f"/v1/checkpoints/{a['id']}").status_code == 404
    assert api.http.delete(f"/v1/checkpoints/{a['id']}").status_code == 204
    assert api.http.get(f"/v1/artifacts/{a['id']}/meta").status_code == 404
    assert a["id"] not in _stored(service) and b["id"] in _stored(service)
    assert api.job("sanitize", ds, {**SANITIZE, "random_init": False, "checkpoint": a["id"]}).status_code == 422


def test_bad_uploads_are_refused_and_leave_nothing(service: Any, weights: dict[str, Any]) -> None:
    api = Api(service.url, service.create_key("bad"))
    before = _stored(service)
    st = ("micro.safetensors", weights["safetensors"].read_bytes())
    cfg = (weights["folder"] / "open_clip_config.json").read_bytes()

    def refused(files: dict[str, Any], code: int = 422, **fields: str) -> str:
        r = _post(api, files, **fields)
        assert r.status_code == code, r.text
        return str(r.json()["message"])

    assert "'model'" in refused({"weights": st})
    assert "unknown model 'ViT-Q-99'" in refused({"weights": st}, model="ViT-Q-99")
    assert "does not fit" in refused({"weights": st}, model="otc-tiny")
    assert "does not fit" in refused({"weights": ("junk.pt", b"not a state dict")}, model="otc-micro")
    assert "must be a" in refused({"weights": ("w.txt", b"x")}, model="otc-micro")
    assert "give one file" in refused({"weights": st, "checkpoint": ("c.tar", b"x")}, model="otc-micro")
    assert "multipart" in refused({}, 415)
    assert "not a readable tar" in refused({"checkpoint": ("c.tar", b"not a tar")})
    assert "unsafe path" in refused({"checkpoint": ("c.tar", _tar({"../evil/open_clip_config.json": cfg}))})
    assert "not a regular file" in refused({"checkpoint": ("c.tar", _tar({"d/open_clip_config.json": cfg},
                                                                          links={"d/w.bin": "/etc/passwd"}))})
    assert "exactly one open_clip_config.json" in refused({"checkpoint": ("c.tar", _tar({"x.txt": b"x"}))})
    msg = refused({"checkpoint": ("c.tar", _tar({"d/open_clip_config.json": cfg, "d/open_clip_model.safetensors": b"bad"}))})
    assert "cannot load" in msg or "do not match" in msg
    assert "size limit" in refused({"weights": ("big.bin", b"\0" * (MAX_UPLOAD + 1))}, 413, model="otc-micro")
    assert _stored(service) == before
