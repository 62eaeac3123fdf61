"""Kill the training worker (SIGKILL) in the middle of a train job and start another: the
job resumes from its last checkpoint and ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import io
import signal
import tarfile
import time

import pytest

from otcclip.service.core.config import Settings
from tests.service.conftest import TRAIN, Api

EPOCHS = 24
SETTINGS = {**TRAIN, "epochs": EPOCHS, "checkpoint_every": 2}


def _weights(api: Api, job_id: str) -> bytes:
    blob = api.http.get(f"/v1/artifacts/{api.artifact(job_id, 'checkpoint.tar')['id']}").content
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        member = tar.extractfile("checkpoint/open_clip_model.safetensors")
        assert member is not None
        return member.read()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_killed_train_worker_resumes_from_checkpoint(pg_database, clean_redis, tiny_dataset, tmp_path):
    from otcclip.cli.embedded import run_service, start_worker, stop_process

    settings = Settings(data_dir=tmp_path / "data", database_url=pg_database, broker_url=clean_redis,
                        progress_interval_s=0.2, stop_poll_interval_s=0.2, visibility_timeout_s=8, lease_s=10, sweep_interval_s=2,
                        broker_transport_extra={"unacked_restore_interval": 2})
    with run_service(settings, worker=False) as svc:
        api = Api(svc.url, svc.create_key("kill-train"))
        ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
        first = start_worker(settings, queues=("train",), name="victim@%h", log_path=tmp_path / "victim.log")
        second = None
        try:
            job_id = api.job("train", ds, SETTINGS).json()["id"]
            deadline = time.monotonic() + 180
            while True:  # wait until at least one checkpoint is written, but not the last
                epochs = [m["epoch"] for m in api.http.get(f"/v1/jobs/{job_id}/metrics").json()]
                if len(epochs) >= 3:
                    break
                j = api.http.get(f"/v1/jobs/{job_id}").json()
                assert j["state"] not in ("succeeded", "failed"), f"finished before the kill: {j}"
                assert time.monotonic() < deadline, j
                time.sleep(0.05)
            stop_process(first, sig=signal.SIGKILL, timeout=10)
            assert api.http.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
            second = start_worker(settings, queues=("train",), name="rescuer@%h", log_path=tmp_path / "rescuer.log")
            j = api.wait(job_id, timeout=300)
            assert j["state"] == "succeeded", (j, (tmp_path / "rescuer.log").read_text()[-3000:])
            assert j["result"]["resumed"] is True and j["result"]["epochs"] == SETTINGS["epochs"]
            assert j["attempts"] == 2
            metrics = [m["epoch"] for m in api.http.get(f"/v1/jobs/{job_id}/metrics").json()]
            assert sorted(set(metrics)) == list(range(1, EPOCHS + 1))

            ref = api.wait(api.job("train", ds, SETTINGS).json()["id"], timeout=300)
            assert ref["state"] == "succeeded" and ref["result"]["resumed"] is False
            assert _weights(api, job_id) == _weights(api, ref["id"])
        finally:
            stop_process(first, sig=signal.SIGKILL)
            if second is not None:
                stop_process(second)
