"""What the match stage hands to the decision stage: the shortlist scores of every pair."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from otcclip.models.spill import empty as spill_empty


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

    def narrow(self) -> MatchScores:
        """The same pairs with two candidate columns: the own caption (column 0) and the
        best-scored one (column 1; the own caption again where it scores best).

        The decisions read no other column: :func:`~otcclip.models.decisions.decide_pairs`
        takes the own column and the column of the largest fused score (the first such,
        ``-1`` candidates and non-finite scores counting as ``-inf``), and narrowing
        keeps both, so it decides every pair as on the full arrays. (N, K) -> (N, 2).
        """
        if self.candidates.shape[1] <= 2:
            return self
        n = len(self)
        fused = np.where(self.candidates >= 0, self.fused, -np.inf)
        best = np.argmax(np.where(np.isfinite(fused), fused, -np.inf), axis=1)
        cols = np.stack([np.zeros(n, dtype=best.dtype), best], axis=1)
        return replace(self, **{k: np.take_along_axis(getattr(self, k), cols, axis=1)
                                for k in ("candidates", "global_", "ot", "fused")})

    @staticmethod
    def concat(parts: Sequence[MatchScores]) -> MatchScores:
        """Concatenate row blocks (candidate columns padded with -1 / NaN; an optional
        array that a block lacks is None in the result): :meth:`stack` of all of them."""
        return MatchScores.stack(iter(parts), sum(len(p) for p in parts))

    @staticmethod
    def stack(parts: Iterable[MatchScores], n: int, *, spill: str | Path | None = None) -> MatchScores:
        """:meth:`concat` of row blocks that together hold ``n`` rows, holding one block at
        a time besides the result (``parts`` may load each block lazily).

        With ``spill`` (a directory), every array of the result is a memory-mapped
        ``.npy`` file there (:func:`otcclip.models.spill.empty`), so the result holds
        nothing per pair in RAM (a wider block still pads in RAM).

        Raises
        ------
        ValueError
            No blocks, or blocks that do not add up to ``n`` rows.
        """
        out: dict[str, np.ndarray | None] = {}
        fill = {"candidates": -1, "global_": np.nan, "ot": np.nan, "fused": np.nan}
        pos = 0
        for p in parts:
            rows = len(p)
            if pos + rows > n:
                raise ValueError(f"score blocks hold more than {n} rows")
            for f in fields(MatchScores):
                a = getattr(p, f.name)
                if a is None or (f.name in out and out[f.name] is None):
                    out[f.name] = None  # a block lacks it: so does the result
                    continue
                r = out.get(f.name)
                if r is None:
                    r = spill_empty(spill, (n, *a.shape[1:]), a.dtype)
                    if f.name in fill:
                        r[:pos] = fill[f.name]
                elif a.ndim == 2 and a.shape[1] > r.shape[1]:  # a wider block: pad what came before
                    r = np.pad(r, ((0, 0), (0, a.shape[1] - r.shape[1])), constant_values=fill[f.name])
                if r.dtype != np.result_type(r.dtype, a.dtype):
                    r = r.astype(np.result_type(r.dtype, a.dtype))
                if a.ndim == 2 and a.shape[1] < r.shape[1]:
                    r[pos : pos + rows, a.shape[1] :] = fill[f.name]
                    r[pos : pos + rows, : a.shape[1]] = a
                else:
                    r[pos : pos + rows] = a
                out[f.name] = r
            pos += rows
        if pos == 0:
            raise ValueError("no score shards to concatenate")
        if pos != n:
            raise ValueError(f"score blocks hold {pos} rows, expected {n}")
        return MatchScores(**out)  # type: ignore[arg-type]


