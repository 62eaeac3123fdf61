"""Overload and concurrency: the API keeps answering, sheds load with 503 + Retry-After
(never 500 or a hang), and cleans up after an API killed mid-upload."""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from otcclip.service.core.config import Settings
from tests.service.conftest import Api


def test_load_embedded_no_5xx_and_every_upload_created(tmp_path):
    """10 pollers + 3 uploaders for 10 s against ``otcclip serve`` (embedded, own process)."""
    from bench.load import make_upload, run_mode, table

    args = argparse.Namespace(pollers=10, uploads=3, seconds=10.0, poll_interval=0.5, timeout=30.0,
                              pg_url=None, redis_url=None)
    stats = run_mode("embedded", args, tmp_path, make_upload(100))
    print(table([stats]))
    assert stats.server_errors_not_503 == 0, stats.statuses
    assert not stats.errors, stats.errors  # no timeouts, no resets
    assert stats.uploads_started >= 3 and stats.uploads_created == stats.uploads_started
    assert stats.between(200, 300) >= 10 * 10  # the pollers were served throughout
    assert stats.percentile(0.99) < 10.0  # no poll waited anywhere near the 30 s client timeout


@pytest.fixture
def slow_service(tmp_path):
    from otcclip.cli.embedded import run_service

    settings = Settings(data_dir=tmp_path / "data", max_concurrent_uploads=1, upload_queue_wait_s=0, retry_after_s=3)
    with run_service(settings, worker=False) as svc:
        yield svc


def test_uploads_past_the_cap_get_503_while_the_api_keeps_answering(slow_service, tiny_dataset):
    api = Api(slow_service.url, slow_service.create_key("slow"))
    manifest = tiny_dataset["manifest"].read_bytes()
    images = tiny_dataset["images"].read_bytes()
    boundary = "slowslow"
    release = threading.Event()

    def body():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="manifest"; filename="m.csv"\r\n\r\n').encode()
        yield manifest + b"\r\n"
        release.wait(30)  # the upload stays in progress, holding the only slot
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="i.zip"\r\n\r\n').encode()
        yield images + f"\r\n--{boundary}--\r\n".encode()

    result: dict[str, httpx.Response] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", api.http.post(
        "/v1/datasets", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})))
    t.start()
    try:
        state = slow_service._server.config.app.state  # the running app (in this process)
        deadline = time.monotonic() + 60
        while state.uploads_active < 1:  # wait until the slow upload holds the slot
            assert time.monotonic() < deadline, "the slow upload never started"
            time.sleep(0.05)
        r = api.upload(tiny_dataset["manifest"], tiny_dataset["images"])
        assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
        assert r.json()["detail"][0]["type"] == "unavailable" and "uploads" in r.json()["message"]
        t0 = time.monotonic()
        assert httpx.get(f"{slow_service.url}/healthz", timeout=5).status_code == 200
        assert api.http.get("/v1/datasets").status_code == 200
        assert time.monotonic() - t0 < 5  # answered while the upload holds its slot (a shared CI box is slow)
    finally:
        release.set()
        t.join(30)
    assert result["r"].status_code == 201, result["r"].text
    assert api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).status_code == 201  # the slot is free again
    staging = slow_service.settings.storage_root / "uploads"
    assert not staging.exists() or not any(staging.iterdir())


def test_an_upload_past_the_cap_waits_for_a_slot(tmp_path, tiny_dataset):
    """A burst a little above the cap queues: the second upload waits for the first's slot."""
    from otcclip.cli.embedded import run_service

    settings = Settings(data_dir=tmp_path / "data", max_concurrent_uploads=1, upload_queue_wait_s=60)
    with run_service(settings, worker=False) as svc:
        api = Api(svc.url, svc.create_key("queue"))
        state = svc._server.config.app.state
        peak: list[int] = []
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                peak.append(state.uploads_active)
                time.sleep(0.01)

        w = threading.Thread(target=watch)
        w.start()
        results: list[int] = []
        ups = [threading.Thread(target=lambda: results.append(
            api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).status_code)) for _ in range(3)]
        for u in ups:
            u.start()
        for u in ups:
            u.join(120)
        watching.set()
        w.join(5)
    assert results == [201, 201, 201]
    assert max(peak) <= 1  # never more than the cap at once


def test_pool_exhaustion_is_503_not_500(tmp_path):
    from otcclip.migrations import upgrade
    from otcclip.service.api.main import create_app
    from otcclip.service.db import crud

    settings = Settings(data_dir=tmp_path / "data", api_threads=1, db_pool_timeout_s=0.2, retry_after_s=2)
    upgrade(settings.db_url)
    app = create_app(settings)
    with app.state.sessions() as db:
        _, key = crud.create_api_key(db, "pool")
        db.commit()
    engine = app.state.sessions.kw["bind"]
    held = []
    try:
        while True:  # take every connection the API's pool will give out
            try:
                held.append(engine.connect())
            except Exception:
                break
            if len(held) > 50:
                pytest.fail("the API's pool is not bounded")
        with TestClient(app) as client:
            r = client.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
        assert r.json()["detail"][0]["type"] == "unavailable"
    finally:
        for c in held:
            c.close()
    with TestClient(app) as client:
        assert client.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_orphaned_upload_folders_are_removed_at_start(tmp_path):
    from otcclip.service.api.main import create_app

    settings = Settings(data_dir=tmp_path / "data", orphan_upload_grace_s=600)
    staging = settings.storage_root / "uploads"
    old, fresh = staging / "old", staging / "fresh"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / ".up-images-x").write_bytes(b"partial")
    stamp = time.time() - 3600
    for p in (old, old / ".up-images-x"):
        os.utime(p, (stamp, stamp))
    dataset = settings.storage_root / "datasets" / "kept"
    dataset.mkdir(parents=True)
    os.utime(dataset, (stamp, stamp))
    create_app(settings)
    assert not old.exists() and fresh.exists() and dataset.exists()
    assert Path(fresh / ".up-images-x").read_bytes() == b"partial"


def test_a_locked_sqlite_database_is_503_not_500(tmp_path, monkeypatch):
    import sqlite3

    from otcclip.migrations import upgrade
    from otcclip.service.api.main import create_app
    from otcclip.service.db import crud, session
    from otcclip.service.db.models import Job

    monkeypatch.setattr(session, "SQLITE_BUSY_TIMEOUT_S", 0.2)  # wait 0.2 s for the lock, not 30
    settings = Settings(data_dir=tmp_path / "data", retry_after_s=4)
    upgrade(settings.db_url)
    app = create_app(settings)
    with app.state.sessions() as db:
        row, key = crud.create_api_key(db, "locked")
        job = Job(owner_id=row.id, kind="sanitize", dataset_id=None, settings={}, stage="queued")
        db.add(job)
        db.commit()
        job_id = job.id
    other = sqlite3.connect(settings.db_url.split("///", 1)[1], isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")  # another writer holds the lock
        with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as client:
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # WAL: readers go on
            r = client.post(f"/v1/jobs/{job_id}/cancel")
            assert r.status_code == 503 and r.headers["retry-after"] == "4", r.text
            assert "busy" in r.json()["message"]
            other.execute("ROLLBACK")
            assert client.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"
    finally:
        other.close()


def test_requests_past_max_inflight_get_503_and_probes_still_answer(tmp_path):
    """With one request allowed in flight, a second one while the first is held is shed."""
    import asyncio

    import anyio.to_thread

    from otcclip.migrations import upgrade
    from otcclip.service.api.main import create_app
    from otcclip.service.db import crud

    settings = Settings(data_dir=tmp_path / "data", max_inflight_requests=1, api_threads=3, retry_after_s=5)
    upgrade(settings.db_url)
    app = create_app(settings)
    with app.state.sessions() as db:
        _, key = crud.create_api_key(db, "inflight")
        db.commit()

    async def build_middleware_stack() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert (await c.get("/healthz")).status_code == 200

    async def scenario() -> list[int]:
        gate = asyncio.Event()
        await build_middleware_stack()
        shed = app.middleware_stack
        while not hasattr(shed, "max_inflight"):
            shed = shed.app
        inner = shed.app

        async def held_app(scope, receive, send):  # the first request waits inside the app
            if scope["type"] == "http" and scope["path"] == "/v1/datasets":
                await gate.wait()
            await inner(scope, receive, send)

        shed.app = held_app
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as c:
            first = asyncio.create_task(c.get("/v1/datasets"))
            await asyncio.sleep(0.2)
            second = await c.get("/v1/jobs")
            probe = await c.get("/healthz")
            assert anyio.to_thread.current_default_thread_limiter().total_tokens == 3
            gate.set()
            r1 = await first
        shed.app = inner
        assert second.headers["retry-after"] == "5" and second.json()["detail"][0]["type"] == "unavailable"
        return [r1.status_code, second.status_code, probe.status_code]

    assert asyncio.run(scenario()) == [200, 503, 200]
