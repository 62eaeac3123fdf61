"""Shard-level recovery: the sweeper re-sends the one encode/match shard whose execution
died (its shard lease expired) while the other shards' work is kept, and fails the job,
naming the shard, once that shard has used ``max_attempts`` executions.

Real database (SQLite; PostgreSQL where it is reachable), real queue producer into the
embedded filesystem broker, real tasks: the tasks are run in this process by a small
driver that takes the broker's messages in order, which makes "a worker died holding
shard i" an exact state rather than a race."""

from __future__ import annotations

import ast
import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from sqlalchemy import update

from otcclip.migrations import upgrade
from otcclip.service.core.config import Settings, get_settings
from otcclip.service.db import crud
from otcclip.service.db.models import Job, JobShard, utcnow
from otcclip.service.db.session import session_scope
from otcclip.service.queue import make_celery
from otcclip.workers.sweeper import sweep_once
from tests.service.conftest import SANITIZE, Api


def _messages(settings: Settings) -> list[tuple[Path, str, list[Any]]]:
    """The queued messages, oldest first: (file, task name, args)."""
    folder = settings.broker_dir / "queue"
    out = []
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        headers = json.loads(f.read_text())["headers"]
        out.append((f, headers["task"], list(ast.literal_eval(headers["argsrepr"]))))
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    kw: dict[str, Any] = {}
    if request.param == "postgres":
        kw["database_url"] = request.getfixturevalue("pg_database")
    s = Settings(data_dir=tmp_path / "data", lease_s=3.0, max_attempts=2, **kw)
    upgrade(s.db_url)
    return s


def _sanitize_job(settings: Settings, *, stage: str = "encode", n_shards: int = 4) -> str:
    job_id = uuid.uuid4().hex
    with session_scope(settings.db_url) as db:
        key, _ = crud.create_api_key(db, "t")
        db.add(Job(id=job_id, owner_id=key.id, kind="sanitize", settings={}, state="running", stage=stage,
                   heartbeat_at=utcnow()))
        db.flush()
        ranges = [(4 * i, 4 * i + 4) for i in range(n_shards)]
        crud.create_shards(db, job_id, "encode", ranges)
        crud.create_shards(db, job_id, "match", ranges)
    return job_id


def _shard(settings: Settings, job_id: str, kind: str, index: int, **values: Any) -> None:
    with session_scope(settings.db_url) as db:
        db.execute(update(JobShard).where(JobShard.job_id == job_id, JobShard.kind == kind, JobShard.index == index)
                   .values(**values))


def test_only_the_shard_whose_lease_expired_is_resent_and_an_exhausted_one_fails_the_job(settings: Settings) -> None:
    celery = make_celery(settings)
    job_id = _sanitize_job(settings)
    old = utcnow() - timedelta(seconds=10)
    _shard(settings, job_id, "encode", 0, state="done", path="x", attempts=1, heartbeat_at=old)  # finished
    _shard(settings, job_id, "encode", 1, lease_owner="dead:1:a", heartbeat_at=old, attempts=1)  # its worker died
    _shard(settings, job_id, "encode", 2, lease_owner="live:2:b", heartbeat_at=utcnow(), attempts=1)  # running
    # shard 3 was never started (its message is still queued): not the shard sweeper's
    _shard(settings, job_id, "match", 1, lease_owner="dead:1:a", heartbeat_at=old, attempts=1)  # not this stage
    other = _sanitize_job(settings)  # a healthy job beside it
    _shard(settings, other, "encode", 0, lease_owner="live:3:c", heartbeat_at=utcnow(), attempts=1)

    assert sweep_once(settings, celery) == {"shards_resent": 1, "resent": 0, "failed": 0}
    assert [(name, args) for _, name, args in _messages(settings)] == [("otcclip.sanitize.encode", [job_id, 1])]
    with session_scope(settings.db_url) as db:
        shard = crud.get_shard(db, job_id, "encode", 1)
        assert shard is not None and shard.lease_owner is None and shard.heartbeat_at is None
        live = crud.get_shard(db, job_id, "encode", 2)
        assert live is not None and live.lease_owner == "live:2:b"
    # re-sent once: until its task takes the shard again, nothing more (no re-send every lease)
    assert sweep_once(settings, celery) == {"shards_resent": 0, "resent": 0, "failed": 0}
    assert len(_messages(settings)) == 1

    # the running shard's worker dies too, on its last allowed attempt: the job fails, naming it
    _shard(settings, job_id, "encode", 2, heartbeat_at=old, attempts=settings.max_attempts)
    assert sweep_once(settings, celery) == {"shards_resent": 0, "resent": 0, "failed": 1}
    with session_scope(settings.db_url) as db:
        job = db.get(Job, job_id)
        assert job is not None and job.state == "failed"
        assert job.error == "encode shard 2: gave up after 2 attempts (the worker was lost each time)"
        assert db.get(Job, other).state == "running"  # type: ignore[union-attr]
    assert len(_messages(settings)) == 1


# -- end to end ---------------------------------------------------------------------------


@pytest.fixture()
def env_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings the in-process tasks read (``get_settings()`` from the environment)."""
    from celery._state import get_current_app

    env = {"OTCCLIP_DATA_DIR": str(tmp_path / "data"), "OTCCLIP_LEASE_S": "2", "OTCCLIP_SWEEP_INTERVAL_S": "3600",
           "OTCCLIP_PROGRESS_INTERVAL_S": "0.2", "OTCCLIP_STOP_POLL_INTERVAL_S": "0.2", "OTCCLIP_MAX_ATTEMPTS": "3"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    settings = get_settings()
    previous = get_current_app()
    make_celery(settings).set_current()  # the tasks publish the next stage through current_app
    try:
        yield settings
    finally:
        previous.set_current()
        get_settings.cache_clear()


def _drain(settings: Settings, *, lost: tuple[str, int] | None = None,
           die: Callable[[str, str, int], None] | None = None) -> list[tuple[str, list[Any]]]:
    """Run the queued tasks in this process, oldest message first, until the queue is empty.

    The first message for shard ``lost`` (kind, index) is taken by a worker that dies in it:
    ``die(job, kind, index)`` leaves the database as that execution would have.
    """
    from otcclip.workers import tasks

    by_name = {"otcclip.sanitize.ingest": tasks.sanitize_ingest, "otcclip.sanitize.encode": tasks.sanitize_encode,
               "otcclip.sanitize.match": tasks.sanitize_match, "otcclip.sanitize.finalize": tasks.sanitize_finalize}
    ran = []
    while msgs := _messages(settings):
        f, name, args = msgs[0]
        f.unlink()  # acknowledged when the task starts
        if lost is not None and die is not None and name == f"otcclip.sanitize.{lost[0]}" and args[1] == lost[1]:
            die(args[0], *lost)
            lost = None
            continue
        by_name[name](*args)
        ran.append((name, args))
    return ran


def _killed_in(settings: Settings, job_id: str, kind: str, index: int) -> None:
    """What a worker SIGKILLed inside a shard leaves: the shard's lease taken and one
    attempt counted, no output, no release."""
    with session_scope(settings.db_url) as db:
        assert crud.acquire_shard_lease(db, job_id, kind, index, "lost-host:4242:dead", lease_s=settings.lease_s)
        shard = crud.get_shard(db, job_id, kind, index)
        assert shard is not None
        shard.attempts += 1


def _job_row(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.db_url) as db:
        job = db.get(Job, job_id)
        assert job is not None
        db.expunge(job)
        return job


@pytest.mark.slow
@pytest.mark.parametrize("lost", [("encode", 1), ("match", 2)])
def test_a_lost_shard_is_resent_alone_and_the_outputs_equal_an_uninterrupted_run(env_settings, tiny_dataset, lost,
                                                                                   monkeypatch, tmp_path):
    from otcclip.cli.embedded import run_service

    settings = env_settings
    kind, index = lost
    config = {**SANITIZE, "shard_size": 10}  # 4 encode + 4 match shards
    celery = make_celery(settings)
    with run_service(settings, worker=False) as svc:
        api = Api(svc.url, svc.create_key("shards"))
        ds = api.upload(tiny_dataset["manifest"], tiny_dataset["images"]).json()["id"]
        job_id = api.job("sanitize", ds, config).json()["id"]
        first = _drain(settings, lost=lost, die=lambda j, k, i: _killed_in(settings, j, k, i))
        job = _job_row(settings, job_id)
        assert job.state == "running" and job.stage == kind, job.error  # stuck on the lost shard
        assert (f"otcclip.sanitize.{kind}", [job_id, index]) not in first
        with session_scope(settings.db_url) as db:
            shards = {s.index: (s.state, s.attempts, s.path) for s in crud.shards(db, job_id, kind)}
        assert [i for i, (state, _, _) in shards.items() if state != "done"] == [index]
        kept = {i: settings.storage_root / p for i, (_, _, p) in shards.items() if p}
        mtimes = {i: p.stat().st_mtime_ns for i, p in kept.items()}

        with session_scope(settings.db_url) as db:  # wait out the dead execution's lease
            beat = crud.get_shard(db, job_id, kind, index).heartbeat_at  # type: ignore[union-attr]
        time.sleep(max(0.0, settings.lease_s + 0.2 - (utcnow() - beat.replace(tzinfo=utcnow().tzinfo)).total_seconds()))
        assert sweep_once(settings, celery) == {"shards_resent": 1, "resent": 0, "failed": 0}
        assert [(name, args) for _, name, args in _messages(settings)] == [(f"otcclip.sanitize.{kind}", [job_id, index])]
        second = _drain(settings)
        assert second[0] == (f"otcclip.sanitize.{kind}", [job_id, index])
        assert [a for a in second if a[0] == f"otcclip.sanitize.{kind}"] == [second[0]]  # the others are not redone
        job = _job_row(settings, job_id)
        assert job.state == "succeeded", job.error
        with session_scope(settings.db_url) as db:
            attempts = {s.index: s.attempts for s in crud.shards(db, job_id, kind)}
        assert attempts == {i: 2 if i == index else 1 for i in range(4)}
        assert {i: p.stat().st_mtime_ns for i, p in kept.items()} == mtimes  # finished shards' files kept

        ref_id = api.job("sanitize", ds, config).json()["id"]
        with monkeypatch.context() as mp:  # finalize spills in the job's directory, not in TMPDIR
            import tempfile

            mp.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
            _drain(settings)
        ref = _job_row(settings, ref_id)
        assert ref.state == "succeeded", ref.error
        assert not list(settings.storage_root.rglob("otcclip-decide-*"))  # and removes the spill
        assert job.result["counts"] == ref.result["counts"]  # type: ignore[index]
        for name in ("cleaned.csv", "decisions.parquet"):
            got = api.http.get(f"/v1/artifacts/{api.artifact(job_id, name)['id']}").content
            exp = api.http.get(f"/v1/artifacts/{api.artifact(ref_id, name)['id']}").content
            if name == "cleaned.csv":
                assert got == exp
            else:
                a, b = pq.read_table(io.BytesIO(got)), pq.read_table(io.BytesIO(exp))
                assert a.schema == b.schema
                for col in a.column_names:  # equal values, NaN where NaN (a NaN never equals itself)
                    x, y = a[col].to_pylist(), b[col].to_pylist()
                    assert [v if v == v else "nan" for v in x] == [v if v == v else "nan" for v in y], col
