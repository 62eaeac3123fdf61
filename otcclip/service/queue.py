"""The job queue as the producer sees it: queues, task names, the Celery configuration.

Queues: ``gpu`` (feature extraction, matching, evaluation), ``train`` (training) and
``cpu`` (ingest, finalize). Messages are JSON and carry ids only; job state lives in the
database (no result backend). Late acks, reject on worker lost, prefetch 1 and a
visibility timeout longer than the longest task, set in both transport-option places
the Redis transport reads. Without a configured broker the embedded ``filesystem://``
transport under the data directory is used (it works across processes).

The API enqueues by task name only (it never imports the tasks); the workers
(:mod:`otcclip.workers`) register the tasks under these names. Start one with
``otcclip worker --queues gpu,cpu,train`` (or ``celery -A otcclip.workers.celery_app
worker -Q gpu,cpu,train``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu import Queue

from otcclip.service.core.config import Settings

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
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
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


def enqueue(celery: Celery, task: str, *args: Any) -> None:
    """Send ``task`` with JSON ``args`` (ids only) to its queue."""
    celery.send_task(task, args=list(args), queue=ROUTES[task], routing_key=ROUTES[task])
