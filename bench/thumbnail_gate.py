"""The ``duplicates`` check's thumbnail gate (``near_thumbnail``), chosen and reported.

A near duplicate needs, besides the image-embedding tests, a content-thumbnail cosine
(:func:`otcclip.models.features.content_thumbnail`: grayscale, 8 x 8, centred and
normalised) of at least ``near_thumbnail``. The gate does not depend on any model, so
this benchmark needs none: it measures, per candidate value,

- on *distinct* images (every pair of different source images): the largest group the
  thumbnails alone would form (connected components of ``cosine >= value``), and how many
  groups of two or more there are. A group of ``min_size`` (8) distinct images would be
  thinned by ``keep_one``: a change to clean data;
- on *copies* (each image re-encoded, resized, lightly noised or brightened): the share of
  copies whose thumbnail cosine to the original stays at or above the value.

Development data chooses the value: the digits development slices (the training split of
seeds 0 and 1, as in ``bench/repair.py --dataset digits``) and a CIFAR-10 training slice.
The rule: the lowest candidate at which no group of distinct images reaches ``min_size``
on any development set (a lower gate keeps more copies). Report data measures it: the
digits held-out slice (seed 2) and a CIFAR-10 test slice.

Images go through the preprocessing of the model a job would use (``otc-micro``, 16 px,
for digits; ``otc-tiny``, 32 px, for CIFAR-10), as in the encode stage.

Usage::

    .venv/bin/python bench/thumbnail_gate.py [--work DIR] [--copies 200]
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ZIP = REPO.parent / "shared" / "data" / "cifar10-jpg.zip"
CANDIDATES = (0.97, 0.98, 0.985, 0.99, 0.995)
MIN_SIZE = 8  # DuplicatesSettings.min_size's default, read below and checked


def copy_kinds(rng: np.random.Generator) -> dict[str, Callable[[Image.Image], Image.Image]]:
    """The copies measured: those of ``bench/duplicates.py`` (JPEG 50/75/90, resized to
    24/40/64 px and saved as JPEG 95: :func:`duplicates.variant`) plus Gaussian noise of
    std 4/255 and a 10 % brightness gain."""

    def noise(img: Image.Image) -> Image.Image:
        a = np.asarray(img, dtype=np.float32)
        return Image.fromarray(np.clip(a + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8))

    def bright(img: Image.Image) -> Image.Image:
        return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) * 1.1, 0, 255).astype(np.uint8))

    from duplicates import VARIANTS, variant  # bench/duplicates.py: the same copies there

    kinds: dict[str, Callable[[Image.Image], Image.Image]] = {
        f"{kind}{arg}": lambda im, kind=kind, arg=arg: Image.open(io.BytesIO(variant(im, kind, arg))).convert("RGB")
        for kind, arg in VARIANTS
    }
    kinds["noise4"] = noise
    kinds["bright10"] = bright
    return kinds


def thumbnails(images: list[Image.Image], preprocess: Callable[[Image.Image], torch.Tensor]) -> np.ndarray:
    """(N, 64) float32 content thumbnails, stored as float16 as the encode stage does."""
    from otcclip.models.features import content_thumbnail

    x = torch.stack([preprocess(im) for im in images])
    return content_thumbnail(x).to(torch.float16).float().numpy()


def largest_groups(t: np.ndarray, values: tuple[float, ...]) -> list[tuple[int, int]]:
    """Per value: (largest group, groups of >= 2) of the thumbnails' ``cosine >= value`` graph."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    s = t @ t.T
    np.fill_diagonal(s, 0.0)
    out = []
    for v in values:
        _, label = connected_components(csr_matrix(s >= v), directed=False)
        sizes = np.bincount(label)
        out.append((int(sizes.max()), int((sizes >= 2).sum())))
    return out


def load(manifest: Path) -> list[Image.Image]:
    with manifest.open() as f:
        return [Image.open(manifest.parent / r["image"]).convert("RGB") for r in csv.DictReader(f)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/otcclip-thumbnail-gate"))
    ap.add_argument("--copies", type=int, default=200, help="images copied per set and kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from otcclip.models.config.detectors import DuplicatesSettings
    from otcclip.models.datasets import cifar10_manifest, digits_manifest
    from otcclip.models.factory import create_model

    if DuplicatesSettings().min_size != MIN_SIZE:
        raise SystemExit(f"min_size is {DuplicatesSettings().min_size}: update MIN_SIZE and the rule")
    if not ZIP.exists():
        raise SystemExit(f"skipped: {ZIP} is missing (CIFAR-10 JPEGs from ../shared)")
    t0 = time.perf_counter()
    digits_pp = create_model("otc-micro").preprocess
    cifar_pp = create_model("otc-tiny").preprocess
    sets = [
        ("development", "digits seed 0 (train)", digits_manifest(args.work / "d0", split="train", seed=0), digits_pp),
        ("development", "digits seed 1 (train)", digits_manifest(args.work / "d1", split="train", seed=1), digits_pp),
        ("development", "CIFAR-10 train, 3,000",
         cifar10_manifest(ZIP, args.work / "ctrain", split="train", per_class=300, seed=args.seed), cifar_pp),
        ("report", "digits seed 2 (train)", digits_manifest(args.work / "d2", split="train", seed=2), digits_pp),
        ("report", "CIFAR-10 test, 3,000",
         cifar10_manifest(ZIP, args.work / "ctest", split="test", per_class=300, seed=args.seed), cifar_pp),
    ]
    rng = np.random.default_rng(args.seed)
    kinds = copy_kinds(rng)
    head = " | ".join(f"{v}" for v in CANDIDATES)
    print("# distinct images: largest thumbnail group (groups of >= 2) at each candidate value\n")
    print(f"| role | set | images | {head} |")
    print("|---|---|---|" + "---|" * len(CANDIDATES))
    largest: dict[str, list[int]] = {}
    copy_rows = []
    for role, name, man, pp in sets:
        images = load(man)
        t = thumbnails(images, pp)
        groups = largest_groups(t, CANDIDATES)
        largest[name] = [g for g, _ in groups]
        cells = " | ".join(f"{g} ({m})" for g, m in groups)
        print(f"| {role} | {name} | {len(images)} | {cells} |")
        sub = images[: args.copies]
        base = t[: len(sub)]
        for kind, fn in kinds.items():
            c = thumbnails([fn(im) for im in sub], pp)
            cos = (c * base).sum(axis=1)
            copy_rows.append((role, name, kind, cos))
    dev = [name for role, name, _, _ in sets if role == "development"]
    ok = [v for i, v in enumerate(CANDIDATES) if all(largest[n][i] < MIN_SIZE for n in dev)]
    chosen = min(ok) if ok else None
    print(f"\n# copies: share with thumbnail cosine >= each value (min cosine), {args.copies} images per set\n")
    print(f"| role | set | copy | {head} | min |")
    print("|---|---|---|" + "---|" * len(CANDIDATES) + "---|")
    for role, name, kind, cos in copy_rows:
        cells = " | ".join(f"{100 * float((cos >= v).mean()):.1f}" for v in CANDIDATES)
        print(f"| {role} | {name} | {kind} | {cells} | {cos.min():.4f} |")
    print(f"\nrule: the lowest value at which no development set forms a group of >= {MIN_SIZE} distinct images: "
          f"{chosen} (default near_thumbnail {DuplicatesSettings().near_thumbnail})")
    print(f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
