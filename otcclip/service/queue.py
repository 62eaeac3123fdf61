"""The job queue as the producer sees it: queues, task names, the Celery configuration.

Queues: ``gpu`` (feature extraction, matching, evaluation), ``train`` (training) and
``cpu`` (ingest, finalize). Messages are JSON and carry ids only; job state lives in the
database (no result backend). A message is acknowledged when its task starts: recovery
from a lost worker is the lease sweeper's job (:mod:`otcclip.workers.sweeper`), not the
broker's redelivery, so a long task is never handed out again while it runs, and no
delivered-but-unacknowledged messages are left to restore when the broker connection
drops mid-task (kombu's Redis consumer can crash doing that). Prefetch 1, and a visibility
timeout (for prefetched messages of a dead worker) set in both transport-option places
the Redis transport reads. Without a configured broker the embedded ``filesystem://``
transport under the data directory is used (it works across processes).

The API enqueues by task name only (it never imports the tasks); the workers
(:mod:`otcclip.workers`) register the tasks under these names. Start one with
``otcclip worker --queues gpu,cpu,train`` (or ``celery -A otcclip.workers.celery_app
worker -Q gpu,cpu,train``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu import Queue

from otcclip.service.core.config import Settings

log = logging.getLogger(__name__)

QUEUES: tuple[str, ...] = ("gpu", "train", "cpu")

#: Task name -> queue.
ROUTES: dict[str, str] = {
    "otcclip.sanitize.ingest": "cpu",
    "otcclip.sanitize.encode": "gpu",
    "otcclip.sanitize.match": "gpu",
    "otcclip.sanitize.finalize": "cpu",
    "otcclip.train": "train",
    "otcclip.evaluate": "gpu",
}

#: The first task of each job kind.
ENTRY: dict[str, str] = {"sanitize": "otcclip.sanitize.ingest", "train": "otcclip.train", "evaluate": "otcclip.evaluate"}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings``."""
    transport: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    conf: dict[str, Any] = {
        "broker_url": settings.effective_broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_acks_late": False,
        "worker_prefetch_multiplier": 1,
        "task_queues": [Queue(q, routing_key=q) for q in QUEUES],
        "task_default_queue": "cpu",
        "task_routes": {name: {"queue": q, "routing_key": q} for name, q in ROUTES.items()},
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "enable_utc": True,
    }
    if settings.embedded_broker:
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport.update(
            data_folder_in=str(folder / "queue"), data_folder_out=str(folder / "queue"),
            processed_folder=str(folder / "processed"), store_processed=False, control_folder=str(folder / "control"),
            polling_interval=0.2,
        )
        conf["worker_enable_remote_control"] = False
        conf["broker_pool_limit"] = 1
    transport.update(settings.broker_transport_extra)
    conf["broker_transport_options"] = transport
    conf["result_backend_transport_options"] = dict(transport)
    return conf


def make_celery(settings: Settings, *, include: Sequence[str] = ()) -> Celery:
    """A Celery app for ``settings``.

    The API sends tasks by name and needs no task modules; a worker passes the modules
    that register the tasks in ``include`` (:func:`otcclip.workers.celery_app.worker_app`).
    """
    app = Celery("otcclip", set_as_current=False, include=list(include))
    app.conf.update(celery_config(settings))
    return app


def is_broker_error(exc: BaseException) -> bool:
    """True for errors that mean "the broker is unreachable right now" (worth a retry)."""
    from kombu.exceptions import OperationalError

    if isinstance(exc, OperationalError | ConnectionError | TimeoutError):
        return True
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - redis is only needed with a Redis broker
        return False
    return isinstance(exc, RedisConnectionError | RedisTimeoutError)


def enqueue(celery: Celery, task: str, *args: Any, key: str | None = None, retry_s: float = 0.0) -> None:
    """Send ``task`` with JSON ``args`` (ids only) to its queue.

    Parameters
    ----------
    celery : Celery
        The producer app.
    task : str
        A task name from :data:`ROUTES`.
    *args
        The task's arguments (ids).
    key : str, optional
        The unit of work the message stands for (``<job>:<stage>:<shard>``); it prefixes the
        Celery task id so duplicates of one unit are recognisable in the logs. Consumers
        are idempotent per unit (leases and done markers in the database), so a message
        published twice - a retry after an ambiguous failure, a sweeper re-send - does
        the work once.
    retry_s : float
        Keep retrying a broker outage with exponential backoff (0.25 s doubling, at most
        5 s apart) for this many seconds before raising; 0 raises after Celery's own
        short publish retry.
    """
    task_id = f"{key}.{uuid.uuid4().hex[:12]}" if key else None
    deadline = time.monotonic() + retry_s
    delay = 0.25
    while True:
        try:
            celery.send_task(task, args=list(args), queue=ROUTES[task], routing_key=ROUTES[task], task_id=task_id)
            return
        except Exception as e:
            if not is_broker_error(e) or time.monotonic() + delay > deadline:
                raise
            log.warning("broker unreachable publishing %s (%s: %s); retrying in %.2fs", key or task, type(e).__name__, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
