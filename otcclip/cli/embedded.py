"""Run the service in-process: the API (uvicorn in a thread) plus a real Celery worker
in a child process. ``otcclip serve``, ``otcclip demo`` and the tests use this.

Example
-------
>>> with run_embedded_service("/tmp/otc", port=0) as svc:   # doctest: +SKIP
...     key = svc.create_key("demo")
...     httpx.get(f"{svc.url}/healthz")
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from otcclip.service.core.config import Settings

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def worker_command(queues: Sequence[str] = ("gpu", "cpu", "train"), *, concurrency: int = 1, name: str | None = None) -> list[str]:
    """The command line that starts ``otcclip worker`` with this interpreter."""
    argv = ["worker", "--queues", ",".join(queues), "--concurrency", str(concurrency)]
    if name:
        argv += ["--name", name]
    return [sys.executable, "-c", "import sys; from otcclip.cli import main; sys.exit(main(sys.argv[1:]))", *argv]


def start_worker(settings: Settings, *, queues: Sequence[str] = ("gpu", "cpu", "train"), concurrency: int = 1,
                 name: str | None = None, extra_env: dict[str, str] | None = None, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a Celery worker child process for ``settings`` in its own process group."""
    env = {**os.environ, **settings.env(), **(extra_env or {})}
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(worker_command(queues, concurrency=concurrency, name=name), env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop a child started by :func:`start_worker` (its whole process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class EmbeddedService:
    """A running service.

    Attributes
    ----------
    url : str
        Base URL, e.g. ``http://127.0.0.1:8123``.
    settings : Settings
    worker : Popen or None
        The Celery worker child (None when started without one).
    """

    url: str
    settings: Settings
    worker: subprocess.Popen[bytes] | None = None
    _server: object = field(default=None, repr=False)

    def create_key(self, name: str) -> str:
        """Create an API key and return its plaintext."""
        return create_key(self.settings, name)


def create_key(settings: Settings, name: str) -> str:
    from otcclip.service.db import crud
    from otcclip.service.db.session import session_scope

    with session_scope(settings.db_url) as db:
        _, key = crud.create_api_key(db, name)
    return key


def recover_jobs(settings: Settings, celery: object) -> int:
    """Re-send the entry task of jobs left ``running`` by a previous embedded worker.

    The filesystem transport drops a message when it is fetched, so a worker that died
    mid-task leaves nothing to redeliver; the tasks skip finished shards and training
    resumes from its last checkpoint.
    """
    from sqlalchemy import select

    from otcclip.service.db.models import Job
    from otcclip.service.db.session import session_scope
    from otcclip.service.queue import ENTRY, enqueue

    with session_scope(settings.db_url) as db:
        ids = [(j.id, j.kind) for j in db.scalars(select(Job).where(Job.state == "running"))]
    for job_id, kind in ids:
        log.info("re-sending interrupted %s job %s", kind, job_id)
        enqueue(celery, ENTRY[kind], job_id)  # type: ignore[arg-type]
    return len(ids)


@contextmanager
def run_service(settings: Settings, *, host: str = "127.0.0.1", port: int = 0, worker: bool = True,
                queues: Sequence[str] = ("gpu", "cpu", "train"), concurrency: int = 1,
                worker_log: Path | None = None, migrate: bool = True) -> Iterator[EmbeddedService]:
    """Migrate, start the API in a thread, the lease sweeper in another and (optionally) a
    worker child; stop them on exit."""
    import uvicorn

    from otcclip.migrations import upgrade
    from otcclip.service.api.main import create_app

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate:
        upgrade(settings.db_url)
    port = port or free_port(host)
    app = create_app(settings)
    if settings.embedded_broker:
        recover_jobs(settings, app.state.celery)
    # keep-alive longer than a client's idle gaps under load (uvicorn's 5 s closes connections a busy
    # client is about to reuse: "server disconnected without a response")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                           timeout_keep_alive=75))
    thread = threading.Thread(target=server.run, name="otcclip-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the API did not start on {host}:{port}")
        time.sleep(0.05)
    proc = start_worker(settings, queues=queues, concurrency=concurrency, log_path=worker_log) if worker else None
    from otcclip.workers.sweeper import start_sweeper

    sweeper = start_sweeper(settings, app.state.celery)
    svc = EmbeddedService(url=f"http://{host}:{port}", settings=settings, worker=proc, _server=server)
    try:
        yield svc
    finally:
        sweeper.stop()
        if svc.worker is not None:
            stop_process(svc.worker)
        server.should_exit = True
        thread.join(15)


@contextmanager
def run_embedded_service(data_dir: str | Path, port: int = 0, *, host: str = "127.0.0.1", worker: bool = True,
                         concurrency: int = 1, worker_log: Path | None = None) -> Iterator[EmbeddedService]:
    """The embedded default (SQLite, local storage, filesystem broker) under ``data_dir``."""
    settings = Settings(data_dir=Path(data_dir).resolve(), database_url=None, broker_url=None, storage_dir=None)
    with run_service(settings, host=host, port=port, worker=worker, concurrency=concurrency, worker_log=worker_log) as svc:
        yield svc
