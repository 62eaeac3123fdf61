"""Celery tasks. Every task takes ids only, reads its job from the database, writes its
outputs atomically and records them, so a redelivered task skips finished work.

Sanitize: ``ingest`` (cpu) plans shards -> ``encode`` per shard (gpu) -> ``match`` per
shard (gpu) -> ``finalize`` (cpu: decide, write outputs, register artifacts). Stage
transitions are single atomic updates of the job row, so exactly one finishing shard
fans out the next stage. ``train`` (train queue) resumes from its last checkpoint when
redelivered; ``evaluate`` (gpu) measures a checkpoint on a labelled dataset.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import traceback
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import shared_task
from celery.signals import worker_process_init

from otcclip.models.config import (
    EvalSettings,
    EvaluateJobSettings,
    SanitizeJobSettings,
    TrainConfig,
    job_config,
)
from otcclip.service.db import crud
from otcclip.service.db.session import dispose_engines
from otcclip.service.queue import enqueue
from otcclip.workers.jobctl import GiveUp, JobContext, load_bundle, open_manifest

log = logging.getLogger(__name__)


@worker_process_init.connect
def _child_init(**_: Any) -> None:
    """A forked pool child must not share the parent's database connections."""
    dispose_engines()


def _guard(ctx: JobContext, fn: Callable[[], None]) -> None:
    """Run a task body; turn failures into job states (never into Celery retries)."""
    from otcclip.models.progress import Cancelled

    try:
        fn()
    except Cancelled:
        log.info("job %s cancelled", ctx.job_id)
        ctx.finish("cancelled")
    except GiveUp as e:
        log.error("job %s: %s", ctx.job_id, e)
        ctx.finish("failed", error=str(e))
    except (ValueError, LookupError, OSError) as e:
        log.warning("job %s failed: %s", ctx.job_id, e)
        ctx.finish("failed", error=f"{type(e).__name__}: {e}")
    except Exception as e:
        log.exception("job %s crashed", ctx.job_id)
        ctx.finish("failed", error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")


def _celery() -> Any:
    from celery import current_app

    return current_app


def _sanitize_config(job: Any) -> SanitizeJobSettings:
    """The sanitize job's settings object (validated at submit; rebuilt by every task)."""
    return typing.cast(SanitizeJobSettings, job_config("sanitize", job.settings))


def _shard_path(ctx: JobContext, kind: str, index: int) -> Path:
    ext = "pt" if kind == "encode" else "npz"
    d = ctx.job_dir() / "shards"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{kind}_{index:05d}.{ext}"


# -- sanitize -----------------------------------------------------------------------------


@shared_task(name="otcclip.sanitize.ingest")
def sanitize_ingest(job_id: str) -> None:
    """Plan the shards (once) and fan out the current stage (resumes an interrupted job)."""
    ctx = JobContext(job_id)

    def body() -> None:
        job = ctx.job()
        if job.stage not in (None, "queued", "ingest"):
            if ctx.start():
                _dispatch(ctx, job.stage or "")
            return
        if not ctx.start("ingest", count_attempt=True):
            return
        from otcclip.models.sanitize import plan_shards

        config = _sanitize_config(job)
        m = open_manifest(ctx, ctx.dataset(job))
        try:
            n = len(m)
        finally:
            m.images.close()
        ranges = plan_shards(n, config.shard_size)
        with ctx.db() as db:
            crud.create_shards(db, job_id, "encode", ranges)
            crud.create_shards(db, job_id, "match", ranges)
            crud.create_shards(db, job_id, "finalize", [(0, n)])
            crud.set_progress(db, job_id, "ingest", 0, n)
        with ctx.db() as db:
            won = crud.advance_stage(db, job_id, "ingest", "encode")
        if won:
            _dispatch(ctx, "encode")

    _guard(ctx, body)


def _dispatch(ctx: JobContext, stage: str) -> None:
    """Send the unfinished tasks of ``stage`` (encode|match|finalize)."""
    if stage not in ("encode", "match", "finalize"):
        return
    with ctx.db() as db:
        pending = [s.index for s in crud.shards(db, ctx.job_id, stage) if s.state != "done"]
    if not pending and stage != "finalize":
        _after_shard(ctx, stage)
        return
    task = f"otcclip.sanitize.{stage}"
    for i in pending:
        if stage == "finalize":
            enqueue(_celery(), task, ctx.job_id)
        else:
            enqueue(_celery(), task, ctx.job_id, i)


NEXT = {"encode": "match", "match": "finalize"}


def _after_shard(ctx: JobContext, kind: str) -> None:
    """Update progress; the task that sees the last shard done advances the stage."""
    with ctx.db() as db:
        rows = crud.shards(db, ctx.job_id, kind)
        done = [s for s in rows if s.state == "done"]
        total = rows[-1].stop if rows else 0
        crud.set_progress(db, ctx.job_id, kind, sum(s.stop - s.start for s in done), total)
        if len(done) < len(rows):
            return
        won = crud.advance_stage(db, ctx.job_id, kind, NEXT[kind])
    if won:
        _dispatch(ctx, NEXT[kind])


def _run_shard(ctx: JobContext, kind: str, index: int, work: Callable[[Any, SanitizeJobSettings, Path], None]) -> None:
    job = ctx.job()
    with ctx.db() as db:
        shard = crud.get_shard(db, ctx.job_id, kind, index)
        if shard is None:
            raise LookupError(f"job {ctx.job_id} has no {kind} shard {index}")
        done = shard.state == "done" and shard.path and ctx.storage.path(shard.path).is_file()
    if not ctx.start():
        return
    if not done:
        ctx.count_shard_attempt(kind, index)
        config = _sanitize_config(job)
        path = _shard_path(ctx, kind, index)
        work(job, config, path)
        with ctx.db() as db:
            s = crud.get_shard(db, ctx.job_id, kind, index)
            assert s is not None
            s.state, s.path = "done", ctx.storage.rel(path)
    else:
        log.info("job %s: %s shard %d already done, skipping", ctx.job_id, kind, index)
    _after_shard(ctx, kind)


@shared_task(name="otcclip.sanitize.encode")
def sanitize_encode(job_id: str, index: int) -> None:
    """Encode the images and captions of one shard into a feature shard file."""
    ctx = JobContext(job_id)

    def work(job: Any, config: SanitizeJobSettings, path: Path) -> None:
        from otcclip.models.sanitize import encode_shard

        with ctx.db() as db:
            shard = crud.get_shard(db, job_id, "encode", index)
            assert shard is not None
            start, stop = shard.start, shard.stop
        bundle, _ = load_bundle(ctx, owner_id=job.owner_id, checkpoint=config.checkpoint, model=config.model,
                                seed=config.seed, device=config.device)
        m = open_manifest(ctx, ctx.dataset(job))
        try:
            fs = encode_shard(m, bundle, start, stop, config=config, should_stop=ctx.should_stop)
        finally:
            m.images.close()
        fs.save(path)

    _guard(ctx, lambda: _run_shard(ctx, "encode", index, work))


@shared_task(name="otcclip.sanitize.match")
def sanitize_match(job_id: str, index: int) -> None:
    """Shortlist and OT-score the captions of one image shard against all captions."""
    ctx = JobContext(job_id)

    def work(job: Any, config: SanitizeJobSettings, path: Path) -> None:
        from otcclip.models.sanitize import match_shard

        with ctx.db() as db:
            enc = crud.shards(db, job_id, "encode")
            paths = [ctx.storage.path(s.path) for s in enc if s.path]
        if len(paths) != len(enc):
            raise LookupError(f"job {job_id}: feature shards are missing")
        score = match_shard(paths[index], paths, config=config, should_stop=ctx.should_stop)
        score.save(path)

    _guard(ctx, lambda: _run_shard(ctx, "match", index, work))


@shared_task(name="otcclip.sanitize.finalize")
def sanitize_finalize(job_id: str) -> None:
    """Decide over all score shards, write the outputs and register them as artifacts."""
    ctx = JobContext(job_id)

    def body() -> None:
        from otcclip.models.report import write_outputs
        from otcclip.models.sanitize import decide, needs_template_search, search_trigger_templates

        job = ctx.job()
        if not ctx.start():
            return
        ctx.count_shard_attempt("finalize", 0)
        config = _sanitize_config(job)
        with ctx.db() as db:
            paths = [ctx.storage.path(s.path) for s in crud.shards(db, job_id, "match") if s.path]
        ctx.progress("finalize", 0, 1, force=True)
        decisions = decide(paths, config=config)
        m = open_manifest(ctx, ctx.dataset(job))
        try:
            if needs_template_search(decisions, config=config):
                bundle, _ = load_bundle(ctx, owner_id=job.owner_id, checkpoint=config.checkpoint, model=config.model,
                                        seed=config.seed, device=config.device)
                decisions = search_trigger_templates(m, bundle, decisions, config=config)
            model_info = {"name": None if config.checkpoint else config.model, "checkpoint": config.checkpoint}
            files = write_outputs(m, decisions, ctx.job_dir() / "outputs", config=config, model_info=model_info)
        finally:
            m.images.close()
        ids = {}
        ids["manifest"] = ctx.register(job, files.manifest, kind="cleaned_manifest", name=files.manifest.name,
                                       media_type=_media(files.manifest))
        ids["decisions"] = ctx.register(job, files.decisions, kind="decisions", name="decisions.parquet",
                                        media_type="application/vnd.apache.parquet")
        ids["report_json"] = ctx.register(job, files.report_json, kind="report", name="report.json", media_type="application/json")
        ids["report_html"] = ctx.register(job, files.report_html, kind="report", name="report.html", media_type="text/html")
        with ctx.db() as db:
            s = crud.get_shard(db, job_id, "finalize", 0)
            assert s is not None
            s.state, s.path = "done", ctx.storage.rel(files.report_json)
        n = len(decisions.action)
        ctx.progress("finalize", n, n, force=True)
        ctx.finish("succeeded", result={"model_quality": decisions.model_quality, "n_pairs": n,
                                        "counts": decisions.counts(), "artifacts": ids})

    _guard(ctx, body)


def _media(path: Path) -> str:
    return {".csv": "text/csv", ".tsv": "text/tab-separated-values", ".jsonl": "application/jsonl",
            ".parquet": "application/vnd.apache.parquet", ".tar": "application/x-tar"}.get(path.suffix, "application/octet-stream")


# -- train ---------------------------------------------------------------------------------


@shared_task(name="otcclip.train")
def train_job(job_id: str) -> None:
    """Train on the job's dataset; a redelivered task resumes from the last checkpoint."""
    ctx = JobContext(job_id)

    def body() -> None:
        from otcclip.models.training import last_checkpoint, train
        from otcclip.service.storage import tar_directory

        job = ctx.job()
        if not ctx.start("train", count_attempt=True):
            return
        config = typing.cast(TrainConfig, job_config("train", job.settings))
        run_dir = ctx.job_dir() / "run"
        resume = last_checkpoint(run_dir) is not None
        if resume:
            log.info("job %s: resuming training from %s", job_id, last_checkpoint(run_dir))
        m = open_manifest(ctx, ctx.dataset(job), columns=("image", "caption"))

        def on_epoch(metrics: dict[str, Any]) -> None:
            with ctx.db() as db:
                crud.upsert_metric(db, job_id, int(metrics.get("epoch", 0)), json.loads(json.dumps(metrics, default=str)))

        try:
            result = train(m, run_dir, config=config, resume=resume, progress=ctx.progress, should_stop=ctx.should_stop,
                           on_epoch=on_epoch)
        finally:
            m.images.close()
        final = Path(result.final_checkpoint)
        tar = tar_directory(final, ctx.job_dir() / "checkpoint.tar", arcname="checkpoint")
        ckpt = ctx.register(job, tar, kind="checkpoint", name="checkpoint.tar", media_type="application/x-tar",
                            meta={"dir": ctx.storage.rel(final), "model": config.model, "defence": config.defence})
        metrics = ctx.register(job, Path(result.metrics_path), kind="metrics", name="metrics.jsonl", media_type="application/jsonl")
        ctx.finish("succeeded", result={"epochs": result.epochs_done, "resumed": resume,
                                        "artifacts": {"checkpoint": ckpt, "metrics": metrics}})

    _guard(ctx, body)


# -- evaluate ------------------------------------------------------------------------------


@shared_task(name="otcclip.evaluate")
def evaluate_job(job_id: str) -> None:
    """Zero-shot / linear probe / ASR of a checkpoint artifact on the job's labelled dataset."""
    ctx = JobContext(job_id)

    def body() -> None:
        from otcclip.models.evaluation import EvalConfig, evaluate

        job = ctx.job()
        if not ctx.start("evaluate", count_attempt=True):
            return
        s = typing.cast(EvaluateJobSettings, job_config("evaluate", job.settings))
        bundle, _ = load_bundle(ctx, owner_id=job.owner_id, checkpoint=s.checkpoint, model="", seed=s.seed, device=s.device)
        work = ctx.job_dir() / "inputs"
        work.mkdir(parents=True, exist_ok=True)
        triggers: list[Path] = []
        for i, t in enumerate([s.trigger] if isinstance(s.trigger, dict) else (s.trigger or [])):
            p = work / f"trigger-{i}.json"
            p.write_text(json.dumps(t))
            triggers.append(p)
        targets = None
        if s.targets_csv:
            targets = work / "targets.csv"
            targets.write_text(s.targets_csv)
        measured = {f.name: getattr(s, f.name) for f in dataclasses.fields(EvalSettings)}
        config = EvalConfig(**measured, trigger=triggers or None, targets=targets)
        m = open_manifest(ctx, ctx.dataset(job), columns=("image", "label"))
        try:
            res = evaluate(bundle, m, config=config, progress=ctx.progress, should_stop=ctx.should_stop).to_dict()
        finally:
            m.images.close()
        out = ctx.job_dir() / "eval.json"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2, default=str))
        tmp.replace(out)
        art = ctx.register(job, out, kind="evaluation", name="eval.json", media_type="application/json")
        ctx.finish("succeeded", result={**json.loads(json.dumps(res, default=str)), "artifacts": {"eval": art}})

    _guard(ctx, body)
