"""The Celery application the workers run (``celery -A otcclip.workers.celery_app worker``).

The queues, task names and broker configuration are the producer's contract and live in
:mod:`otcclip.service.queue`; this module only builds the app from the environment and
makes sure the tasks are registered on it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from otcclip.service.core.config import Settings, get_settings
from otcclip.service.queue import make_celery

#: Modules whose import registers the tasks (and the sweeper's ``worker_ready`` hook).
TASK_MODULES: tuple[str, ...] = ("otcclip.workers.tasks", "otcclip.workers.sweeper")

_APP: Celery | None = None


def worker_app(settings: Settings) -> Celery:
    """The Celery app a worker runs for ``settings``: the producer's configuration plus the tasks."""
    return make_celery(settings, include=TASK_MODULES)


def __getattr__(name: str) -> Any:
    """``app``: built from the environment on first access."""
    if name == "app":
        global _APP
        if _APP is None:
            _APP = worker_app(get_settings())
        return _APP
    raise AttributeError(name)
