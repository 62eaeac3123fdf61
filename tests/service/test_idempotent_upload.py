"""``Idempotency-Key`` on uploads: a retried upload gets the first one's dataset, a reused key with other content 409."""

from __future__ import annotations

import threading
from typing import Any

from otcclip.service.core.config import Settings
from tests.service.conftest import Api


def test_a_retried_upload_returns_the_same_dataset(tmp_path: Any, tiny_dataset: dict) -> None:
    from otcclip.cli.embedded import run_service

    with run_service(Settings(data_dir=tmp_path / "data"), worker=False) as svc:
        api = Api(svc.url, svc.create_key("idem"))
        first = api.upload(tiny_dataset["manifest"], tiny_dataset["images"], Idempotency_Key="k1")
        assert first.status_code == 201, first.text
        again = api.upload(tiny_dataset["manifest"], tiny_dataset["images"], Idempotency_Key="k1")
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == f"/v1/datasets/{first.json()['id']}"
        # the same key with other content is a conflict; without a key a second dataset is made
        other = api.upload(tiny_dataset["manifest"], Idempotency_Key="k1", manifest_name="other.csv")
        assert other.status_code == 409, other.text
        assert api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"] != first.json()["id"]
        # concurrent retries with a new key: one dataset
        ids: list[str] = []
        ts = [threading.Thread(target=lambda: ids.append(api.upload(
            tiny_dataset["manifest"], tiny_dataset["images"], Idempotency_Key="k2").json()["id"])) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert len(ids) == 3 and len(set(ids)) == 1
        assert api.http.get("/v1/datasets").json()["total"] == 3
        # another key holder's key does not collide
        other_api = Api(svc.url, svc.create_key("someone else"))
        assert other_api.upload(tiny_dataset["manifest"], tiny_dataset["images"], Idempotency_Key="k1").status_code == 201
