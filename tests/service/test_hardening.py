"""Inputs a fuzzer found that used to answer 500: each now gets its documented 4xx with
the one error model, in-process against the embedded configuration (SQLite, local storage)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from otcclip.service.core.config import Settings

HUGE = "9" * 5000


@pytest.fixture(scope="module")
def app_and_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    from otcclip.migrations import upgrade
    from otcclip.service.api.main import create_app
    from otcclip.service.db import crud

    settings = Settings(data_dir=tmp_path_factory.mktemp("hardening") / "data", max_form_parts=6)
    upgrade(settings.db_url)
    app = create_app(settings)
    with app.state.sessions() as db:
        _, key = crud.create_api_key(db, "hardening")
        db.commit()
    yield app, key


@pytest.fixture(scope="module")
def client(app_and_key) -> Iterator[TestClient]:
    app, key = app_and_key
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def _is_error_model(body: dict[str, Any]) -> bool:
    return (isinstance(body.get("message"), str) and isinstance(body.get("detail"), list) and body["detail"]
            and all(isinstance(i.get("loc"), list) and isinstance(i.get("msg"), str) and isinstance(i.get("type"), str)
                    for i in body["detail"]))


@pytest.fixture(scope="module")
def job_and_artifact(app_and_key) -> tuple[str, str, bytes]:
    """A failed job whose stored error is a traceback with server paths, and an artifact."""
    from otcclip.service.db import crud
    from otcclip.service.db.models import Job

    app, key = app_and_key
    storage = app.state.storage
    data = bytes(range(256)) * 4
    with app.state.sessions() as db:
        owner = crud.key_by_plaintext(db, key)
        job = Job(owner_id=owner.id, kind="sanitize", dataset_id=None, settings={}, stage="ingest", state="failed",
                  error=f"FileNotFoundError: [Errno 2] No such file or directory: '{storage.root}/datasets/x/images.zip'\n"
                        "Traceback (most recent call last):\n  File \"/opt/otcclip/workers/tasks.py\", line 40, in run\n")
        db.add(job)
        db.flush()
        with storage.writer(f"jobs/{job.id}/out.bin") as w:
            w.write(data)
        art = crud.add_artifact(db, owner_id=owner.id, job_id=job.id, kind="report", name="out.bin",
                                path=f"jobs/{job.id}/out.bin", media_type="application/octet-stream",
                                size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        db.commit()
        return job.id, art.id, data


@pytest.mark.parametrize("path", ["/v1/datasets", "/v1/jobs", "/v1/datasets/x/rows"])
@pytest.mark.parametrize("param", ["offset", "limit"])
@pytest.mark.parametrize("value", ["9223372036854775808", "-1", HUGE])
def test_huge_paging_numbers_are_422(client, path, param, value):
    r = client.get(path, params={param: value})
    assert r.status_code == 422, r.text
    body = r.json()
    assert _is_error_model(body) and body["detail"][0]["loc"] == ["query", param]


@pytest.mark.parametrize(("header", "status", "expected"), [
    (f"bytes=0-{HUGE}", 206, lambda d: d),
    (f"bytes={HUGE}-", 416, None),
    (f"bytes={HUGE}-{HUGE}", 416, None),
    (f"bytes=-{HUGE}", 206, lambda d: d),
    ("bytes=00000000000000000000000000010-19", 206, lambda d: d[10:20]),
    ("bytes=5000-", 416, None),
])
def test_range_headers_with_huge_numbers(client, job_and_artifact, header, status, expected):
    _, art, data = job_and_artifact
    r = client.get(f"/v1/artifacts/{art}", headers={"Range": header})
    assert r.status_code == status, r.text
    if expected is not None:
        assert r.content == expected(data)
    else:
        assert _is_error_model(r.json()) and r.headers["content-range"] == f"bytes */{len(data)}"


def test_job_error_is_one_line_without_server_paths(client, job_and_artifact, app_and_key):
    job, _, _ = job_and_artifact
    root = str(app_and_key[0].state.storage.root)
    for body in (client.get(f"/v1/jobs/{job}").json(), client.get("/v1/jobs").json()["items"][0]):
        err = body["error"]
        assert err == "FileNotFoundError: [Errno 2] No such file or directory: 'images.zip'"
        assert "\n" not in err and root not in err and "/opt/" not in err


def test_too_many_form_parts_is_422_early(client, app_and_key):
    boundary = "many"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'.encode()
    body = part * 40_000 + f"--{boundary}--\r\n".encode()
    r = client.post("/v1/datasets", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 422 and "form parts" in r.json()["message"] and _is_error_model(r.json())
    staging = app_and_key[0].state.storage.root / "uploads"
    assert not staging.exists() or not any(staging.iterdir())


def test_huge_part_headers_are_refused(client):
    boundary = "hdr"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="f"\r\nX-Pad: {"a" * 100_000}\r\n\r\nx\r\n'
            f"--{boundary}--\r\n").encode()
    r = client.post("/v1/datasets", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code in (413, 422) and "header" in r.json()["message"] and _is_error_model(r.json()), r.text


def test_every_422_has_the_array_shape(client, job_and_artifact):
    responses = [
        client.get("/v1/jobs", params={"limit": 0}),                             # FastAPI's validation
        client.post("/v1/jobs", json={"kind": "paint", "dataset_id": "x"}),       # body validation
        client.post("/v1/jobs", json={"kind": "sanitize", "dataset_id": "nope"}),  # handler: unknown dataset
        client.post("/v1/datasets", files={"images": ("i.zip", b"PK")}),          # handler: no manifest
        client.post("/v1/datasets", files={"manifest": ("m.exe", b"x")}),         # handler: bad format
    ]
    for r in responses:
        assert r.status_code == 422, r.text
        assert _is_error_model(r.json()), r.text


def test_every_error_status_uses_the_error_model(client, app_and_key):
    app, _ = app_and_key
    with TestClient(app) as anon:
        r = anon.get("/v1/datasets")
        assert r.status_code == 401 and _is_error_model(r.json()) and r.headers["www-authenticate"] == "Bearer"
    r = client.get("/v1/datasets/nope")
    assert r.status_code == 404 and _is_error_model(r.json())
    r = client.post("/v1/datasets", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and _is_error_model(r.json())


def test_rows_with_non_finite_numbers_are_strict_json(client):
    import io
    import zipfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for i in range(3):
            png = io.BytesIO()
            Image.new("RGB", (4, 4)).save(png, "PNG")
            z.writestr(f"{i}.png", png.getvalue())
    table = pa.table({"image": [f"{i}.png" for i in range(3)], "caption": ["a", "b", "c"],
                      "score": [float("nan"), float("inf"), 0.5]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    r = client.post("/v1/datasets", files={"manifest": ("m.parquet", buf.getvalue()), "images": ("i.zip", zbuf.getvalue())})
    assert r.status_code == 201, r.text
    r = client.get(f"/v1/datasets/{r.json()['id']}/rows")
    assert r.status_code == 200, r.text
    assert [row.get("score") for row in r.json()["rows"]] == [None, None, 0.5]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_in_job_settings_are_422(client, literal):
    body = '{"kind": "sanitize", "dataset_id": "x", "settings": {"ot": {"reg": LIT}, "lr": [1, LIT]}}'.replace("LIT", literal)
    r = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert _is_error_model(r.json())
    assert [i["loc"] for i in r.json()["detail"]] == [["body", "settings", "ot", "reg"], ["body", "settings", "lr", 1]]
