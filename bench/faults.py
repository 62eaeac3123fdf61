"""Fault injection against the PostgreSQL + Redis deployment; prints one table.

The script starts its OWN instances on spare loopback ports - a ``redis-server``
(append-only file, like a production broker) and a PostgreSQL cluster (``initdb`` into a
temporary folder, ``pg_ctl``) - plus the API (in this process) and a Celery worker
(a child process group), and runs small jobs on scikit-learn's digits (the demo's data):

* ``baseline``: a sanitize job and a train job without faults (the reference outputs);
* ``redis-restart``: Redis stopped for ``--down`` seconds (10) while a sanitize job encodes;
* ``postgres-restart``: PostgreSQL stopped for ``--down`` seconds while a sanitize job encodes;
* ``kill-encode`` / ``kill-match``: the worker SIGKILLed (whole process group) during the
  encode / match stage of a sanitize job, a fresh worker started at once;
* ``kill-train``: the same during training (after a few checkpointed epochs).

For each it prints the final state, whether the outputs are byte-identical to the
uninterrupted run (sha256 of the cleaned manifest and ``decisions.parquet``, of the
weights for training), the most executions of one unit of work (job stage or shard)
that ran at the same time (from the workers' ``execution start/end`` log lines; a
killed worker's open executions end at the kill), and the responses of the pollers
(one GET per 0.05 s on the job) by class: 5xx other than 503, and 503.

Bounded: every job has a deadline (``--timeout``, 240 s), so a stuck job shows up as
``running (timeout)`` rather than a hang; the whole run with the defaults takes about
5-8 minutes on 2 CPU cores. Everything lives in one temporary folder, removed at the end
(``--keep`` keeps it, with the worker and server logs).

Usage::

    .venv/bin/python bench/faults.py [--scenarios redis-restart,postgres-restart,kill-encode,kill-match,kill-train]
                                     [--rows 120] [--down 10] [--timeout 240] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench._fixtures import digits_dataset  # noqa: E402  (after the path set-up above)
from otcclip.cli.embedded import free_port  # noqa: E402

SANITIZE = {"model": "otc-micro", "random_init": True, "k": 4, "shard_size": 20, "device": "cpu", "batch_size": 64}
TRAIN = {"model": "otc-micro", "defence": "none", "epochs": 8, "batch_size": 16, "device": "cpu",
         "lr_warmup_steps": 1, "checkpoint_every": 2}
SCENARIOS = ("redis-restart", "postgres-restart", "kill-encode", "kill-match", "kill-train")
#: Lease settings of the rig: a lease longer than the outages, so a healthy execution
#: keeps its lease through them; a quick sweep, so a killed worker's job is back soon.
RIG_SETTINGS = {"lease_s": 15.0, "sweep_interval_s": 2.0, "outage_retry_s": 90.0,
                "progress_interval_s": 0.2, "stop_poll_interval_s": 0.5}


def binaries_missing() -> list[str]:
    """The server binaries this script needs that are not on PATH."""
    return [b for b in ("redis-server", "initdb", "pg_ctl") if shutil.which(b) is None]


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.1)


class RedisServer:
    """A private ``redis-server`` on a spare port (append-only file in ``root``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
               "--appendonly", "yes", "--save", "", "--protected-mode", "no", "--logfile", str(self.root / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.port, 20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a clean shutdown: the AOF is flushed
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class PostgresServer:
    """A private PostgreSQL cluster (``initdb`` into a temporary folder) on a spare port.

    As root the server runs as the ``postgres`` user (PostgreSQL refuses root), so its
    folder is made outside any private temporary directory and handed to that user.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="otcclip-faults-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._user = "postgres" if os.geteuid() == 0 else None
        if self._user:
            shutil.chown(self.root, self._user)
        self._run(["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str]) -> None:
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off -c max_connections=200"
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-w", "-t", "60", "-o", opts, "start"])
        _wait_port(self.port, 30)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"])

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Outcome:
    """One row of the table."""

    scenario: str
    state: str
    identical: bool | None
    max_concurrent: int
    http_5xx: int
    http_503: int
    seconds: float
    fault_at: str = "-"
    recovery: str = "-"
    job: dict[str, Any] = field(default_factory=dict, repr=False)


_EXEC = re.compile(r"execution (start|end) job=(\w+) unit=(\S+) owner=(\S+) t=([\d.]+)")


def max_concurrent_executions(logs: list[Path], job_id: str, *, killed: dict[str, float]) -> int:
    """The most executions of one unit of ``job_id`` that overlapped in time.

    ``killed`` maps a worker log's path to the time its worker was SIGKILLed: its
    executions without an end line end there; others without one are still running.
    """
    intervals: dict[str, dict[str, list[float]]] = {}
    for log in logs:
        if not log.exists():
            continue
        for m in _EXEC.finditer(log.read_text(errors="replace")):
            what, job, unit, owner, t = m.groups()
            if job != job_id:
                continue
            span = intervals.setdefault(unit, {}).setdefault(owner, [float(t), killed.get(str(log), float("inf"))])
            if what == "end":
                span[1] = float(t)
    best = 0
    for owners in intervals.values():
        events = sorted([(a, 1) for a, _ in owners.values()] + [(b, -1) for _, b in owners.values()])
        cur = 0
        for _, d in events:
            cur += d
            best = max(best, cur)
    return best


#: What the logs say about a job's recovery: (label, pattern with the job id as ``{job}``).
_RECOVERY = (
    ("publish retries", r"broker unreachable publishing {job}"),
    ("db retries", r"job {job}: [^\n]*unreachable [^\n]*retrying in"),
    ("sweeper re-sends", r"job {job}: no heartbeat"),
    ("duplicates refused", r"job {job} \S+: another live execution holds the lease"),
)


def recovery_notes(logs: list[Path], job_id: str) -> str:
    """Counts of the recovery mechanisms that acted on ``job_id``, from the logs."""
    text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
    notes = [f"{n} {label}" for label, pat in _RECOVERY if (n := len(re.findall(pat.format(job=job_id), text)))]
    return ", ".join(notes) or "-"


class Rig:
    """Own Redis + PostgreSQL, the API in this process, a worker child; see :func:`rig`."""

    def __init__(self, root: Path, redis: RedisServer, pg: PostgresServer, svc: Any, key: str, *, concurrency: int) -> None:
        self.root, self.redis, self.pg, self.svc = root, redis, pg, svc
        self.http = httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        self.concurrency = concurrency
        self.worker: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.killed: dict[str, float] = {}
        self.dataset_id = ""
        self.fault_at = "-"
        self.api_log = root / "api.log"

    def start_worker(self) -> None:
        from otcclip.cli.embedded import start_worker

        log = self.root / f"worker-{len(self.logs)}.log"
        self.logs.append(log)
        self.worker = start_worker(self.svc.settings, concurrency=self.concurrency, name=f"w{len(self.logs)}@%h",
                                   extra_env={"OMP_NUM_THREADS": "1"}, log_path=log)

    def kill_worker(self) -> None:
        """SIGKILL the worker's whole process group and start a fresh one at once."""
        from otcclip.cli.embedded import stop_process

        assert self.worker is not None
        self.killed[str(self.logs[-1])] = time.time()
        stop_process(self.worker, sig=signal.SIGKILL)
        self.start_worker()

    def stop(self) -> None:
        from otcclip.cli.embedded import stop_process

        if self.worker is not None:
            stop_process(self.worker)
        self.http.close()

    def upload(self, manifest: Path, images: Path) -> str:
        files = {"manifest": (manifest.name, manifest.read_bytes()), "images": (images.name, images.read_bytes())}
        r = self.http.post("/v1/datasets", files=files)
        r.raise_for_status()
        self.dataset_id = r.json()["id"]
        return self.dataset_id

    def submit(self, kind: str, settings: dict[str, Any]) -> str:
        r = self.http.post("/v1/jobs", json={"kind": kind, "dataset_id": self.dataset_id, "settings": settings})
        r.raise_for_status()
        return str(r.json()["id"])

    def watch(self, job_id: str, *, timeout: float, trigger: Callable[[dict[str, Any]], bool] | None = None,
              fault: Callable[[], None] | None = None) -> tuple[dict[str, Any], int, int]:
        """Poll the job every 0.05 s until it is terminal (or ``timeout``); run ``fault`` in a
        thread the first time ``trigger(job)`` holds. Returns (job, 5xx other than 503, 503)."""
        deadline = time.monotonic() + timeout
        bad = unavailable = 0
        fired: threading.Thread | None = None
        last: dict[str, Any] = {"state": "unknown"}
        self.fault_at = "-"
        while time.monotonic() < deadline:
            try:
                r = self.http.get(f"/v1/jobs/{job_id}", timeout=10)
            except httpx.HTTPError:
                bad += 1
                time.sleep(0.05)
                continue
            if r.status_code == 503:
                unavailable += 1
            elif r.status_code >= 500:
                bad += 1
            elif r.status_code == 200:
                last = r.json()
                if fired is None and fault is not None and trigger is not None and trigger(last):
                    fired = threading.Thread(target=fault, daemon=True)
                    fired.start()
                    self.fault_at = f"{last.get('stage')} {last['progress']['done']}/{last['progress']['total']}"
                if last["state"] in ("succeeded", "failed", "cancelled") and (fired is None or not fired.is_alive()):
                    break
            time.sleep(0.05)
        else:
            last = {**last, "state": f"{last.get('state')} (timeout)"}
        if fired is not None:
            fired.join(60)
        return last, bad, unavailable

    def download(self, artifact_id: str) -> bytes:
        r = self.http.get(f"/v1/artifacts/{artifact_id}")
        r.raise_for_status()
        return r.content

    def fingerprint(self, job: dict[str, Any]) -> str | None:
        """sha256 over the job's outputs: cleaned manifest + decisions, or the trained weights."""
        arts = (job.get("result") or {}).get("artifacts") or {}
        h = hashlib.sha256()
        if "checkpoint" in arts:
            with tarfile.open(fileobj=io.BytesIO(self.download(arts["checkpoint"]))) as tar:
                member = tar.extractfile("checkpoint/open_clip_model.safetensors")
                if member is None:
                    return None
                h.update(member.read())
        elif "manifest" in arts and "decisions" in arts:
            h.update(self.download(arts["manifest"]))
            h.update(self.download(arts["decisions"]))
        else:
            return None
        return h.hexdigest()


@contextmanager
def rig(root: Path, *, rows: int = 240, concurrency: int = 2, log_path: Path | None = None,
        **settings_kw: Any) -> Iterator[Rig]:
    """Own Redis and PostgreSQL, the API in this process and one worker, the digits
    uploaded; this process's logs go to ``log_path`` when given."""
    from otcclip.cli.embedded import run_service
    from otcclip.service.core.config import Settings

    redis = RedisServer(root / "redis")
    pg = PostgresServer()
    the_rig: Rig | None = None
    try:
        redis.start()
        pg.start()
        settings = Settings(data_dir=root / "data", database_url=pg.url, broker_url=redis.url,
                            **{**RIG_SETTINGS, **settings_kw})
        data = digits_dataset(root, rows)
        manifest, images = data.manifest, data.images
        with run_service(settings, worker=False) as svc:
            if log_path is not None:  # after uvicorn configured its loggers
                log_to_file(log_path)
            the_rig = Rig(root, redis, pg, svc, svc.create_key("faults"), concurrency=concurrency)
            the_rig.upload(manifest, images)
            the_rig.start_worker()
            yield the_rig
    finally:
        if the_rig is not None:
            the_rig.stop()
        redis.stop()
        pg.remove()


def log_to_file(path: Path) -> None:
    """This process's logs (the API and its sweeper) to ``path``, not the terminal."""
    import logging

    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.handlers[:] = [handler]
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def outage(server: RedisServer | PostgresServer, down_s: float) -> Callable[[], None]:
    def fault() -> None:
        server.stop()
        time.sleep(down_s)
        server.start()

    return fault


def mid_stage(stage: str, *, left: int | None = None) -> Callable[[dict[str, Any]], bool]:
    """Trigger: the job is in ``stage`` with part of it done, and (``left``) at most that
    many rows still to do."""
    def trigger(j: dict[str, Any]) -> bool:
        done, total = j["progress"]["done"], j["progress"]["total"]
        return j.get("stage") == stage and 0 < done < total and (left is None or total - done <= left)

    return trigger


def in_stage(stage: str) -> Callable[[dict[str, Any]], bool]:
    """Trigger: the job is in ``stage`` and the stage is not finished."""
    def trigger(j: dict[str, Any]) -> bool:
        return j.get("stage") == stage and j["progress"]["done"] < max(1, j["progress"]["total"])

    return trigger


def epochs_done(r: Rig, job_id: str, n: int) -> Callable[[dict[str, Any]], bool]:
    def trigger(j: dict[str, Any]) -> bool:
        if j.get("stage") != "train":
            return False
        return len(r.http.get(f"/v1/jobs/{job_id}/metrics").json()) >= n

    return trigger


def run_scenario(r: Rig, name: str, *, down_s: float = 10.0, timeout: float = 240.0,
                 reference: dict[str, str | None] | None = None) -> Outcome:
    """Run one scenario (or ``baseline-sanitize`` / ``baseline-train``) on the rig."""
    kind = "train" if name in ("kill-train", "baseline-train") else "sanitize"
    job_id = r.submit(kind, TRAIN if kind == "train" else SANITIZE)
    trigger: Callable[[dict[str, Any]], bool] | None = None
    fault: Callable[[], None] | None = None
    # the outages start as soon as the encode stage is seen unfinished: the shards still
    # running finish during the outage, so the next stage is published (Redis) or recorded
    # (PostgreSQL) while it lasts (a model already loaded encodes a small set in well
    # under a second, too fast to wait for its last shards)
    if name == "redis-restart":
        trigger, fault = in_stage("encode"), outage(r.redis, down_s)
    elif name == "postgres-restart":
        trigger, fault = in_stage("encode"), outage(r.pg, down_s)
    elif name in ("kill-encode", "kill-match"):
        trigger, fault = mid_stage(name.split("-")[1]), r.kill_worker
    elif name == "kill-train":
        trigger, fault = epochs_done(r, job_id, 3), r.kill_worker
    elif not name.startswith("baseline"):
        raise ValueError(f"unknown scenario {name!r}")
    t0 = time.monotonic()
    job, bad, unavailable = r.watch(job_id, timeout=timeout, trigger=trigger, fault=fault)
    seconds = time.monotonic() - t0
    identical = None
    if job["state"] == "succeeded":
        fp = r.fingerprint(job)
        ref = (reference or {}).get(kind)
        identical = fp is not None and (ref is None or fp == ref)
        if reference is not None and ref is None:
            reference[kind] = fp
    conc = max_concurrent_executions(r.logs, job_id, killed=r.killed)
    notes = recovery_notes([*r.logs, r.api_log], job_id)
    return Outcome(name, job["state"], identical, conc, bad, unavailable, seconds, r.fault_at, notes, job)


def format_table(rows: list[Outcome]) -> str:
    head = ("scenario", "fault at", "final state", "outputs identical", "max concurrent executions", "5xx (not 503)",
            "503", "seconds", "recovery (from the logs)")
    body = [(o.scenario, o.fault_at, o.state, {True: "yes", False: "NO", None: "-"}[o.identical], str(o.max_concurrent),
             str(o.http_5xx), str(o.http_503), f"{o.seconds:.0f}", o.recovery) for o in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {', '.join(SCENARIOS)}")
    p.add_argument("--rows", type=int, default=240, help="digits rows of the dataset (default 240)")
    p.add_argument("--down", type=float, default=10.0, help="seconds Redis / PostgreSQL stay down (default 10)")
    p.add_argument("--timeout", type=float, default=240.0, help="deadline of one job in seconds (default 240)")
    p.add_argument("--concurrency", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}")
    missing = binaries_missing()
    if missing:
        print(f"cannot run: {', '.join(missing)} not found on PATH", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="otcclip-faults-"))
    log_to_file(root / "api.log")  # the server start-up too
    rows: list[Outcome] = []
    reference: dict[str, str | None] = {}
    try:
        with rig(root, rows=args.rows, concurrency=args.concurrency, log_path=root / "api.log") as r:
            kinds = {"train" if n == "kill-train" else "sanitize" for n in names}
            for base in sorted(f"baseline-{k}" for k in kinds):
                rows.append(run_scenario(r, base, timeout=args.timeout, reference=reference))
                print(f"{base}: {rows[-1].state} in {rows[-1].seconds:.0f}s", flush=True)
            for name in names:
                rows.append(run_scenario(r, name, down_s=args.down, timeout=args.timeout, reference=reference))
                print(f"{name}: {rows[-1].state} in {rows[-1].seconds:.0f}s", flush=True)
    finally:
        if args.keep:
            print(f"logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(format_table(rows))
    ok = all(o.state == "succeeded" and o.identical and o.max_concurrent <= 1 and o.http_5xx == 0 for o in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
