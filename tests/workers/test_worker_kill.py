"""Kill a Celery worker (SIGKILL, whole process group) in the middle of a sanitize job
and start another: the job still succeeds, and its outputs equal an uninterrupted run's."""

from __future__ import annotations

import io
import signal
import time

import pyarrow.parquet as pq
import pytest

from otcclip.service.core.config import Settings
from tests.service.conftest import SANITIZE, Api


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_killed_worker_job_still_succeeds(pg_database, clean_redis, tiny_dataset, tmp_path):
    from otcclip.cli.embedded import run_service, start_worker, stop_process

    settings = Settings(data_dir=tmp_path / "data", database_url=pg_database, broker_url=clean_redis,
                        progress_interval_s=0.2, stop_poll_interval_s=0.2, visibility_timeout_s=8, lease_s=10, sweep_interval_s=2,
                        broker_transport_extra={"unacked_restore_interval": 2})
    settings_kw = {**SANITIZE, "shard_size": 4}  # 10 encode + 10 match shards
    with run_service(settings, worker=False) as svc:
        api = Api(svc.url, svc.create_key("kill"))
        ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
        first = start_worker(settings, name="victim@%h", log_path=tmp_path / "victim.log")
        second = None
        try:
            job_id = api.job("sanitize", ds, settings_kw).json()["id"]
            deadline = time.monotonic() + 120
            while True:  # wait until the job is part-way through its shards
                j = api.http.get(f"/v1/jobs/{job_id}").json()
                if j["stage"] in ("encode", "match") and 0 < j["progress"]["done"] < 40:
                    break
                assert j["state"] not in ("succeeded", "failed"), f"finished before the kill: {j}"
                assert time.monotonic() < deadline, j
                time.sleep(0.05)
            stop_process(first, sig=signal.SIGKILL, timeout=10)
            assert first.returncode is not None
            killed_at = api.http.get(f"/v1/jobs/{job_id}").json()
            assert killed_at["state"] == "running"
            second = start_worker(settings, name="rescuer@%h", log_path=tmp_path / "rescuer.log")
            j = api.wait(job_id, timeout=240)
            assert j["state"] == "succeeded", (j, (tmp_path / "rescuer.log").read_text()[-3000:])

            ref = api.wait(api.job("sanitize", ds, settings_kw).json()["id"], timeout=240)
            assert ref["state"] == "succeeded", ref
            assert j["result"]["counts"] == ref["result"]["counts"]
            got = pq.read_table(io.BytesIO(api.http.get(f"/v1/artifacts/{api.artifact(j['id'], 'decisions.parquet')['id']}").content))
            exp = pq.read_table(io.BytesIO(api.http.get(f"/v1/artifacts/{api.artifact(ref['id'], 'decisions.parquet')['id']}").content))
            cols = [c for c in exp.column_names if c in ("id", "action", "reason", "caption", "new_caption")]
            assert len(cols) >= 3 and got.select(cols).equals(exp.select(cols))
            a = api.http.get(f"/v1/artifacts/{api.artifact(j['id'], 'cleaned.csv')['id']}").content
            b = api.http.get(f"/v1/artifacts/{api.artifact(ref['id'], 'cleaned.csv')['id']}").content
            assert a == b
        finally:
            stop_process(first, sig=signal.SIGKILL)
            if second is not None:
                stop_process(second)
