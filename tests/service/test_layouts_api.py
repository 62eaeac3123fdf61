"""The API takes the layouts data engineers have: a HF Parquet with image bytes (no archive),
a column-mapped CSV (``image_col``/``caption_col``/``id_col`` form fields); both sanitize end
to end; an empty caption is a 422 naming the row."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.models.layouts import caption, hf_parquet, jpg, mapped_csv
from tests.service.conftest import SANITIZE, Api

N = 20


@pytest.fixture(scope="module")
def api(embedded) -> Api:
    return Api(embedded.url, embedded.create_key("layouts"))


def _sanitize(api: Api, dataset_id: str) -> dict:
    r = api.job("sanitize", dataset_id, SANITIZE)
    assert r.status_code in (200, 201, 202), r.text
    job = api.wait(r.json()["id"])
    assert job["state"] == "succeeded", job
    return job


def test_hf_parquet_with_image_bytes(api: Api, tmp_path: Path) -> None:
    path = hf_parquet(tmp_path / "train.parquet", N)
    r = api.upload(path)
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["n_rows"] == N and "text" not in ds["columns"] and "caption" in ds["columns"]
    rows = api.http.get(f"/v1/datasets/{ds['id']}/rows", params={"limit": 3})
    assert rows.status_code == 200 and rows.json()["rows"][1]["caption"] == caption(1)
    job = _sanitize(api, ds["id"])
    art = api.artifact(job["id"], "cleaned.parquet")
    t = pq.read_table(io.BytesIO(api.http.get(f"/v1/artifacts/{art['id']}").content))
    assert "text" in t.column_names and pa.types.is_struct(t.schema.field("image").type)
    by_path = {v["path"]: v["bytes"] for v in t.column("image").to_pylist()}
    assert by_path and all(b == jpg(int(p.split(".")[0])) for p, b in by_path.items())


def test_mapped_csv_form_fields(api: Api, tmp_path: Path) -> None:
    path = mapped_csv(tmp_path / "d", N)
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(N):
            z.write(tmp_path / "d" / "pics" / f"{i:03d}.jpg", f"pics/{i:03d}.jpg")
    files = {"manifest": (path.name, path.read_bytes()), "images": (archive.name, archive.read_bytes())}
    r = api.http.post("/v1/datasets", files=files)
    assert r.status_code == 422 and "missing required column" in r.json()["message"]
    fields = {"image_col": "filepath", "caption_col": "alt", "id_col": "uid"}
    r = api.http.post("/v1/datasets", files=files, data={**fields, "name": "mapped"})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["n_rows"] == N
    job = _sanitize(api, ds["id"])
    art = api.artifact(job["id"], "cleaned.csv")
    header = api.http.get(f"/v1/artifacts/{art['id']}").text.splitlines()[0].split(",")
    assert {"uid", "filepath", "alt", "otcclip_action"} <= set(header)
    r = api.http.post("/v1/datasets", files=files, data={"image_col": "nope"})
    assert r.status_code == 422 and "--image-col 'nope'" in r.json()["message"]


def test_empty_caption_is_422_naming_the_row(api: Api, tmp_path: Path) -> None:
    path = hf_parquet(tmp_path / "e.parquet", 4)
    t = pq.read_table(path)
    pq.write_table(t.set_column(1, "text", pa.array([caption(0), caption(1), "", caption(3)])), path)
    r = api.upload(path)
    assert r.status_code == 422
    body = r.json()
    assert "empty caption" in body["message"] and "row 3" in body["message"]
