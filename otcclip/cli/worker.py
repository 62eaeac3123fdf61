"""``otcclip worker --queues gpu,cpu,train``: a Celery worker for the service's queues."""

from __future__ import annotations

import argparse
import os
from typing import Any

from otcclip.cli import CliError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("worker", help="run a Celery worker (gpu, cpu and/or train queues)")
    p.add_argument("--queues", "-Q", default="gpu,cpu,train", help="comma-separated: gpu, cpu, train")
    p.add_argument("--concurrency", "-c", type=int, default=1, help="worker processes")
    p.add_argument("--pool", default="prefork", choices=("prefork", "solo", "threads"))
    p.add_argument("--name", default=None, help="worker node name (default otcclip-<pid>@host)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from otcclip.service.core.config import Settings
    from otcclip.service.queue import QUEUES
    from otcclip.workers.celery_app import worker_app

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    bad = [q for q in queues if q not in QUEUES]
    if bad or not queues:
        raise CliError(f"--queues: unknown queue(s) {bad} (choose from {', '.join(QUEUES)})")
    if args.concurrency < 1:
        raise CliError("--concurrency must be at least 1")
    app = worker_app(Settings())
    name = args.name or f"otcclip-{os.getpid()}@%h"
    app.worker_main([
        "worker", "-Q", ",".join(queues), "-c", str(args.concurrency), "-P", args.pool, "-n", name,
        "--loglevel", args.loglevel, "--without-gossip", "--without-mingle", "--without-heartbeat",
    ])
    return 0
