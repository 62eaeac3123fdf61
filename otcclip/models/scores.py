"""What the match stage hands to the decision stage: the shortlist scores of every pair."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MatchScores:
    """Shortlist scores for ``N`` pairs (rows of the whole dataset, in order).

    Attributes
    ----------
    candidates : ndarray, shape (N, K), int64
        Caption rows; column 0 is the own caption; ``-1`` for none.
    global_, ot, fused : ndarray, shape (N, K), float32
        Scores per candidate (NaN where ``candidates == -1``).
    ok : ndarray, shape (N,), bool
        False where the image could not be read.
    image_global : ndarray, shape (N, d)
        Image globals (for the detectors).
    caption_global : ndarray, shape (N, d)
        Own-caption globals (for the detectors).
    caption_hash : ndarray, shape (N,), int64
        Hash of each own caption's text (caption bursts).
    purified_own : ndarray, shape (N, V), float32, optional
        Own-caption global score of each purified view of the image (trigger
        sensitivity; ``features.PURIFIERS``); None when the features were extracted
        without them.
    image_hash : ndarray, shape (N,), int64, optional
        Hash of each decoded image's pixels (0 where unreadable): exact duplicates share
        it. None when the features were extracted without it.
    row_key : ndarray, shape (N,), int64, optional
        Hash of each pair's manifest id (order-independent tie-breaks); None without it.
    image_thumb : ndarray, shape (N, t), float16, optional
        Model-free content thumbnail of each image
        (:func:`~otcclip.models.features.content_thumbnail`; zeros where unreadable);
        None when the features were extracted without it.
    """

    candidates: np.ndarray
    global_: np.ndarray
    ot: np.ndarray
    fused: np.ndarray
    ok: np.ndarray
    image_global: np.ndarray
    caption_global: np.ndarray
    caption_hash: np.ndarray
    purified_own: np.ndarray | None = None
    image_hash: np.ndarray | None = None
    row_key: np.ndarray | None = None
    image_thumb: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.candidates.shape[0])

    @staticmethod
    def concat(parts: Sequence[MatchScores]) -> MatchScores:
        """Concatenate row blocks (candidate columns padded with -1 / NaN)."""
        if not parts:
            raise ValueError("no score shards to concatenate")
        width = max(p.candidates.shape[1] for p in parts)

        def pad(a: np.ndarray, fill: float) -> np.ndarray:
            extra = width - a.shape[1]
            return np.pad(a, ((0, 0), (0, extra)), constant_values=fill) if extra else a

        return MatchScores(
            candidates=np.concatenate([pad(p.candidates, -1) for p in parts]),
            global_=np.concatenate([pad(p.global_, np.nan) for p in parts]),
            ot=np.concatenate([pad(p.ot, np.nan) for p in parts]),
            fused=np.concatenate([pad(p.fused, np.nan) for p in parts]),
            ok=np.concatenate([p.ok for p in parts]),
            image_global=np.concatenate([p.image_global for p in parts]),
            caption_global=np.concatenate([p.caption_global for p in parts]),
            caption_hash=np.concatenate([p.caption_hash for p in parts]),
            purified_own=_concat_optional([p.purified_own for p in parts]),
            image_hash=_concat_optional([p.image_hash for p in parts]),
            row_key=_concat_optional([p.row_key for p in parts]),
            image_thumb=_concat_optional([p.image_thumb for p in parts]),
        )


def _concat_optional(arrays: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The arrays concatenated, or None when any part lacks its array."""
    if any(a is None for a in arrays):
        return None
    return np.concatenate([a for a in arrays if a is not None])
