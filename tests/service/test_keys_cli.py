"""``otcclip keys create`` finds the database as ``otcclip serve`` does and says which one
it wrote to: run from another directory with the server's settings in the environment,
its key works against the server; without them it says it made a new database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from otcclip.cli._service import database_label
from otcclip.service.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def _keys_create(name: str, *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "otcclip", "keys", "create", name], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTCCLIP_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_key_made_elsewhere_with_the_servers_settings_authenticates(backend: str, tmp_path: Path,
                                                                       request: pytest.FixtureRequest) -> None:
    from otcclip.cli.embedded import run_service

    url = request.getfixturevalue("pg_database") if backend == "postgres" else None
    settings = Settings(data_dir=tmp_path / "server" / "data", database_url=url)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with run_service(settings, worker=False) as svc:
        made = _keys_create("alice", cwd=elsewhere, env={**_clean_env(), **settings.env()})
        assert made.returncode == 0, made.stderr
        key = made.stdout.strip()
        assert key.startswith("otc_") and "\n" not in key
        assert f"written to {database_label(settings)}" in made.stderr and "warning" not in made.stderr
        assert not (elsewhere / ".otcclip").exists()
        ok = httpx.get(f"{svc.url}/v1/jobs", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text

        # without the server's settings: a new database under the working directory, said so
        stray = _keys_create("bob", cwd=elsewhere, env=_clean_env())
        assert stray.returncode == 0, stray.stderr
        db_file = (elsewhere / ".otcclip" / "otcclip.db").resolve()
        assert db_file.is_file() and str(db_file) in stray.stderr and "did not exist" in stray.stderr
        rejected = httpx.get(f"{svc.url}/v1/jobs", headers={"Authorization": f"Bearer {stray.stdout.strip()}"})
        assert rejected.status_code == 401


def test_the_database_is_named_with_its_password_masked() -> None:
    label = database_label(Settings(database_url="postgresql+psycopg2://otc:s3cret@db.example:5432/otcclip"))
    assert label == "postgresql+psycopg2://otc:***@db.example:5432/otcclip"
    assert database_label(Settings(data_dir=Path("/srv/otc"))) == "sqlite:////srv/otc/otcclip.db"
