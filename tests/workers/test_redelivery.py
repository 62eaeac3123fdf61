"""A visibility timeout shorter than a task: Redis hands the running train task to the
worker's second process again and again. The lease turns every redelivery into a no-op:
the job trains once (one attempt, never two executions at once) and succeeds."""

from __future__ import annotations

import time

import pytest

from bench.faults import max_concurrent_executions
from otcclip.service.core.config import Settings
from tests.service.conftest import TRAIN, Api


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_redelivered_running_task_is_refused(pg_database, clean_redis, tiny_dataset, tmp_path):
    from otcclip.cli.embedded import run_service, start_worker, stop_process

    settings = Settings(data_dir=tmp_path / "data", database_url=pg_database, broker_url=clean_redis,
                        progress_interval_s=0.2, stop_poll_interval_s=0.2, lease_s=6, visibility_timeout_s=2,
                        broker_transport_extra={"unacked_restore_interval": 1})
    log = tmp_path / "worker.log"
    with run_service(settings, worker=False) as svc:
        api = Api(svc.url, svc.create_key("redelivery"))
        ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
        worker = start_worker(settings, queues=("train",), concurrency=2, log_path=log)
        try:
            t0 = time.monotonic()
            j = api.wait(api.job("train", ds, {**TRAIN, "epochs": 3}).json()["id"], timeout=240)
            took = time.monotonic() - t0
        finally:
            stop_process(worker)
    text = log.read_text()
    assert j["state"] == "succeeded", (j, text[-3000:])
    assert took > 4, "the task ended before the visibility timeout could redeliver it"
    assert j["attempts"] == 1 and j["result"]["resumed"] is False
    assert "another live execution holds the lease" in text  # it was redelivered, and refused
    assert max_concurrent_executions([log], j["id"], killed={}) == 1
