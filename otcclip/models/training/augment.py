"""Batched augmentations on uint8 image tensors and caption word edits.

All randomness comes from an explicit ``torch.Generator`` / ``random.Random`` so a
training run is reproducible from its seed and epoch (resume needs no RNG state).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> float normalised with ``mean``/``std`` (0..1 scale)."""
    x = images.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def augment_images(images: torch.Tensor, gen: torch.Generator, *, pad_frac: float = 0.125) -> torch.Tensor:
    """Random crop with reflect padding plus horizontal flip, per image.

    Parameters
    ----------
    images : Tensor, shape (N, 3, S, S), float (already normalised) or uint8
    gen : torch.Generator (CPU)

    Returns
    -------
    Tensor, shape (N, 3, S, S), same dtype as the input (float for uint8 input).
    """
    x = images.float() if images.dtype == torch.uint8 else images
    n, _, h, w = x.shape
    if n == 0:
        return x
    pad = max(1, int(round(h * pad_frac)))
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    rows = (oy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (n, h)
    cols = (ox[:, None] + torch.arange(w)[None, :]).to(x.device)  # (n, w)
    cols = torch.where(flip.to(x.device)[:, None], cols.flip(1), cols)
    bidx = torch.arange(n, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # (n, h, w, 3)
    return out.permute(0, 3, 1, 2).contiguous()


def augment_caption(text: str, rng: random.Random, *, p_delete: float = 0.15, n_swap: int = 1) -> str:
    """Random word deletion and swap (EDA-style); never returns an empty caption."""
    words = text.split()
    if len(words) <= 1:
        return text
    kept = [w for w in words if rng.random() >= p_delete] or [rng.choice(words)]
    for _ in range(n_swap):
        if len(kept) >= 2:
            i, j = rng.sample(range(len(kept)), 2)
            kept[i], kept[j] = kept[j], kept[i]
    return " ".join(kept)
