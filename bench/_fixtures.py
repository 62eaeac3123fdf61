"""Data and database fixtures shared by the bench scripts and the tests.

``bench/faults.py`` and ``bench/load.py`` run the scenarios the tests check (and the tests
import parts of them), so the dataset they upload and the throw-away PostgreSQL database
they use are defined here once: ``tests/service/conftest.py`` wraps them as pytest fixtures.
"""

from __future__ import annotations

import csv
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DigitsDataset:
    """A CSV manifest of digits rows and the zip of the images it names.

    Attributes
    ----------
    manifest : Path
        The CSV (columns of the demo's digits manifest: ``image``, ``caption``, ``label``, ...).
    images : Path
        ``images.zip`` holding every image the manifest names, under the same names.
    dir : Path
        The folder of the full digits manifest and its image files.
    """

    manifest: Path
    images: Path
    dir: Path


def digits_dataset(root: Path, rows: int, *, name: str = "digits.csv") -> DigitsDataset:
    """The first ``rows`` rows of the demo's digits training set (seed 0), written under
    ``root``: a CSV manifest named ``name`` and ``images.zip``."""
    from otcclip.models.datasets import digits_manifest

    full = digits_manifest(root / "digits", split="train", seed=0)
    with open(full, newline="") as f:
        table = list(csv.DictReader(f))[:rows]
    manifest = root / name
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    images = root / "images.zip"
    with zipfile.ZipFile(images, "w") as z:
        for r in table:
            z.write(full.parent / r["image"], r["image"])
    return DigitsDataset(manifest=manifest, images=images, dir=full.parent)


@contextmanager
def pg_database(admin_url: str, *, prefix: str = "otcclip_test") -> Iterator[str]:
    """A fresh database on the PostgreSQL server of ``admin_url``; yields its URL and drops
    it afterwards (``WITH (FORCE)``: connections still open are closed)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            from otcclip.service.db.session import dispose_engines

            dispose_engines()  # this process's pooled connections to it
        finally:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
