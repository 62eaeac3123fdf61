"""Service fixtures: a tiny digits dataset, the embedded service, PostgreSQL + Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench._fixtures import digits_dataset
from bench._fixtures import pg_database as fresh_pg_database
from otcclip.service.core.config import Settings

N_ROWS = 40


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40 digits rows (``small.csv``) and their images in ``images.zip``."""
    root = tmp_path_factory.mktemp("tiny")
    data = digits_dataset(root, N_ROWS, name="small.csv")
    return {"manifest": data.manifest, "images": data.images, "dir": data.dir, "root": root}


class Api:
    """An httpx client for one API key with small helpers."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def upload(self, manifest: Path, images: Path | None = None, *, manifest_name: str | None = None,
               **headers: str) -> httpx.Response:
        files: dict[str, Any] = {"manifest": (manifest_name or manifest.name, manifest.read_bytes())}
        if images is not None:
            files["images"] = (images.name, images.read_bytes())
        return self.http.post("/v1/datasets", files=files,
                              headers={k.replace("_", "-"): v for k, v in headers.items()})

    def job(self, kind: str, dataset_id: str, settings: dict[str, Any], **headers: str) -> httpx.Response:
        return self.http.post("/v1/jobs", json={"kind": kind, "dataset_id": dataset_id, "settings": settings}, headers=headers)

    def wait(self, job_id: str, *, timeout: float = 180, states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
             seen: list[dict[str, Any]] | None = None, poll_s: float = 0.3) -> dict[str, Any]:
        """Poll the job until it reaches one of ``states``; every answer is appended to ``seen``."""
        deadline = time.monotonic() + timeout
        while True:
            j = self.http.get(f"/v1/jobs/{job_id}").json()
            if seen is not None:
                seen.append(j)
            if j["state"] in states:
                return j
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {j['state']} after {timeout}s: {j}")
            time.sleep(poll_s)

    def artifact(self, job_id: str, name: str) -> dict[str, Any]:
        arts = self.http.get(f"/v1/jobs/{job_id}/artifacts").json()
        return next(a for a in arts if a["name"] == name)


SANITIZE = {"model": "otc-micro", "random_init": True, "k": 4, "shard_size": 16, "device": "cpu", "batch_size": 64}
TRAIN = {"model": "otc-micro", "defence": "none", "epochs": 1, "batch_size": 16, "device": "cpu", "lr_warmup_steps": 1}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The embedded default (SQLite + local storage + filesystem broker) with a worker."""
    from otcclip.cli.embedded import run_service

    root = tmp_path_factory.mktemp("embedded")
    settings = Settings(data_dir=root / "data", max_upload_bytes=4 << 20, progress_interval_s=0.5,
                        stop_poll_interval_s=0.2)
    with run_service(settings, worker_log=root / "worker.log") as svc:
        yield svc


@pytest.fixture(scope="session")
def pg_database(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (dropped afterwards)."""
    with fresh_pg_database(postgres_url) as url:
        yield url


@pytest.fixture(scope="session")
def clean_redis(redis_url: str) -> str:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    return redis_url
