"""The sanitization pass's shard files (DESIGN 2.3): what one encode shard and one match
shard hand to the next stage, saved atomically so a worker can die at any point and a
re-run skips finished shards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otcclip.models.atomic import atomic_write
from otcclip.models.scores import MatchScores


def caption_hash(text: str) -> int:
    """Stable signed 64-bit hash of a caption's text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


@dataclass(frozen=True)
class FeatureShard:
    """Features of manifest rows ``[start, stop)``.

    Attributes
    ----------
    start, stop : int
    ok : Tensor, shape (n,), bool
        False where the image was unreadable (its features are zeros).
    image_global : Tensor, shape (n, d), float32
    image_local : Tensor, shape (n, P, d), float16 or float32
    caption_global : Tensor, shape (n, d), float32
    caption_local : Tensor, shape (n, L, d), float16 or float32 (zero at pads)
    caption_mask : Tensor, shape (n, L), bool
    caption_hash : Tensor, shape (n,), int64
    image_purified : Tensor, shape (n, V, d), float32, optional
        Globals of the purified views of each image (``features.PURIFIERS``; only with
        the ``trigger_sensitivity`` detector).
    image_hash : Tensor, shape (n,), int64, optional
        :func:`~otcclip.models.images.pixel_hash` of each decoded image (0 where
        unreadable): exact duplicates. None in shards written without it.
    row_key : Tensor, shape (n,), int64, optional
        Hash of each row's manifest id: a tie-break that follows the pair, not its row.
    image_thumb : Tensor, shape (n, t), float16, optional
        :func:`~otcclip.models.features.content_thumbnail` of each image (zeros where
        unreadable): what the image shows, model-free (``collapse`` detector). None in
        shards written without it.
    timings : dict
        Seconds spent per stage (``decode``, ``encode``).
    """

    start: int
    stop: int
    ok: torch.Tensor
    image_global: torch.Tensor
    image_local: torch.Tensor
    caption_global: torch.Tensor
    caption_local: torch.Tensor
    caption_mask: torch.Tensor
    caption_hash: torch.Tensor
    image_purified: torch.Tensor | None = None
    image_hash: torch.Tensor | None = None
    row_key: torch.Tensor | None = None
    image_thumb: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.stop - self.start

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) with ``torch.save``."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return atomic_write(Path(path), lambda tmp: torch.save(data, tmp))

    @staticmethod
    def load(path: str | Path, *, mmap: bool = True) -> FeatureShard:
        """Load a saved shard (tensors memory-mapped unless ``mmap=False``)."""
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        return FeatureShard(**data)


@dataclass(frozen=True)
class ScoreShard:
    """Shortlist scores of rows ``[start, stop)`` (see :class:`MatchScores`)."""

    start: int
    stop: int
    scores: MatchScores
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        arrays = {f.name: v for f in fields(MatchScores) if (v := getattr(self.scores, f.name)) is not None}
        meta = np.array([self.start, self.stop], dtype=np.int64)
        tnames = np.array(list(self.timings), dtype=str)
        tvals = np.array(list(self.timings.values()), dtype=np.float64)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, _meta=meta, _tnames=tnames, _tvals=tvals, **arrays)

        return atomic_write(Path(path), write)

    @staticmethod
    def span(path: str | Path) -> tuple[int, int]:
        """``(start, stop)`` of a saved shard, read without its arrays."""
        with np.load(path, allow_pickle=False) as z:
            start, stop = (int(v) for v in z["_meta"])
        return start, stop

    @staticmethod
    def timings_of(path: str | Path) -> dict[str, float]:
        """The stage timings of a saved shard, read without its arrays."""
        with np.load(path, allow_pickle=False) as z:
            return _timings(z)

    @staticmethod
    def load(path: str | Path) -> ScoreShard:
        with np.load(path, allow_pickle=False) as z:
            start, stop = (int(v) for v in z["_meta"])
            scores = MatchScores(**{f.name: z[f.name] for f in fields(MatchScores) if f.name in z.files})
            timings = _timings(z)
        return ScoreShard(start=start, stop=stop, scores=scores, timings=timings)


def _timings(z: Any) -> dict[str, float]:
    """The stage timings saved in an open shard file (``_tnames`` / ``_tvals``)."""
    return {str(k): float(v) for k, v in zip(z["_tnames"], z["_tvals"], strict=True)}
