"""Storage: atomic capped writes, checksums, HTTP range parsing; the migrated schema."""

from __future__ import annotations

import hashlib

import pytest

from otcclip.service.storage import RangeNotSatisfiable, Storage, TooLarge, parse_range


def test_writer_is_atomic_hashes_and_caps(tmp_path):
    st = Storage(tmp_path)
    with st.writer("a/b.bin", max_bytes=10) as w:
        w.write(b"hello")
    assert (tmp_path / "a/b.bin").read_bytes() == b"hello"
    assert w.hash.hexdigest() == hashlib.sha256(b"hello").hexdigest() and w.size == 5
    with pytest.raises(TooLarge, match="10 bytes"):
        with st.writer("a/c.bin", max_bytes=10) as w:
            w.write(b"x" * 11)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]  # no partial file left
    with pytest.raises(ValueError, match="escapes"):
        st.path("../outside")


@pytest.mark.parametrize(
    ("header", "expected"),
    [("bytes=0-9", (0, 9)), ("bytes=5-", (5, 99)), ("bytes=-10", (90, 99)), ("bytes=90-500", (90, 99)),
     ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=9-3", None),
     ("bytes=0-" + "9" * 5000, (0, 99)), ("bytes=-" + "9" * 5000, (0, 99)), ("bytes=0007-0008", (7, 8)),
     ("bytes=" + "9" * 30 + "-1", None)],
)
def test_parse_range(header, expected):
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=200-300", "bytes=-0", "bytes=" + "9" * 5000 + "-",
                                    "bytes=" + "9" * 5000 + "-" + "9" * 5001])
def test_unsatisfiable_range(header):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


def _schema_diff(url: str) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from otcclip.migrations import upgrade
    from otcclip.service.db.models import Base

    upgrade(url)
    eng = create_engine(url)
    try:
        with eng.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        eng.dispose()


def test_migrated_sqlite_schema_matches_tables(tmp_path):
    assert _schema_diff(f"sqlite:///{tmp_path / 'x.db'}") == []


@pytest.mark.postgres
def test_migrated_postgres_schema_matches_tables(pg_database):
    assert _schema_diff(pg_database) == []
