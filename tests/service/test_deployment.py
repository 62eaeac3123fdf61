"""The deployment files name every service, volume, queue and setting the code expects
(no Docker engine here: the compose file and Dockerfile are parsed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from otcclip.cli import build_parser
from otcclip.service.core.config import Settings
from otcclip.service.queue import QUEUES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


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
