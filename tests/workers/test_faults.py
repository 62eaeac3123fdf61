"""Broker and database outages during a sanitize job, on private Redis and PostgreSQL
instances (``bench/faults.py`` starts them on spare ports; the machine's are never
touched): the job still succeeds, with outputs byte-identical to an uninterrupted run and
no unit of work executed twice at once. Each outage test takes 15-30 s on an idle
2-core machine (the job deadline is generous for a loaded one)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.faults import Outcome, RedisServer, Rig, binaries_missing, rig, run_scenario

pytestmark = pytest.mark.skipif(bool(binaries_missing()),
                                reason=f"fault tests start their own servers: {', '.join(binaries_missing())} not on PATH")

DOWN_S = 10.0


@pytest.fixture(scope="module")
def fault_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rig, dict[str, str | None]]]:
    """Own Redis + PostgreSQL + API + worker, and the fingerprint of an uninterrupted run."""
    root = tmp_path_factory.mktemp("faults")
    with rig(root, rows=160, concurrency=2) as r:
        reference: dict[str, str | None] = {}
        base = run_scenario(r, "baseline-sanitize", timeout=180, reference=reference)
        assert base.state == "succeeded" and reference["sanitize"], base.job
        yield r, reference


def _check(r: Rig, name: str, reference: dict[str, str | None]) -> Outcome:
    out = run_scenario(r, name, down_s=DOWN_S, timeout=150, reference=reference)
    logs = "\n".join(p.read_text()[-3000:] for p in r.logs)
    assert out.fault_at != "-", f"the fault never fired: {out.job}"
    assert out.state == "succeeded", (out.job, logs)
    assert out.identical, "outputs differ from the uninterrupted run"
    assert out.max_concurrent == 1, f"a unit of work ran {out.max_concurrent} times at once"
    return out


@pytest.mark.slow
def test_redis_restart_mid_job(fault_rig: tuple[Rig, dict[str, str | None]]) -> None:
    r, reference = fault_rig
    out = _check(r, "redis-restart", reference)
    assert out.http_5xx == 0  # polling the job needs no broker


@pytest.mark.slow
def test_postgres_restart_mid_job(fault_rig: tuple[Rig, dict[str, str | None]]) -> None:
    r, reference = fault_rig
    out = _check(r, "postgres-restart", reference)
    assert "db retries" in out.recovery  # the worker rode the outage out instead of failing the job


def test_publish_rides_out_a_broker_restart(tmp_path: Path) -> None:
    """``enqueue(retry_s=...)`` keeps retrying while Redis is down and lands the message
    once it is back; without a retry budget it raises at once."""
    import redis

    from otcclip.service.core.config import Settings
    from otcclip.service.queue import enqueue, make_celery

    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        celery = make_celery(Settings(data_dir=tmp_path / "data", broker_url=server.url))
        server.stop()
        with pytest.raises(Exception) as err:
            enqueue(celery, "otcclip.train", "j0")
        from otcclip.service.queue import is_broker_error

        assert is_broker_error(err.value)
        restart = threading.Timer(3.0, server.start)
        restart.start()
        t0 = time.monotonic()
        enqueue(celery, "otcclip.train", "j1", key="j1:train", retry_s=30)
        took = time.monotonic() - t0
        restart.join()
        assert 2.5 < took < 30
        client = redis.Redis.from_url(server.url)
        assert client.llen("train") == 1
        message = json.loads(client.lindex("train", 0))
        assert message["headers"]["task"] == "otcclip.train" and message["headers"]["id"].startswith("j1:train.")
        assert json.loads(base64.b64decode(message["body"]))[0] == ["j1"]
    finally:
        server.stop()


def test_worker_supervisor_restarts_a_dead_worker_and_passes_sigterm_on(tmp_path: Path) -> None:
    """``otcclip worker`` starts Celery again when it dies on its own (as it can on a broker
    restart), and stops it - without a restart - on SIGTERM."""
    import signal
    import subprocess
    import sys

    starts = tmp_path / "starts"
    child = ("import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); n = len(p.read_text().split()) if p.exists() else 0; "
             "p.write_text('x ' * (n + 1)); sys.exit(3) if n < 2 else time.sleep(120)")
    sup = subprocess.Popen([sys.executable, "-c", "import sys; from otcclip.cli.worker import supervise; "
                            f"sys.exit(supervise([sys.executable, '-c', {child!r}, {str(starts)!r}]))"])
    try:
        deadline = time.monotonic() + 30
        while not (starts.exists() and len(starts.read_text().split()) == 3):
            assert time.monotonic() < deadline and sup.poll() is None, "the dead child was not restarted"
            time.sleep(0.1)
        time.sleep(0.5)
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(20) != 0  # the child's exit code (killed by the passed-on SIGTERM)
        assert len(starts.read_text().split()) == 3  # and no restart after the SIGTERM
    finally:
        if sup.poll() is None:
            sup.kill()
