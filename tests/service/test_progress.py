"""The job resource's progress: a stage's rate and ETA from its clock (a controlled clock
here), and the clock kept by the database writes of the workers."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from otcclip.migrations import upgrade
from otcclip.service.core.config import Settings
from otcclip.service.db import crud
from otcclip.service.db.models import Job
from otcclip.service.db.session import session_scope
from otcclip.service.schemas import job_progress

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_rate_and_eta_from_the_stage_clock() -> None:
    # 30 pairs in 10 s after the stage started with 20 already done: 3 pairs/s, 70 left
    p = job_progress("encode", 50, 120, state="running", started_at=_at(0), start_done=20, measured_at=_at(10))
    assert p.unit == "pair" and p.stage == "encode"
    assert p.rate == pytest.approx(3.0) and p.eta_s == pytest.approx(70 / 3.0)
    later = job_progress("encode", 80, 120, state="running", started_at=_at(0), start_done=20, measured_at=_at(20))
    assert later.eta_s is not None and p.eta_s is not None and later.eta_s < p.eta_s
    # SQLite hands back naive UTC times
    naive = job_progress("train", 5, 10, state="running", started_at=_at(0).replace(tzinfo=None), start_done=0,
                         measured_at=_at(5).replace(tzinfo=None))
    assert naive.unit == "step" and naive.rate == pytest.approx(1.0) and naive.eta_s == pytest.approx(5.0)


def test_unknown_rate_and_eta_are_null_and_a_complete_stage_has_eta_zero() -> None:
    nothing_yet = job_progress("match", 0, 40, state="running", started_at=_at(0), start_done=0, measured_at=_at(3))
    assert nothing_yet.rate is None and nothing_yet.eta_s is None
    no_clock = job_progress("match", 10, 40, state="running", started_at=None, start_done=0, measured_at=_at(3))
    assert no_clock.rate is None and no_clock.eta_s is None
    same_instant = job_progress("match", 10, 40, state="running", started_at=_at(3), start_done=0, measured_at=_at(3))
    assert same_instant.rate is None
    no_total = job_progress("zero_shot", 3, 0, state="running", started_at=_at(0), start_done=0, measured_at=_at(3))
    assert no_total.unit == "it" and no_total.rate == pytest.approx(1.0) and no_total.eta_s is None
    done = job_progress("finalize", 40, 40, state="succeeded", started_at=_at(0), start_done=0, measured_at=_at(4))
    assert done.eta_s == 0 and done.rate == pytest.approx(10.0)
    failed = job_progress("match", 10, 40, state="failed", started_at=_at(0), start_done=0, measured_at=_at(4))
    assert failed.eta_s is None and failed.rate is not None and math.isfinite(failed.rate)
    queued = job_progress("queued", 0, 0, state="queued", started_at=None, start_done=0, measured_at=_at(0))
    assert queued.model_dump() == {"stage": "queued", "done": 0, "total": 0, "unit": "it", "rate": None, "eta_s": None}


def test_the_stage_clock_restarts_on_a_new_stage_or_a_restart_only(tmp_path: Path) -> None:
    url = Settings(data_dir=tmp_path / "data").db_url
    upgrade(url)
    with session_scope(url) as db:
        key, _ = crud.create_api_key(db, "t")
        db.add(Job(id="j1", owner_id=key.id, kind="sanitize", settings={}))
    with session_scope(url) as db:
        assert crud.mark_running(db, "j1", stage="ingest")

    def clock() -> tuple[str | None, datetime | None, int]:
        with session_scope(url) as db:
            job = db.get(Job, "j1")
            assert job is not None
            return job.stage, job.stage_started_at, job.stage_start_done

    stage, t_ingest, d0 = clock()
    assert stage == "ingest" and t_ingest is not None and d0 == 0
    with session_scope(url) as db:
        crud.set_progress(db, "j1", "ingest", 0, 40)
        assert crud.advance_stage(db, "j1", "ingest", "encode")
    stage, t_encode, d0 = clock()
    assert stage == "encode" and t_encode is not None and t_encode >= t_ingest and d0 == 0
    with session_scope(url) as db:
        crud.set_progress(db, "j1", "encode", 16, 40)
        crud.set_progress(db, "j1", "encode", 32, 40)
    assert clock() == ("encode", t_encode, 0)  # same stage, going forward: the clock runs on
    with session_scope(url) as db:
        crud.set_progress(db, "j1", "encode", 8, 40)  # went back (a restart): the clock restarts there
    stage, t_restart, d0 = clock()
    assert t_restart is not None and t_restart >= t_encode and d0 == 8
    with session_scope(url) as db:
        crud.set_progress(db, "j1", "train", 3, 90)  # a new stage reported by the core
    stage, t_train, d0 = clock()
    assert stage == "train" and t_train is not None and t_train >= t_restart and d0 == 3
