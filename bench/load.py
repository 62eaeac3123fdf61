"""Bounded loopback load against ``otcclip serve``: N pollers + M uploaders for T seconds.

The service runs as its own process (``otcclip serve --no-worker``, so the numbers are the
API's, not a worker's), either embedded (SQLite, local storage, filesystem broker) or on
PostgreSQL + Redis. A fresh PostgreSQL database is created for the run and dropped after.

* Each poller repeats ``GET /v1/jobs/{id}`` on one job every ``--poll-interval`` seconds.
* Each uploader repeats ``POST /v1/datasets`` (a manifest + a zip of ``--rows`` PNGs); a
  503 is retried after its ``Retry-After`` until the upload gets its 201 (or the run's
  grace period ends).

It prints one table row per mode: requests, 2xx, 4xx, 5xx (503 included), 503 (of them
answers to polls), client errors (timeouts, resets), uploads 201 / started, and poll
latency p50 / p99 / max.

Usage::

    .venv/bin/python bench/load.py                                 # both modes, 50/10/60
    .venv/bin/python bench/load.py --mode embedded --pollers 10 --uploads 3 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._fixtures import pg_database  # noqa: E402  (after the path set-up above)

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/13"


@dataclass
class Stats:
    """What one load run saw, from the client side."""

    mode: str
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    poll_latencies: list[float] = field(default_factory=list)
    uploads_started: int = 0
    uploads_created: int = 0
    poll_503: int = 0
    seconds: float = 0.0

    def count(self, code: int) -> None:
        self.statuses[code] = self.statuses.get(code, 0) + 1

    def error(self, e: BaseException) -> None:
        name = type(e).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    def between(self, lo: int, hi: int) -> int:
        return sum(n for c, n in self.statuses.items() if lo <= c < hi)

    @property
    def server_errors_not_503(self) -> int:
        return self.between(500, 600) - self.statuses.get(503, 0)

    def percentile(self, q: float) -> float:
        if not self.poll_latencies:
            return float("nan")
        xs = sorted(self.poll_latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def make_upload(rows: int, *, seed: int = 0) -> dict[str, tuple[str, bytes]]:
    """A CSV manifest and a zip of ``rows`` small PNGs (the multipart files of one upload)."""
    from PIL import Image

    rng = random.Random(seed)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "caption"])
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(rows):
            im = Image.new("RGB", (32, 32), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
            png = io.BytesIO()
            im.save(png, "PNG")
            z.writestr(f"img/{i}.png", png.getvalue())
            w.writerow([f"img/{i}.png", f"a square of colour number {i}"])
    return {"manifest": ("load.csv", buf.getvalue().encode()), "images": ("images.zip", zbuf.getvalue())}


@contextmanager
def serve(env: dict[str, str], *, log_path: Path, port: int) -> Iterator[str]:
    """``otcclip serve --no-worker`` in a child process; yields its base URL."""
    cmd = [sys.executable, "-c", "import sys; from otcclip.cli import main; sys.exit(main(sys.argv[1:]))",
           "serve", "--no-worker", "--port", str(port)]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"otcclip serve exited with {proc.returncode}; see {log_path}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"otcclip serve did not answer on {url}; see {log_path}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def seed_job(db_url: str, owner_id: str, dataset_id: str) -> str:
    """A queued job row for the pollers (inserted directly: no worker runs during the load)."""
    from otcclip.service.db.models import Job
    from otcclip.service.db.session import session_scope

    with session_scope(db_url) as db:
        job = Job(owner_id=owner_id, kind="sanitize", dataset_id=dataset_id, settings={}, stage="queued")
        db.add(job)
        db.flush()
        return job.id


async def run_load(url: str, key: str, job_id: str, files: dict[str, tuple[str, bytes]], *, mode: str,
                   pollers: int, uploads: int, seconds: float, poll_interval: float = 0.5,
                   timeout: float = 30.0, grace: float = 60.0) -> Stats:
    """Drive the load; every coroutine stops starting work after ``seconds``.

    An upload that started before the end is retried on 503 for at most ``grace`` more
    seconds, so every started upload either gets its 201 or is reported as not created.
    """
    stats = Stats(mode=mode)
    limits = httpx.Limits(max_connections=pollers + uploads + 4, max_keepalive_connections=pollers + uploads + 4)
    headers = {"Authorization": f"Bearer {key}"}
    t0 = time.monotonic()
    end = t0 + seconds

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:

        async def poller(i: int) -> None:
            await asyncio.sleep(poll_interval * i / max(pollers, 1))  # spread the start
            while time.monotonic() < end:
                started = time.monotonic()
                try:
                    r = await client.get(f"/v1/jobs/{job_id}")
                    stats.count(r.status_code)
                    stats.poll_503 += r.status_code == 503
                    stats.poll_latencies.append(time.monotonic() - started)
                except httpx.HTTPError as e:
                    stats.error(e)
                    stats.poll_latencies.append(time.monotonic() - started)
                await asyncio.sleep(max(0.0, poll_interval - (time.monotonic() - started)))

        async def uploader(i: int) -> None:
            while time.monotonic() < end:
                stats.uploads_started += 1
                while True:
                    try:
                        r = await client.post("/v1/datasets", files=files)
                        stats.count(r.status_code)
                        if r.status_code == 201:
                            stats.uploads_created += 1
                            break
                        if r.status_code != 503:
                            break
                        wait = min(float(r.headers.get("retry-after", "1") or 1), 5.0)
                    except httpx.HTTPError as e:
                        stats.error(e)
                        wait = 1.0
                    if time.monotonic() > end + grace:
                        break
                    await asyncio.sleep(wait * (0.5 + random.random()))

        await asyncio.gather(*(poller(i) for i in range(pollers)), *(uploader(i) for i in range(uploads)))
    stats.seconds = time.monotonic() - t0
    return stats


def run_mode(mode: str, args: argparse.Namespace, workdir: Path, files: dict[str, tuple[str, bytes]]) -> Stats:
    """Start the service for ``mode`` ("embedded" or "postgres"), seed a key and a job, load it."""
    from otcclip.cli.embedded import create_key, free_port
    from otcclip.service.core.config import Settings
    from otcclip.service.db import crud
    from otcclip.service.db.session import dispose_engines, session_scope

    data = workdir / mode
    env = {"OTCCLIP_DATA_DIR": str(data)}
    with contextmanager(lambda: (yield None))() if mode == "embedded" else pg_database(args.pg_url, prefix="otcclip_load") as pg:
        if pg is not None:
            env.update(OTCCLIP_DATABASE_URL=pg, OTCCLIP_BROKER_URL=args.redis_url)
        settings = Settings(data_dir=data, database_url=pg, broker_url=args.redis_url if pg else None)
        with serve(env, log_path=workdir / f"{mode}.log", port=free_port()) as url:
            key = create_key(settings, "load")
            with session_scope(settings.db_url) as db:
                owner_id = crud.key_by_plaintext(db, key).id  # type: ignore[union-attr]
            r = httpx.post(f"{url}/v1/datasets", files=files, headers={"Authorization": f"Bearer {key}"}, timeout=60)
            r.raise_for_status()
            job_id = seed_job(settings.db_url, owner_id, r.json()["id"])
            stats = asyncio.run(run_load(url, key, job_id, files, mode=mode, pollers=args.pollers, uploads=args.uploads,
                                         seconds=args.seconds, poll_interval=args.poll_interval, timeout=args.timeout))
        dispose_engines()
    return stats


def table(rows: list[Stats]) -> str:
    """A Markdown table of the runs."""
    head = ("mode", "requests", "2xx", "4xx", "5xx", "503 (polls)", "client errors", "uploads 201/started",
            "poll p50 s", "poll p99 s", "poll max s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(s.errors.items())) or "0"
        cells = (s.mode, s.requests, s.between(200, 300), s.between(400, 500), s.between(500, 600),
                 f"{s.statuses.get(503, 0)} ({s.poll_503})", errs, f"{s.uploads_created}/{s.uploads_started}",
                 f"{s.percentile(0.5):.3f}", f"{s.percentile(0.99):.3f}",
                 f"{max(s.poll_latencies, default=float('nan')):.3f}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("embedded", "postgres", "both"), default="both")
    p.add_argument("--pollers", type=int, default=50)
    p.add_argument("--uploads", type=int, default=10)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between one poller's requests")
    p.add_argument("--rows", type=int, default=200, help="images per upload")
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (s)")
    p.add_argument("--pg-url", default=PG_URL, help="PostgreSQL server (a fresh database is created on it)")
    p.add_argument("--redis-url", default=REDIS_URL)
    args = p.parse_args(argv)
    files = make_upload(args.rows)
    modes = ("embedded", "postgres") if args.mode == "both" else (args.mode,)
    results = []
    with tempfile.TemporaryDirectory(prefix="otcclip-load-") as tmp:
        for mode in modes:
            results.append(run_mode(mode, args, Path(tmp), files))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print(f"\n{args.pollers} pollers (every {args.poll_interval} s) + {args.uploads} uploaders "
          f"({args.rows} images, {sum(len(b) for _, b in files.values())} bytes each) for {args.seconds:g} s\n")
    print(table(results))
    return 1 if any(s.server_errors_not_503 or s.uploads_created < s.uploads_started for s in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
