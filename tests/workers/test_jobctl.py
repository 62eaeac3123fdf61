"""JobContext's callbacks against a real (SQLite) job table."""

from __future__ import annotations

from pathlib import Path

from otcclip.migrations import upgrade
from otcclip.service.core.config import Settings
from otcclip.service.db import crud
from otcclip.service.db.models import Job
from otcclip.workers.jobctl import JobContext


def test_progress_is_throttled_but_a_stage_end_is_always_written(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", progress_interval_s=3600)
    upgrade(settings.db_url)
    ctx = JobContext("j1", settings)
    with ctx.db() as db:
        key, _ = crud.create_api_key(db, "t")
        db.add(Job(id="j1", owner_id=key.id, kind="train", settings={}))
    assert ctx.start("train")

    def row() -> tuple[str | None, int, int]:
        job = ctx.job()
        return job.stage, job.progress_done, job.progress_total

    ctx.progress("train", 1, 10)
    assert row() == ("train", 1, 10)  # the first write goes through
    for i in range(2, 10):
        ctx.progress("train", i, 10)
    assert row() == ("train", 1, 10)  # throttled
    ctx.progress("train", 10, 10)
    assert row() == ("train", 10, 10)  # the end of the stage is never dropped
    ctx.progress("finalize", 0, 0)
    assert row() == ("finalize", 0, 0)  # a new stage is written at once (its clock starts)
    ctx.progress("finalize", 0, 0)
    ctx.progress("finalize", 1, 0)
    assert row() == ("finalize", 0, 0)  # an unknown total is never an end: throttled
