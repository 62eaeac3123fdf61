"""Opening stored datasets with the engine's manifest reader (shared by API and workers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from otcclip.service.core.config import Settings


def archive_limits(settings: Settings) -> Any:
    """The zip-bomb guards of ``settings`` as the engine's ``ArchiveLimits``."""
    from otcclip.models.images import ArchiveLimits

    return ArchiveLimits(
        max_total_bytes=settings.max_archive_total_bytes, max_members=settings.max_archive_members,
        max_member_bytes=settings.max_archive_member_bytes, max_ratio=settings.max_archive_ratio,
        max_image_pixels=settings.max_image_pixels,
    )


def open_dataset(settings: Settings, root: Path, ds: Any, *, columns: tuple[str, ...] = ("image",),
                 check_images: bool = False) -> Any:
    """The stored dataset ``ds`` as a :class:`~otcclip.models.manifest.Manifest`."""
    from otcclip.models.manifest import read_manifest

    manifest = root / ds.manifest_path
    images = root / ds.images_path if ds.images_path else None
    mapping = (ds.columns or {}).get("mapping") if isinstance(ds.columns, dict) else None
    return read_manifest(manifest, images=images, columns=columns, mapping=mapping, limits=archive_limits(settings),
                         check_images=check_images)
