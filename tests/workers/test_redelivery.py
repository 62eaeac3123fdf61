"""Duplicate messages for a running train job - what a broker redelivery (the issue's
short visibility timeout) or a sweeper re-send produces - reach the worker's second
process while the first trains. The lease turns each into a no-op: the job trains once
(one attempt, never two executions at once) and succeeds."""

from __future__ import annotations

import time

import pytest

from bench.faults import max_concurrent_executions
from otcclip.service.core.config import Settings
from tests.service.conftest import TRAIN, Api


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_duplicate_of_a_running_task_is_refused(pg_database, clean_redis, tiny_dataset, tmp_path):
    from otcclip.cli.embedded import run_service, start_worker, stop_process
    from otcclip.service.queue import ENTRY, enqueue

    settings = Settings(data_dir=tmp_path / "data", database_url=pg_database, broker_url=clean_redis,
                        progress_interval_s=0.2, stop_poll_interval_s=0.2, lease_s=6)
    log = tmp_path / "worker.log"
    with run_service(settings, worker=False) as svc:
        api = Api(svc.url, svc.create_key("redelivery"))
        ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
        worker = start_worker(settings, queues=("train",), concurrency=2, log_path=log)
        try:
            job_id = api.job("train", ds, {**TRAIN, "epochs": 3}).json()["id"]
            deadline = time.monotonic() + 120
            while api.http.get(f"/v1/jobs/{job_id}").json()["stage"] != "train":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            from otcclip.service.queue import make_celery

            celery = make_celery(settings)
            for _ in range(3):  # while it trains
                enqueue(celery, ENTRY["train"], job_id, key=f"{job_id}:duplicate")
                time.sleep(0.5)
            j = api.wait(job_id, timeout=240)
            enqueue(celery, ENTRY["train"], job_id, key=f"{job_id}:late")  # after it succeeded
            time.sleep(3)
            after = api.http.get(f"/v1/jobs/{job_id}").json()
        finally:
            stop_process(worker)
    text = log.read_text()
    assert j["state"] == "succeeded", (j, text[-3000:])
    assert j["attempts"] == 1 and j["result"]["resumed"] is False
    assert text.count("another live execution holds the lease") >= 1, text[-3000:]
    assert f"job {job_id} job: finished, nothing to do" in text  # the late duplicate is a no-op
    assert max_concurrent_executions([log], job_id, killed={}) == 1
    assert after["attempts"] == 1 and after["finished_at"] == j["finished_at"]
