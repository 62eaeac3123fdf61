"""Leases, their heartbeat and the sweeper against a real (SQLite) job table and the
embedded filesystem broker."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from otcclip.migrations import upgrade
from otcclip.service.core.config import Settings
from otcclip.service.db import crud
from otcclip.service.db.models import Job, utcnow
from otcclip.service.queue import make_celery
from otcclip.workers.jobctl import JobContext, client_error
from otcclip.workers.sweeper import sweep_once


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data", lease_s=3.0, max_attempts=2)
    upgrade(s.db_url)
    return s


def _job(settings: Settings, job_id: str, *, kind: str = "train", state: str = "queued") -> None:
    ctx = JobContext(job_id, settings)
    with ctx.db() as db:
        key, _ = crud.create_api_key(db, "t")
        db.add(Job(id=job_id, owner_id=key.id, kind=kind, settings={}, state=state))


def _age(settings: Settings, job_id: str, seconds: float) -> None:
    with JobContext(job_id, settings).db() as db:
        past = utcnow() - timedelta(seconds=seconds)
        db.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=past, updated_at=past))


def _messages(settings: Settings) -> list[dict]:
    out = []
    for f in sorted((settings.broker_dir / "queue").iterdir()):
        out.append(json.loads(f.read_text()))
    return out


def test_a_live_lease_refuses_a_second_execution_and_an_expired_one_is_taken_over(settings: Settings) -> None:
    _job(settings, "j1")
    first, second = JobContext("j1", settings), JobContext("j1", settings)
    with first.hold() as held:
        assert held
        time.sleep(settings.lease_s * 1.5)  # the heartbeat keeps it alive past one lease
        with second.hold() as held2:
            assert not held2
    with second.hold() as held2:  # released: free at once
        assert held2
    # an execution that died (no heartbeat) loses the lease after lease_s
    with first.db() as db:
        assert crud.acquire_job_lease(db, "j1", "dead", lease_s=settings.lease_s) == "acquired"
        assert crud.acquire_job_lease(db, "j1", "other", lease_s=settings.lease_s) == "held"
    time.sleep(settings.lease_s + 0.1)
    with second.hold() as held2:
        assert held2
        with first.db() as db:
            assert not crud.renew_job_lease(db, "j1", "dead")  # the dead owner cannot come back


def test_a_finished_job_is_a_no_op(settings: Settings) -> None:
    _job(settings, "j1")
    ctx = JobContext("j1", settings)
    ctx.finish("succeeded", result={})
    with ctx.hold() as held:
        assert not held


def test_an_execution_whose_lease_was_taken_over_stops(settings: Settings) -> None:
    _job(settings, "j1")
    ctx = JobContext("j1", settings)
    with ctx.hold() as held:
        assert held and not ctx.should_stop()
        with ctx.db() as db:  # a sweeper found it stale and cleared the owner; another execution took it
            db.execute(update(Job).where(Job.id == "j1").values(lease_owner="thief"))
        deadline = time.monotonic() + 5
        while not ctx.lease_lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ctx.should_stop()
    assert ctx.job().lease_owner == "thief"  # not released by the loser
    ctx.finish("succeeded")
    assert ctx.job().state == "queued"  # the loser does not finish the job


def test_shard_leases_are_independent_and_renew_the_job(settings: Settings) -> None:
    _job(settings, "j1", kind="sanitize", state="running")
    a, b = JobContext("j1", settings), JobContext("j1", settings)
    with a.db() as db:
        crud.create_shards(db, "j1", "encode", [(0, 4), (4, 8)])
    _age(settings, "j1", 100)
    with a.hold(("encode", 0)) as h0, b.hold(("encode", 1)) as h1:
        assert h0 and h1
        with JobContext("j1", settings).hold(("encode", 0)) as dup:
            assert not dup
        time.sleep(settings.lease_s)
        with a.db() as db:
            assert crud.stale_jobs(db, lease_s=settings.lease_s) == []  # shard heartbeats keep the job alive


def test_sweeper_resends_stale_jobs_with_backoff_and_fails_exhausted_ones(settings: Settings) -> None:
    celery = make_celery(settings)
    _job(settings, "fresh")
    _job(settings, "lost")
    _job(settings, "dead", state="running")
    with JobContext("dead", settings).db() as db:
        db.execute(update(Job).where(Job.id == "dead").values(attempts=settings.max_attempts))
    _age(settings, "lost", 10)
    _age(settings, "dead", 10)
    assert sweep_once(settings, celery) == {"shards_resent": 0, "resent": 1, "failed": 1}
    msgs = _messages(settings)
    assert [m["headers"]["argsrepr"] for m in msgs] == ["['lost']"]
    assert msgs[0]["headers"]["task"] == "otcclip.train"
    dead = JobContext("dead", settings).job()
    assert dead.state == "failed" and "gave up after 2 attempts" in (dead.error or "")
    assert JobContext("fresh", settings).job().recoveries == 0
    # the re-send moved the heartbeat: nothing until a lease has passed, and then the
    # next re-send waits two leases (backoff)
    assert sweep_once(settings, celery) == {"shards_resent": 0, "resent": 0, "failed": 0}
    _age(settings, "lost", settings.lease_s * 1.5)
    assert sweep_once(settings, celery) == {"shards_resent": 0, "resent": 0, "failed": 0}
    _age(settings, "lost", settings.lease_s * 2.5)
    assert sweep_once(settings, celery) == {"shards_resent": 0, "resent": 1, "failed": 0}
    assert JobContext("lost", settings).job().recoveries == 2


def test_client_errors_are_one_line_without_server_paths() -> None:
    err = FileNotFoundError(2, "No such file or directory", "/srv/otcclip/storage/jobs/ab12/shards/encode_00003.pt")
    assert client_error(err) == "FileNotFoundError: [Errno 2] No such file or directory: 'encode_00003.pt'"
    multi = ValueError("bad caption in /home/u/data/m.csv\n  row 3: 1/2 of the rows")
    msg = client_error(multi)
    assert "\n" not in msg and "/home" not in msg and "m.csv" in msg and "1/2" in msg
