"""Service settings (pydantic-settings, environment prefix ``OTCCLIP_``).

With nothing configured the service is self-contained: SQLite and local storage under
the data directory (``./.otcclip/`` or ``$OTCCLIP_DATA_DIR``) and an embedded Celery
broker (kombu's ``filesystem://`` transport, which works across processes).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All service settings; every field reads ``OTCCLIP_<NAME>`` from the environment.

    Attributes
    ----------
    data_dir : Path
        Root of the embedded defaults (database, storage, broker folders).
    database_url : str or None
        SQLAlchemy URL; None -> ``sqlite:///<data_dir>/otcclip.db`` (WAL mode).
    broker_url : str or None
        Celery broker; None -> embedded ``filesystem://`` transport under ``data_dir``.
    storage_dir : Path or None
        Uploads and artifacts (a shared volume when distributed); None -> ``data_dir/storage``.
    max_upload_bytes : int
        Cap on one upload request (manifest + images); larger -> 413.
    max_archive_total_bytes, max_archive_members, max_archive_member_bytes, max_archive_ratio
        Zip-bomb guards applied when an uploaded archive is opened.
    visibility_timeout_s : int
        Redis visibility timeout: when a dead worker's prefetched (not started) messages
        are handed out again (started tasks are recovered by the lease sweeper).
    max_attempts : int
        Executions of one job (or shard) before it is failed (the worker was lost each time);
        the sweeper fails a job with an expired lease that has used them all.
    progress_interval_s : float
        Minimum seconds between progress writes to the job row.
    stop_poll_interval_s : float
        Minimum seconds between cancel checks against the job row.
    worker_concurrency : int
        Processes of the embedded worker.
    api_threads : int
        Threads that run the API's blocking handlers (database work, archive checks); the
        API's database pool holds this many connections, so a handler never waits for one.
    db_pool_timeout_s : float
        Seconds a request waits for a pooled connection before it is answered 503.
    max_concurrent_uploads : int
        Uploads streamed and validated at once per API process; more are answered 503
        with ``Retry-After`` before their body is read.
    upload_queue_wait_s : float
        How long an upload past ``max_concurrent_uploads`` waits for a slot (before its
        body is read) before it is answered 503.
    max_inflight_requests : int
        Requests in progress per API process; more are answered 503 at once.
    retry_after_s : int
        The ``Retry-After`` of every 503 the API sends under overload.
    max_form_parts : int
        Parts of one multipart upload (files and fields); more -> 413 while streaming.
    orphan_upload_grace_s : float
        Upload staging folders older than this are removed when the API starts (an API
        killed mid-upload leaves one behind).
    max_image_pixels : int
        Images with more pixels are refused before they are decoded.
    broker_transport_extra : dict
        More kombu transport options (e.g. ``{"unacked_restore_interval": 10}`` for Redis),
        JSON in ``OTCCLIP_BROKER_TRANSPORT_EXTRA``.
    lease_s : float
        Lifetime of a job's (or shard's) lease without a heartbeat; the running task
        renews it every third of this, and the sweeper recovers a job, or one encode/match
        shard, whose lease is older.
    sweep_interval_s : float
        Seconds between two sweeps for expired leases (each worker and the embedded runner sweep).
    outage_retry_s : float
        How long a worker keeps retrying (with exponential backoff) to publish the next
        stage or to write a state transition while the broker or database is unreachable;
        past it the job is left to the sweeper.
    """

    model_config = SettingsConfigDict(env_prefix="OTCCLIP_", extra="ignore")

    data_dir: Path = Field(default=Path(".otcclip"))
    database_url: str | None = None
    broker_url: str | None = None
    storage_dir: Path | None = None
    max_upload_bytes: int = 2 << 30
    max_archive_total_bytes: int = 16 << 30
    max_archive_members: int = 2_000_000
    max_archive_member_bytes: int = 64 << 20
    max_archive_ratio: float = 100.0
    visibility_timeout_s: int = 43_200
    max_attempts: int = 3
    progress_interval_s: float = 2.0
    stop_poll_interval_s: float = 1.0
    worker_concurrency: int = 1
    api_threads: int = Field(default=40, ge=1, le=1000)
    db_pool_timeout_s: float = Field(default=5.0, gt=0)
    max_concurrent_uploads: int = Field(default=4, ge=1)
    upload_queue_wait_s: float = Field(default=30.0, ge=0, le=3600)
    max_inflight_requests: int = Field(default=256, ge=1)
    retry_after_s: int = Field(default=1, ge=1)
    max_form_parts: int = Field(default=8, ge=2)
    orphan_upload_grace_s: float = Field(default=3600.0, ge=0)
    max_image_pixels: int = Field(default=64_000_000, ge=1)
    broker_transport_extra: dict[str, Any] = Field(default_factory=dict)
    lease_s: float = Field(default=30.0, gt=0)
    sweep_interval_s: float = Field(default=10.0, gt=0)
    outage_retry_s: float = Field(default=60.0, ge=0)

    @property
    def db_url(self) -> str:
        """The effective database URL."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'otcclip.db').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        """True when no broker is configured (the filesystem transport is used)."""
        return not self.broker_url or self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded filesystem transport."""
        return (self.data_dir / "broker").resolve()

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def storage_root(self) -> Path:
        """Root of uploads and artifacts."""
        return (self.storage_dir or self.data_dir / "storage").resolve()

    def env(self) -> dict[str, str]:
        """These settings as ``OTCCLIP_*`` environment variables (for child processes)."""
        out: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            out[f"OTCCLIP_{name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
        out["OTCCLIP_DATA_DIR"] = str(self.data_dir.resolve())
        out["OTCCLIP_DATABASE_URL"] = self.db_url
        return out


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment (cached; tests build :class:`Settings` directly)."""
    return Settings()
