"""Celery tasks. Every task takes ids only, reads its job from the database, writes its
outputs atomically and records them, so a redelivered task skips finished work.

Sanitize: ``ingest`` (cpu) plans shards -> ``encode`` per shard (gpu) -> ``match`` per
shard (gpu) -> ``finalize`` (cpu: decide, write outputs, register artifacts). Stage
transitions are single atomic updates of the job row, so exactly one finishing shard
fans out the next stage. ``train`` (train queue) resumes from its last checkpoint when
redelivered; ``evaluate`` (gpu) measures a checkpoint on a labelled dataset.

Recovery: each execution holds a lease (:meth:`JobContext.hold`), so a duplicate message
(a broker redelivery, a sweeper re-send) for work another live execution is doing, or
for a finished job, is a no-op. Database writes are retried through an outage and the
next stage's publish through a broker outage (``outage_retry_s``); past that budget the
job is left as it is, and the sweeper (:mod:`otcclip.workers.sweeper`) re-sends it when
its lease expires. Only genuine errors fail a job, with a one-line message for the
client and the traceback in the log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
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
from otcclip.workers.jobctl import (
    GiveUp,
    JobContext,
    client_error,
    is_transient,
    load_bundle,
    open_manifest,
)

log = logging.getLogger(__name__)


@worker_process_init.connect
def _child_init(**_: Any) -> None:
    """A forked pool child must not share the parent's database connections."""
    dispose_engines()


def _guard(ctx: JobContext, fn: Callable[[], None], *, shard: tuple[str, int] | None = None, lease: bool = True) -> None:
    """Run a task body under the job's lease (or ``shard``'s; no lease when ``lease`` is
    False); turn failures into job states (never into Celery retries).

    A body whose lease another live execution holds is not run. An outage that outlasted
    the retries leaves the job untouched for the sweeper; a lease lost to another
    execution leaves the job to that execution.
    """
    from otcclip.models.progress import Cancelled

    try:
        if not lease:
            fn()
        else:
            with ctx.hold(shard) as held:
                if held:
                    fn()
    except Cancelled:
        if ctx.lease_lost.is_set():
            log.warning("job %s: stopped, another execution took the lease over", ctx.job_id)
            return
        log.info("job %s cancelled", ctx.job_id)
        _record(ctx, "cancelled")
    except GiveUp as e:
        log.error("job %s: %s", ctx.job_id, e)
        _record(ctx, "failed", error=str(e))
    except Exception as e:
        if is_transient(e):
            log.exception("job %s: the database or broker stayed unreachable; leaving the job to the lease sweeper", ctx.job_id)
        elif isinstance(e, ValueError | LookupError | OSError):
            log.warning("job %s failed", ctx.job_id, exc_info=True)
            _record(ctx, "failed", error=client_error(e))
        else:
            log.exception("job %s crashed", ctx.job_id)
            _record(ctx, "failed", error=client_error(e))


def _record(ctx: JobContext, state: str, *, error: str | None = None) -> None:
    """Write a terminal state from the error handler; an outage here leaves the job to the sweeper."""
    try:
        ctx.finish(state, error=error)
    except Exception:
        log.exception("job %s: could not record %s; the lease sweeper will re-send the job", ctx.job_id, state)


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
    resume: list[str] = []

    def body() -> None:
        job = ctx.job()
        if job.stage not in (None, "queued", "ingest"):  # resumed (e.g. re-sent by the sweeper)
            resume.append(job.stage or "")
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

        def plan(db: Any) -> None:
            crud.create_shards(db, job_id, "encode", ranges)
            crud.create_shards(db, job_id, "match", ranges)
            crud.create_shards(db, job_id, "finalize", [(0, n)])
            crud.set_progress(db, job_id, "ingest", 0, n)

        ctx.run(plan, what="plan shards")
        if ctx.run(lambda db: crud.advance_stage(db, job_id, "ingest", "encode"), what="advance stage"):
            _dispatch(ctx, "encode")

    _guard(ctx, body)
    if resume:  # without the job's lease: the finalize task it may send takes that lease
        _guard(ctx, lambda: _dispatch(ctx, resume[0]) if ctx.start() else None, lease=False)


def _dispatch(ctx: JobContext, stage: str) -> None:
    """Send the unfinished tasks of ``stage`` (encode|match), or the finalize task."""
    if stage == "finalize":  # always: a done finalize shard on a running job means finish did not land
        _publish(ctx, "otcclip.sanitize.finalize", key="finalize")
        return
    if stage not in ("encode", "match"):
        return
    pending = ctx.run(lambda db: [s.index for s in crud.shards(db, ctx.job_id, stage) if s.state != "done"])
    if not pending:
        _after_shard(ctx, stage)
        return
    for i in pending:
        if not _publish(ctx, f"otcclip.sanitize.{stage}", i, key=f"{stage}:{i}"):
            return


def _publish(ctx: JobContext, task: str, *args: Any, key: str) -> bool:
    """Publish one unit of the job (``key``: stage and shard), retrying a broker outage for
    ``outage_retry_s``; False when it stayed unreachable (the sweeper re-sends the job
    once its lease expires, and the units already published are no-ops the second time)."""
    try:
        enqueue(_celery(), task, ctx.job_id, *args, key=f"{ctx.job_id}:{key}", retry_s=ctx.settings.outage_retry_s)
    except Exception as e:
        if not is_transient(e):
            raise
        log.error("job %s: could not publish %s (%s: %s); the lease sweeper will re-send the job",
                  ctx.job_id, key, type(e).__name__, e)
        return False
    return True


NEXT = {"encode": "match", "match": "finalize"}


def _after_shard(ctx: JobContext, kind: str) -> None:
    """Update progress; the task that sees the last shard done advances the stage."""

    def step(db: Any) -> bool:
        if not crud.stage_progress(db, ctx.job_id, kind):
            return False
        return crud.advance_stage(db, ctx.job_id, kind, NEXT[kind])

    if ctx.run(step, what="advance stage"):
        _dispatch(ctx, NEXT[kind])


def _run_shard(ctx: JobContext, kind: str, index: int, work: Callable[[Any, SanitizeJobSettings, Path], None]) -> None:
    """One shard under its lease (taken by :func:`_guard`): skipped when already done."""
    job = ctx.job()
    shard = ctx.run(lambda db: crud.get_shard(db, ctx.job_id, kind, index))
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
        rel = ctx.storage.rel(path)
        if not ctx.run(lambda db: crud.complete_shard(db, ctx.job_id, kind, index, ctx.owner, rel), what="shard done"):
            log.warning("job %s: %s shard %d was taken over by another execution", ctx.job_id, kind, index)
            return
    else:
        log.info("job %s: %s shard %d already done, skipping", ctx.job_id, kind, index)
    _after_shard(ctx, kind)


@shared_task(name="otcclip.sanitize.encode")
def sanitize_encode(job_id: str, index: int) -> None:
    """Encode the images and captions of one shard into a feature shard file."""
    ctx = JobContext(job_id)

    def work(job: Any, config: SanitizeJobSettings, path: Path) -> None:
        from otcclip.models.sanitize import encode_shard

        shard = ctx.run(lambda db: crud.get_shard(db, job_id, "encode", index))
        assert shard is not None
        start, stop = shard.start, shard.stop
        bundle, _ = load_bundle(ctx, owner_id=job.owner_id, checkpoint=config.checkpoint, model=config.model,
                                pretrained=config.pretrained,
                                seed=config.seed, device=config.device)
        m = open_manifest(ctx, ctx.dataset(job))
        try:
            fs = encode_shard(m, bundle, start, stop, config=config, should_stop=ctx.should_stop,
                              progress=ctx.shard_progress("encode", index, stop - start))
        finally:
            m.images.close()
        fs.save(path)

    _guard(ctx, lambda: _run_shard(ctx, "encode", index, work), shard=("encode", index))


@shared_task(name="otcclip.sanitize.match")
def sanitize_match(job_id: str, index: int) -> None:
    """Shortlist and OT-score the captions of one image shard against all captions."""
    ctx = JobContext(job_id)

    def work(job: Any, config: SanitizeJobSettings, path: Path) -> None:
        from otcclip.models.sanitize import match_shard

        enc = ctx.run(lambda db: crud.shards(db, job_id, "encode"))
        paths = [ctx.storage.path(s.path) for s in enc if s.path]
        if len(paths) != len(enc):
            raise LookupError(f"job {job_id}: feature shards are missing")
        shard = ctx.run(lambda db: crud.get_shard(db, job_id, "match", index))
        assert shard is not None
        # progress per OT batch (the core reports shortlisted candidates; the job counts pairs)
        score = match_shard(paths[index], paths, config=config, should_stop=ctx.should_stop,
                            progress=ctx.shard_progress("match", index, shard.stop - shard.start))
        score.save(path)

    _guard(ctx, lambda: _run_shard(ctx, "match", index, work), shard=("match", index))


@shared_task(name="otcclip.sanitize.finalize")
def sanitize_finalize(job_id: str) -> None:
    """Decide over all score shards, write the outputs and register them as artifacts."""
    ctx = JobContext(job_id)

    def body() -> None:
        from otcclip.models.report import write_outputs
        from otcclip.models.sanitize import decide, needs_template_search, search_trigger_templates
        from otcclip.models.shards import ScoreShard

        job = ctx.job()
        if not ctx.start():
            return
        ctx.count_shard_attempt("finalize", 0)
        config = _sanitize_config(job)
        shards = ctx.run(lambda db: [(s.path, s.stop) for s in crud.shards(db, job_id, "match")])
        ctx.progress("finalize", 0, shards[-1][1] if shards else 0, force=True)
        # paths, not loaded shards: decide loads them one at a time and spills the
        # embedding-wide arrays to memory-mapped files (its memory is one shard's), in the
        # job's own directory: the disk that holds its shards, not a TMPDIR that may be RAM
        score_paths = [ctx.storage.path(p) for p, _ in shards if p]
        timings = _stage_seconds(ctx, [ScoreShard.timings_of(p) for p in score_paths])
        t0 = time.perf_counter()
        decisions = decide(score_paths, config=config, spill_dir=ctx.job_dir())
        timings["decide"] = time.perf_counter() - t0
        ds = ctx.dataset(job)
        m = open_manifest(ctx, ds)
        try:
            if needs_template_search(decisions, config=config):
                t0 = time.perf_counter()
                bundle, _ = load_bundle(ctx, owner_id=job.owner_id, checkpoint=config.checkpoint, model=config.model,
                                        pretrained=config.pretrained, seed=config.seed, device=config.device)
                decisions = search_trigger_templates(m, bundle, decisions, config=config)
                timings["templates"] = time.perf_counter() - t0
            model_info = {"name": _model_name(ctx, job.owner_id, config), "checkpoint": config.checkpoint,
                          "pretrained": config.pretrained, "random_init": config.random_init}
            files = write_outputs(m, decisions, ctx.job_dir() / "outputs", config=config, model_info=model_info,
                                  timings=timings, input_name=ds.name)
        finally:
            m.images.close()
        ids = {}
        ids["manifest"] = ctx.register(job, files.manifest, kind="cleaned_manifest", name=files.manifest.name,
                                       media_type=_media(files.manifest))
        ids["decisions"] = ctx.register(job, files.decisions, kind="decisions", name="decisions.parquet",
                                        media_type="application/vnd.apache.parquet")
        ids["report_json"] = ctx.register(job, files.report_json, kind="report", name="report.json", media_type="application/json")
        ids["report_html"] = ctx.register(job, files.report_html, kind="report", name="report.html", media_type="text/html")
        if ctx.lease_lost.is_set():
            return
        rel = ctx.storage.rel(files.report_json)

        def mark_done(db: Any) -> None:
            s = crud.get_shard(db, job_id, "finalize", 0)
            assert s is not None
            s.state, s.path = "done", rel

        ctx.run(mark_done, what="shard done")
        n = len(decisions.action)
        ctx.progress("finalize", n, n, force=True)
        ctx.finish("succeeded", result={"model_quality": decisions.model_quality, "n_pairs": n,
                                        "counts": decisions.counts(), "artifacts": ids})

    _guard(ctx, body)


def _stage_seconds(ctx: JobContext, score_timings: list[dict[str, float]]) -> dict[str, float]:
    """Seconds per stage summed over the job's shards (``decode``, ``encode`` from the
    feature shards, ``index``, ``ot`` from the score shards' ``score_timings``), as the
    CLI's report has them."""
    from otcclip.models.shards import FeatureShard

    seconds: dict[str, float] = {}
    paths = ctx.run(lambda db: [s.path for s in crud.shards(db, ctx.job_id, "encode") if s.path])
    timed = [FeatureShard.load(ctx.storage.path(p)).timings for p in paths] + list(score_timings)
    for t in timed:
        for k, v in t.items():
            seconds[k] = seconds.get(k, 0.0) + float(v)
    return seconds


def _model_name(ctx: JobContext, owner_id: str, config: SanitizeJobSettings) -> str | None:
    """The model's name: the setting's, or the one a checkpoint artifact recorded."""
    if not config.checkpoint:
        return config.model
    art = ctx.run(lambda db: crud.get_artifact(db, owner_id, config.checkpoint or ""))
    return (art.meta or {}).get("model") if art is not None else None


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
            row = json.loads(json.dumps(metrics, default=str))
            ctx.run(lambda db: crud.upsert_metric(db, job_id, int(metrics.get("epoch", 0)), row), what="metrics")

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
