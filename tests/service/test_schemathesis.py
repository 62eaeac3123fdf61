"""Schemathesis against the embedded service's ASGI app, authenticated through the
OpenAPI ``bearer`` security scheme: no server errors, and every response (status, content
type, headers, body) as the OpenAPI document describes it.

Bounded: a fixed number of examples per operation, derandomized, so a run is repeatable
and stays well under a minute.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from otcclip.service.core.config import Settings

MAX_EXAMPLES = int(os.environ.get("OTCCLIP_SCHEMATHESIS_EXAMPLES", "10"))
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance", "negative_data_rejection")


def _png_zip() -> bytes:
    import io
    import zipfile

    from PIL import Image

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(3):
            png = io.BytesIO()
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(png, "PNG")
            z.writestr(f"{i}.png", png.getvalue())
    return buf.getvalue()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The embedded configuration's app with one key, one dataset, one finished job with
    a metric and an artifact (so generated requests also reach the 200 paths)."""
    from fastapi.testclient import TestClient

    from otcclip.migrations import upgrade
    from otcclip.service.api.main import create_app
    from otcclip.service.db import crud
    from otcclip.service.db.models import Job

    settings = Settings(data_dir=tmp_path_factory.mktemp("schemathesis") / "data", max_upload_bytes=1 << 20)
    upgrade(settings.db_url)
    app = create_app(settings)
    with app.state.sessions() as db:
        _, key = crud.create_api_key(db, "schemathesis")
        db.commit()
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
        manifest = b"image,caption\n0.png,a dark square\n1.png,a red square\n2.png,a bright red square\n"
        r = client.post("/v1/datasets", files={"manifest": ("m.csv", manifest), "images": ("i.zip", _png_zip())})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
    with app.state.sessions() as db:
        owner = crud.key_by_plaintext(db, key)
        job = Job(owner_id=owner.id, kind="train", dataset_id=dataset_id, settings={}, stage="done", state="succeeded",
                  result={"epochs": 1})
        db.add(job)
        db.flush()
        crud.upsert_metric(db, job.id, 0, {"loss": 1.5})
        with app.state.storage.writer(f"jobs/{job.id}/report.json") as w:
            w.write(b'{"ok": true}')
        art = crud.add_artifact(db, owner_id=owner.id, job_id=job.id, kind="report", name="report.json",
                                path=f"jobs/{job.id}/report.json", media_type="application/json",
                                size_bytes=w.size, sha256=w.hash.hexdigest())
        db.commit()
        ids = {"dataset_id": dataset_id, "job_id": job.id, "artifact_id": art.id}
    config = SchemathesisConfig.from_dict({
        "auth": {"openapi": {"bearer": {"bearer": key}}},
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
    })
    yield {"schema": schemathesis.openapi.from_asgi("/openapi.json", app, config=config), "ids": ids}


@pytest.fixture(scope="module")
def api_schema(service: dict[str, Any]) -> Any:
    return service["schema"]


def test_api_conforms_to_its_schema(service: dict[str, Any]) -> None:
    """Every operation, :data:`MAX_EXAMPLES` cases each of: valid data, invalid data, and
    valid data on the seeded dataset / job / artifact ids (DELETE runs last)."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import checks as st_checks
    from schemathesis.generation.modes import GenerationMode

    chosen = [getattr(st_checks, name) for name in CHECKS]
    operations = sorted((result.ok() for result in service["schema"].get_all_operations()),
                        key=lambda op: op.method.upper() == "DELETE")
    assert len(operations) >= 16
    failures: list[str] = []
    seen: dict[int, int] = {}
    for op in operations:
        names = {p.name for p in op.path_parameters}
        strategies = [op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE)]
        if names:
            strategies.append(op.as_strategy(path_parameters={n: service["ids"][n] for n in names}))
        for strategy in strategies:

            @given(case=strategy)
            @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                response = case.call()
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                case.validate_response(response, checks=chosen)

            try:
                run()
            except Unsatisfiable:  # no invalid request exists (an operation without parameters)
                continue
            except Exception as e:  # collect every operation's first failure
                failures.append(f"{op.method.upper()} {op.path}: {e}")
    assert not failures, "\n\n".join(failures)
    assert seen.get(200, 0) > 0 and seen.get(422, 0) > 0 and seen.get(404, 0) > 0, seen  # the cases reached the handlers
    assert not any(code >= 500 for code in seen), seen


def test_the_document_describes_auth_uploads_and_errors(api_schema: Any) -> None:
    doc = api_schema.raw_schema
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "An API key: `otcclip keys create NAME`"}
    upload = doc["paths"]["/v1/datasets"]["post"]
    body = upload["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["manifest"] and body["properties"]["manifest"]["format"] == "binary"
    assert {"401", "413", "415", "422", "503"} <= set(upload["responses"])
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path.startswith("/v1/"):
                assert op["security"] == [{"bearer": []}], (method, path)
                assert {"401", "422", "503"} <= set(op["responses"]), (method, path)
                for code, resp in op["responses"].items():
                    if code[0] in "45":
                        ref = resp["content"]["application/json"]["schema"]["$ref"]
                        assert ref == "#/components/schemas/ErrorOut", (method, path, code)
