"""End to end through real HTTP with a real Celery worker: the embedded default
(SQLite + filesystem transport) and PostgreSQL + Redis.

upload -> sanitize -> poll -> download (ETag, Range); idempotent retry; train ->
checkpoint (resumable download) -> sanitize with it; cancel; delete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import tarfile
from collections.abc import Iterator
from typing import Any

import pytest

from otcclip.service.core.config import Settings
from tests.service.conftest import SANITIZE, TRAIN, Api


@pytest.fixture(scope="module")
def pg_redis(pg_database: str, clean_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from otcclip.cli.embedded import run_service

    root = tmp_path_factory.mktemp("pgredis")
    settings = Settings(data_dir=root / "data", database_url=pg_database, broker_url=clean_redis,
                        progress_interval_s=0.5, stop_poll_interval_s=0.2, visibility_timeout_s=3600)
    with run_service(settings, worker_log=root / "worker.log") as svc:
        yield svc


@pytest.fixture(params=["embedded", pytest.param("pg_redis", marks=[pytest.mark.postgres, pytest.mark.redis])])
def service(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


@pytest.mark.slow
def test_upload_sanitize_download(service, tiny_dataset):
    api = Api(service.url, service.create_key("flow"))
    r = api.upload(tiny_dataset["manifest"], tiny_dataset["images"])
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["n_rows"] == 40 and ds["format"] == "csv" and r.headers["location"] == f"/v1/datasets/{ds['id']}"
    assert ds["sha256"] == hashlib.sha256(tiny_dataset["manifest"].read_bytes()).hexdigest()
    rows = api.http.get(f"/v1/datasets/{ds['id']}/rows", params={"offset": 38, "limit": 5}).json()
    assert rows["total"] == 40 and len(rows["rows"]) == 2 and set(rows["columns"]) >= {"image", "caption"}

    r = api.job("sanitize", ds["id"], SANITIZE, **{"Idempotency-Key": "abc"})
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}" and r.headers["retry-after"]
    again = api.job("sanitize", ds["id"], SANITIZE, **{"Idempotency-Key": "abc"})
    assert again.status_code == 202 and again.json()["id"] == r.json()["id"]
    assert api.job("sanitize", ds["id"], {**SANITIZE, "k": 3}, **{"Idempotency-Key": "abc"}).status_code == 409
    job = api.wait(r.json()["id"])
    assert job["state"] == "succeeded", job
    progress = job["progress"]
    assert {k: progress[k] for k in ("stage", "done", "total", "unit", "eta_s")} == {
        "stage": "finalize", "done": 40, "total": 40, "unit": "pair", "eta_s": 0}
    assert job["attempts"] == 1 and job["started_at"]
    counts = job["result"]["counts"]["action"]
    assert sum(counts.values()) == 40
    # a random model on 40 pairs: judged weak, and the job result says so
    assert job["result"]["model_quality"]["verdict"] == "weak" and job["result"]["model_quality"]["message"]
    listed = api.http.get("/v1/jobs", params={"limit": 1}).json()
    assert listed["total"] >= 1 and len(listed["items"]) == 1

    art = api.artifact(job["id"], "cleaned.csv")
    full = api.http.get(f"/v1/artifacts/{art['id']}")
    assert full.status_code == 200 and full.headers["etag"] == f'"{hashlib.sha256(full.content).hexdigest()}"'
    cleaned = list(csv.DictReader(io.StringIO(full.text)))
    assert len(cleaned) == counts["keep"] + counts["reassign"]
    part = api.http.get(f"/v1/artifacts/{art['id']}", headers={"Range": "bytes=10-29"})
    assert part.status_code == 206 and part.content == full.content[10:30]
    assert part.headers["content-range"] == f"bytes 10-29/{len(full.content)}"
    bad = api.http.get(f"/v1/artifacts/{art['id']}", headers={"Range": f"bytes={len(full.content)}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(full.content)}"
    assert api.http.get(f"/v1/artifacts/{art['id']}", headers={"If-None-Match": full.headers["etag"]}).status_code == 304
    names = {a["name"] for a in api.http.get(f"/v1/jobs/{job['id']}/artifacts").json()}
    assert names == {"cleaned.csv", "decisions.parquet", "report.json", "report.html"}

    # the review report, for the owning key only: the upload's name, never the server's
    # storage path; the model's name and the seconds of each stage
    page = api.http.get(f"/v1/jobs/{job['id']}/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text
    assert page.content == api.http.get(f"/v1/artifacts/{api.artifact(job['id'], 'report.html')['id']}").content
    html = page.text
    root = str(service.settings.data_dir.resolve())
    assert root not in html and str(service.settings.storage_root) not in html
    assert "small.csv" in html and 'model <b>otc-micro</b> (random init)' in html
    assert all(f"{stage} " in html.split('id="run"')[1].split("</p>")[0] for stage in ("encode", "ot", "decide"))
    report_json = api.http.get(f"/v1/artifacts/{api.artifact(job['id'], 'report.json')['id']}").json()
    assert report_json["input"]["name"] == "small.csv" and "path" not in report_json["input"]
    assert report_json["model"]["name"] == "otc-micro" and report_json["timings_s"]["ot"] > 0
    other = Api(service.url, service.create_key("other"))
    missing = other.http.get(f"/v1/jobs/{job['id']}/report")
    assert missing.status_code == 404 and job["id"] in missing.json()["message"]

    assert api.http.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert api.http.get(f"/v1/datasets/{ds['id']}").status_code == 404


@pytest.mark.slow
def test_running_job_reports_unit_rate_and_eta(service, tiny_dataset):
    """Ten encode and ten match shards: while they run the job resource shows the stage's
    unit, a finite positive rate and an ETA that goes down."""
    api = Api(service.url, service.create_key("progress"))
    ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
    seen: list[dict[str, Any]] = []
    job_id = api.job("sanitize", ds, {**SANITIZE, "shard_size": 4}).json()["id"]
    early = api.http.get(f"/v1/jobs/{job_id}/report")  # twenty shard tasks later it has one
    assert early.status_code == 409 and "no report yet" in early.json()["message"], early.text
    job = api.wait(job_id, seen=seen, poll_s=0.05)
    assert job["state"] == "succeeded", job
    assert api.http.get(f"/v1/jobs/{job_id}/report").status_code == 200
    assert job["progress"]["eta_s"] == 0 and job["progress"]["unit"] == "pair"
    running = [j["progress"] for j in seen if j["state"] == "running" and j["progress"]["stage"] in ("encode", "match")]
    assert running and all(p["unit"] == "pair" and p["total"] == 40 for p in running)
    measured = [p for p in running if p["rate"] is not None]
    assert measured, running
    assert all(math.isfinite(p["rate"]) and p["rate"] > 0 and p["eta_s"] is not None and p["eta_s"] >= 0
               for p in measured)
    # the ETA of a stage goes down as its shards finish
    assert any(a["stage"] == b["stage"] and b["done"] > a["done"] and b["eta_s"] < a["eta_s"]
               for a, b in zip(measured, measured[1:], strict=False)), measured
    listed = api.http.get("/v1/jobs", params={"limit": 1}).json()["items"][0]
    assert listed["id"] == job["id"] and listed["progress"] == job["progress"]


@pytest.mark.slow
def test_match_stage_moves_per_ot_batch(embedded, tiny_dataset):
    """One match shard whose OT runs in many small batches: the job's progress takes values
    between 0 and the end during the match stage (a trigger records every write of the row)."""
    from sqlalchemy import create_engine, text

    eng = create_engine(embedded.settings.db_url)
    with eng.begin() as c:
        c.execute(text("CREATE TABLE test_progress_log (job_id TEXT, stage TEXT, done INTEGER, total INTEGER)"))
        c.execute(text("CREATE TRIGGER test_progress_log AFTER UPDATE OF progress_done ON jobs BEGIN "
                       "INSERT INTO test_progress_log VALUES (NEW.id, NEW.stage, NEW.progress_done, NEW.progress_total); END"))
    try:
        api = Api(embedded.url, embedded.create_key("ot-batches"))
        ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
        # one shard of 40 pairs; OT batches of 2 * 8 shortlisted candidates
        job = api.wait(api.job("sanitize", ds, {**SANITIZE, "shard_size": 40, "batch_size": 2}).json()["id"])
        with eng.connect() as c:
            rows = c.execute(text("SELECT stage, done, total FROM test_progress_log WHERE job_id = :j"),
                             {"j": job["id"]}).all()
    finally:
        with eng.begin() as c:
            c.execute(text("DROP TRIGGER IF EXISTS test_progress_log"))
            c.execute(text("DROP TABLE IF EXISTS test_progress_log"))
        eng.dispose()
    assert job["state"] == "succeeded", job
    match = [(done, total) for stage, done, total in rows if stage == "match"]
    assert any(0 < done < 40 for done, _ in match), rows
    assert [d for d, _ in match] == sorted(d for d, _ in match) and match[-1] == (40, 40)


@pytest.mark.slow
def test_train_checkpoint_sanitize_and_cancel(service, tiny_dataset):
    api = Api(service.url, service.create_key("train"))
    ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
    job = api.wait(api.job("train", ds, TRAIN).json()["id"], timeout=300)
    assert job["state"] == "succeeded", job
    metrics = api.http.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert [m["epoch"] for m in metrics] == [1] or len(metrics) == TRAIN["epochs"]
    ckpt = api.artifact(job["id"], "checkpoint.tar")
    assert ckpt["kind"] == "checkpoint" and job["result"]["artifacts"]["checkpoint"] == ckpt["id"]

    # a resumable download: the first part, then the rest with If-Range
    size = ckpt["size_bytes"]
    head = api.http.get(f"/v1/artifacts/{ckpt['id']}", headers={"Range": f"bytes=0-{size // 2}"})
    tail = api.http.get(f"/v1/artifacts/{ckpt['id']}",
                        headers={"Range": f"bytes={size // 2 + 1}-", "If-Range": head.headers["etag"]})
    assert head.status_code == tail.status_code == 206
    blob = head.content + tail.content
    assert hashlib.sha256(blob).hexdigest() == ckpt["sha256"]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert {"checkpoint/open_clip_config.json", "checkpoint/open_clip_model.safetensors"} <= set(tar.getnames())

    san = api.wait(api.job("sanitize", ds, {**SANITIZE, "random_init": False, "checkpoint": ckpt["id"]}).json()["id"])
    assert san["state"] == "succeeded", san
    assert san["settings"]["checkpoint"] == ckpt["id"]

    # the trigger file of `otcclip poison` travels as a setting (its noise is inline)
    import numpy as np

    from otcclip.models.attacks import Trigger

    with open(tiny_dataset["manifest"], newline="") as f:
        target = next(csv.DictReader(f))["label"]
    noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    trigger = Trigger("backdoor-patch", target, "patch", noise, patch_frac=0.25).to_dict()
    ev = api.wait(api.job("evaluate", ds, {"checkpoint": ckpt["id"], "device": "cpu", "linear_probe": False,
                                           "trigger": trigger}).json()["id"])
    assert ev["state"] == "succeeded", ev
    # the report of a sanitize job with a checkpoint names the checkpoint's model; a train job has none
    page = api.http.get(f"/v1/jobs/{san['id']}/report")
    assert page.status_code == 200 and f"model <b>{TRAIN['model']}</b> (checkpoint {ckpt['id']})" in page.text
    none = api.http.get(f"/v1/jobs/{job['id']}/report")
    assert none.status_code == 404 and "only sanitize jobs" in none.json()["message"]
    assert 0.0 <= ev["result"]["zero_shot_top1"] <= 1.0 and ev["result"]["n_test"] == 40
    (bd,) = ev["result"]["backdoor"]
    assert bd["target_class"] == target and 0.0 <= bd["asr"] <= 1.0
    assert api.artifact(ev["id"], "eval.json")["kind"] == "evaluation"

    long = api.job("train", ds, {**TRAIN, "epochs": 200}).json()
    api.wait(long["id"], states=("running", "succeeded", "failed", "cancelled"), timeout=120)
    r = api.http.post(f"/v1/jobs/{long['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    done = api.wait(long["id"], timeout=120)
    assert done["state"] == "cancelled", done
    assert api.http.post(f"/v1/jobs/{long['id']}/cancel").json()["state"] == "cancelled"
