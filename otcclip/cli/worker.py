"""``otcclip worker --queues gpu,cpu,train``: a Celery worker for the service's queues.

By default the command supervises the Celery worker: it runs it as a child process and
starts it again when it dies on its own (Celery's Redis consumer can crash on a broker
restart while tasks run), with a growing pause between restarts, and gives up after
``MAX_QUICK_RESTARTS`` deaths within a minute of their starts. SIGTERM / SIGINT are passed
on and end the supervision. ``--no-supervise`` runs Celery in this process.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from otcclip.cli import CliError

log = logging.getLogger(__name__)

#: Deaths within ``QUICK_S`` seconds of a start, in a row, after which the supervisor gives up.
MAX_QUICK_RESTARTS = 5
QUICK_S = 60.0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("worker", help="run a Celery worker (gpu, cpu and/or train queues)")
    p.add_argument("--queues", "-Q", default="gpu,cpu,train", help="comma-separated: gpu, cpu, train")
    p.add_argument("--concurrency", "-c", type=int, default=1, help="worker processes")
    p.add_argument("--pool", default="prefork", choices=("prefork", "solo", "threads"))
    p.add_argument("--name", default=None, help="worker node name (default otcclip-<pid>@host)")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--no-supervise", dest="supervise", action="store_false",
                   help="run Celery in this process (no restart when it dies)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from otcclip.service.queue import QUEUES

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    bad = [q for q in queues if q not in QUEUES]
    if bad or not queues:
        raise CliError(f"--queues: unknown queue(s) {bad} (choose from {', '.join(QUEUES)})")
    if args.concurrency < 1:
        raise CliError("--concurrency must be at least 1")
    name = args.name or f"otcclip-{os.getpid()}@%h"
    if args.supervise:
        child = [sys.executable, "-m", "otcclip", "worker", "--no-supervise", "--queues", ",".join(queues),
                 "--concurrency", str(args.concurrency), "--pool", args.pool, "--name", name, "--loglevel", args.loglevel]
        return supervise(child)
    from otcclip.cli._service import service_settings
    from otcclip.workers.celery_app import worker_app

    app = worker_app(service_settings())
    app.worker_main([
        "worker", "-Q", ",".join(queues), "-c", str(args.concurrency), "-P", args.pool, "-n", name,
        "--loglevel", args.loglevel, "--without-gossip", "--without-mingle", "--without-heartbeat",
    ])
    return 0


def supervise(command: list[str]) -> int:
    """Run ``command`` and start it again whenever it exits without being asked to.

    Returns the child's exit code once a SIGTERM/SIGINT was passed on to it (as SIGTERM), or 1 after
    :data:`MAX_QUICK_RESTARTS` quick deaths in a row. The pause before a restart doubles
    from 1 s up to 30 s while the deaths come quickly.
    """
    stopping = False
    proc: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: Any) -> None:
        # a warm shutdown either way (a terminal's Ctrl-C already reached the child too,
        # and a second SIGINT would make Celery's shutdown cold)
        nonlocal stopping
        stopping = True
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    quick = 0
    try:
        while True:
            started = time.monotonic()
            proc = subprocess.Popen(command)
            code = proc.wait()
            if stopping:
                return code
            quick = quick + 1 if time.monotonic() - started < QUICK_S else 0
            if quick >= MAX_QUICK_RESTARTS:
                log.error("the Celery worker died %d times in a row within %.0fs of starting (exit %d); giving up",
                          quick, QUICK_S, code)
                return 1
            pause = min(30.0, 2.0 ** quick)
            log.error("the Celery worker exited (code %d) without being asked to; restarting in %.0fs", code, pause)
            deadline = time.monotonic() + pause
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.2)
            if stopping:
                return code
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
