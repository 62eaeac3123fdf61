"""Small inputs of the attack tests: a digits subset and readers of what an attack wrote."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def small_digits(folder: Path, *, n: int = 120, image_size: int | None = None) -> Path:
    """The first ``n`` rows of scikit-learn's digits as a CSV manifest under ``folder``
    (images at ``image_size`` pixels, the writer's default when None)."""
    from otcclip.models.datasets import digits_manifest

    kw = {} if image_size is None else {"image_size": image_size}
    full = digits_manifest(folder, split="train", **kw)
    with full.open() as f:
        rows = list(csv.DictReader(f))[:n]
    out = full.parent / "small.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    """All rows of a CSV file as dicts."""
    with path.open() as f:
        return list(csv.DictReader(f))


def read_rgb(path: Path) -> np.ndarray:
    """An image file as an int32 array, shape (H, W, 3), so differences do not wrap."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int32)
