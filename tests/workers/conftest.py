"""Worker tests reuse the service fixtures (tiny dataset, PostgreSQL database, Redis)."""

from tests.service.conftest import clean_redis, pg_database, tiny_dataset  # noqa: F401
