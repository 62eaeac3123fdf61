"""Bad input against the embedded service: each refused with its status and a message,
and the service keeps serving afterwards."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.service.conftest import SANITIZE, Api


@pytest.fixture(scope="module")
def api(embedded) -> Api:
    a = Api(embedded.url, embedded.create_key("bad-input"))
    a.storage_root = embedded.settings.storage_root  # type: ignore[attr-defined]
    return a


@pytest.fixture(scope="module")
def other(embedded) -> Api:
    return Api(embedded.url, embedded.create_key("someone-else"))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _zip(tmp: Path, members: dict[str, bytes], name: str = "images.zip") -> Path:
    p = tmp / name
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        for k, v in members.items():
            z.writestr(k, v)
    return p


def _csv(tmp: Path, rows: list[tuple[str, str]], name: str = "m.csv") -> Path:
    p = tmp / name
    p.write_text("image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return p


def _message(r: httpx.Response) -> str:
    return str(r.json().get("message", r.json()))


def test_auth_missing_wrong_and_foreign_keys(api, other, tiny_dataset, embedded):
    assert httpx.get(f"{embedded.url}/v1/datasets").status_code == 401
    r = httpx.get(f"{embedded.url}/v1/datasets", headers={"Authorization": "Bearer otc_nope"})
    assert r.status_code == 401 and "invalid API key" in _message(r)
    ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
    r = other.http.get(f"/v1/datasets/{ds}")
    assert r.status_code == 404 and ds in _message(r)
    assert other.http.delete(f"/v1/datasets/{ds}").status_code == 404
    assert ds not in [d["id"] for d in other.http.get("/v1/datasets").json()["items"]]
    assert other.job("sanitize", ds, SANITIZE).status_code == 422  # someone else's dataset
    assert api.http.get(f"/v1/datasets/{ds}").status_code == 200


def test_oversize_upload_is_413(api, tmp_path):
    big = tmp_path / "big.zip"
    big.write_bytes(b"\0" * (5 << 20))  # the fixture caps uploads at 4 MiB
    r = api.upload(_csv(tmp_path, [("a.png", "x")]), big)
    assert r.status_code == 413 and "size limit" in _message(r)
    # chunked (no Content-Length): refused while streaming, nothing left in storage
    boundary = "xyzzy"

    def body():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="manifest"; filename="m.csv"\r\n\r\n'.encode()
        yield b"image,caption\na.png,x\n\r\n"
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="i.zip"\r\n\r\n'.encode()
        for _ in range(6):
            yield b"\0" * (1 << 20)
        yield f"\r\n--{boundary}--\r\n".encode()

    root = Path(api.storage_root) / "datasets"
    before = set(root.iterdir()) if root.exists() else set()
    r = api.http.post("/v1/datasets", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "size limit" in _message(r)
    assert (set(root.iterdir()) if root.exists() else set()) == before  # nothing half-written kept


@pytest.mark.parametrize(
    ("rows", "needle"),
    [([("../etc/passwd", "a caption")], "escapes"),
     ([("/etc/passwd", "a caption")], "absolute"),
     ([("missing.png", "a caption")], "missing.png")],
)
def test_manifest_path_escapes_and_missing_images(api, tmp_path, rows, needle):
    r = api.upload(_csv(tmp_path, rows), _zip(tmp_path, {"a.png": _png()}))
    assert r.status_code == 422, r.text
    body = r.json()
    item = body["detail"][0]
    assert needle in body["message"] and needle in item["msg"] and item["row"] is not None and item["file"] == "m.csv"
    assert str(tmp_path) not in r.text


def test_malformed_manifest(api, tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("picture,text\na.png,hello\n")
    r = api.upload(p, _zip(tmp_path, {"a.png": _png()}))
    assert r.status_code == 422 and "image" in _message(r)
    r = api.upload(p, _zip(tmp_path, {"a.png": _png()}), manifest_name="m.exe")
    assert r.status_code == 422 and "unknown manifest format" in _message(r)
    r = api.upload(_csv(tmp_path, [("a.png", "x")]))
    assert r.status_code == 422 and "'images'" in _message(r)
    r = api.http.post("/v1/datasets", content=b"not multipart", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_tar_with_symlink_is_refused(api, tmp_path):
    tp = tmp_path / "images.tar"
    with tarfile.open(tp, "w") as tar:
        data = _png()
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    r = api.upload(_csv(tmp_path, [("a.png", "x"), ("b.png", "y")]), tp)
    assert r.status_code == 422 and "link" in _message(r).lower(), r.text


def test_zip_bomb_is_refused(api, tmp_path):
    bomb = _zip(tmp_path, {"a.png": _png(), "b.png": b"\0" * (40 << 20)})
    assert bomb.stat().st_size < 1 << 20
    r = api.upload(_csv(tmp_path, [("a.png", "x"), ("b.png", "y")]), bomb)
    assert r.status_code == 422 and ("ratio" in _message(r) or "limit" in _message(r)), r.text


def test_unknown_and_bad_settings(api, tiny_dataset):
    ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
    r = api.job("sanitize", ds, {**SANITIZE, "kk": 3})
    assert r.status_code == 422 and "settings.kk" in _message(r)
    r = api.job("sanitize", ds, {**SANITIZE, "k": "many"})
    assert r.status_code == 422 and "settings.k" in _message(r)
    r = api.job("train", ds, {"epochz": 1})
    assert r.status_code == 422 and "epochz" in _message(r)
    r = api.job("sanitize", ds, {**SANITIZE, "random_init": False, "checkpoint": "0" * 32})
    assert r.status_code == 422 and "checkpoint" in _message(r)
    r = api.http.post("/v1/jobs", json={"kind": "paint", "dataset_id": ds, "settings": {}})
    assert r.status_code == 422
    # the model as one object: refused as the sibling keys are, accepted and stored as them
    r = api.job("sanitize", ds, {**SANITIZE, "random_init": False, "model": {"name": "ViT-Q-99", "pretrained": "openai"}})
    assert r.status_code == 422 and "unknown model" in _message(r), r.text
    r = api.job("sanitize", ds, {**SANITIZE, "random_init": False, "model": {"name": "otc-micro"}})
    assert r.status_code == 422 and "needs a model with weights" in _message(r), r.text
    r = api.job("sanitize", ds, {**SANITIZE, "model": {"name": "otc-micro", "weights": "x"}})
    assert r.status_code == 422 and "settings.model" in _message(r), r.text
    r = api.job("sanitize", ds, {**SANITIZE, "model": {"name": SANITIZE["model"]}})
    assert r.status_code == 202, r.text
    assert r.json()["settings"] == api.http.get(f"/v1/jobs/{r.json()['id']}").json()["settings"] == SANITIZE
    assert api.wait(r.json()["id"])["state"] == "succeeded"
    doc = api.http.get("/openapi.json").json()["components"]["schemas"]["JobCreate"]["properties"]["settings"]
    assert '"model": {"name"' in doc["description"] and doc["examples"][0]["model"]["name"]


def test_corrupt_images_are_dropped_not_fatal(api, tmp_path):
    good = _png()
    members = {f"{i}.png": good for i in range(12)}
    members["bad1.png"] = b"\x89PNG not really"
    members["bad2.png"] = good[: len(good) // 3]
    rows = [(f"{i}.png", f"a red square number {i}") for i in range(12)] + [("bad1.png", "broken"), ("bad2.png", "truncated")]
    r = api.upload(_csv(tmp_path, rows), _zip(tmp_path, members))
    assert r.status_code == 201, r.text
    job = api.job("sanitize", r.json()["id"], {**SANITIZE, "k": 2}).json()
    j = api.wait(job["id"])
    assert j["state"] == "succeeded", j
    assert j["result"]["counts"]["reason"].get("drop/unreadable_image") == 2


def test_still_serving(api, embedded, tiny_dataset):
    assert httpx.get(f"{embedded.url}/healthz").status_code == 200
    assert httpx.get(f"{embedded.url}/readyz").json() == {"status": "ready"}
    assert api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).status_code == 201
    assert embedded.worker.poll() is None
