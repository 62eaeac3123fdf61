"""Shared fixtures: tiny models, the CIFAR-10 zip, service reachability."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CIFAR_ZIP = Path(os.environ.get("OTCCLIP_CIFAR_ZIP", REPO.parent / "shared" / "data" / "cifar10-jpg.zip"))


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def cifar_zip() -> Path:
    """Path to ``../shared/data/cifar10-jpg.zip``; skips the test where ``../shared`` is missing."""
    if not CIFAR_ZIP.is_file():
        pytest.skip(f"CIFAR-10 zip not found at {CIFAR_ZIP} (../shared is missing)")
    return CIFAR_ZIP


@pytest.fixture(scope="session")
def postgres_url() -> str:
    if not _port_open("127.0.0.1", 5432):
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (.ci/run starts it)")
    return os.environ.get("OTCCLIP_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _port_open("127.0.0.1", 6379):
        pytest.skip("Redis is not reachable on 127.0.0.1:6379 (.ci/run starts it)")
    return os.environ.get("OTCCLIP_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def tiny_bundle():
    """A randomly initialised ``otc-micro`` model (fast on CPU)."""
    from otcclip.models.factory import create_model

    return create_model("otc-micro", seed=0)
