"""``otcclip serve``: the API plus, with no broker configured, a Celery worker beside it."""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from otcclip.cli import CliError


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="run the REST API (embedded: SQLite + local storage + a worker)",
        description="Serve /v1 over HTTP. With nothing configured it uses SQLite and local storage under "
                    "./.otcclip (or $OTCCLIP_DATA_DIR) and starts a Celery worker on an embedded transport.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-worker", action="store_true", help="do not start the embedded worker")
    p.add_argument("--concurrency", type=int, default=None, help="embedded worker processes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from otcclip.cli._service import database_label, service_settings
    from otcclip.cli.embedded import run_service

    settings = service_settings()
    if not 0 < args.port < 65536:
        raise CliError(f"--port {args.port} is not a TCP port")
    worker = settings.embedded_broker and not args.no_worker
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with run_service(settings, host=args.host, port=args.port, worker=worker,
                     concurrency=args.concurrency or settings.worker_concurrency) as svc:
        print(f"otcclip serving on {svc.url} (docs: {svc.url}/docs); data in {settings.data_dir.resolve()}; "
              f"database {database_label(settings)}"
              + ("; embedded worker started" if worker else ""), flush=True)
        try:
            while not stop.wait(1.0):
                if svc.worker is not None and svc.worker.poll() is not None:
                    print("otcclip: the embedded worker exited; stopping", flush=True)
                    return 1
        except KeyboardInterrupt:
            pass
    return 0
