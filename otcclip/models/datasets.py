"""Real datasets as image-caption manifests: CIFAR-10 slices and scikit-learn's digits.

Both write image files plus a CSV manifest with columns ``id, image, caption, label``
(``image`` relative to the manifest), so every tool of the project (poison, train,
sanitize, evaluate, the service) reads them like any user upload. Captions are drawn
from varied templates so that caption token sets differ between pairs of one class.
"""

from __future__ import annotations

import csv
import random
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from otcclip.models.atomic import atomic_write
from otcclip.models.config.evaluation import ZERO_SHOT_TEMPLATES  # noqa: F401  (re-exported)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
DIGIT_CLASSES: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)

#: Caption templates for training data; ``{}`` is the class name.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a low resolution photo of the {}.",
    "a cropped photo of a {}.",
    "a photo of my {}.",
    "a good photo of the {}.",
    "a small {} in the picture.",
    "there is a {} in this image.",
    "an image showing a {}.",
    "a dark photo of the {}.",
)
DIGIT_TEMPLATES: tuple[str, ...] = (
    "a handwritten digit {}.",
    "the number {} written by hand.",
    "a scan of the digit {}.",
    "a photo of the number {}.",
    "a blurry handwritten {}.",
    "an image of the digit {}.",
)


def make_caption(label: str, rng: random.Random, *, templates: Sequence[str] = CAPTION_TEMPLATES) -> str:
    """Return a caption of class ``label`` drawn from ``templates`` with ``rng``."""
    return rng.choice(list(templates)).format(label)


def _write_manifest(rows: list[dict[str, str]], path: Path) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "image", "caption", "label"])
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)


def cifar10_manifest(
    zip_path: str | Path,
    out_dir: str | Path,
    *,
    split: str = "train",
    per_class: int = 100,
    seed: int = 0,
    offset: int = 0,
    classes: Sequence[str] = CIFAR10_CLASSES,
) -> Path:
    """Extract a class-balanced CIFAR-10 slice and write ``out_dir/manifest.csv``.

    Parameters
    ----------
    zip_path : path
        ``cifar10-jpg.zip`` (members ``cifar10/{train,test}/<class>/NNNN.jpg``).
    out_dir : path
        Receives ``images/<class>/NNNN.jpg`` and ``manifest.csv``.
    split : {"train", "test"}
    per_class : int
        Images per class (after shuffling each class's files with ``seed``).
    offset : int
        Skip this many shuffled files per class first (for disjoint slices of one split).
    classes : sequence of str
        Class names to include.

    Returns
    -------
    Path
        The manifest path; rows are shuffled; ``label`` is the class name.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    with zipfile.ZipFile(zip_path) as zf:
        by_class: dict[str, list[str]] = {c: [] for c in classes}
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[1] == split and parts[2] in by_class and parts[3].endswith(".jpg"):
                by_class[parts[2]].append(name)
        for cls in classes:
            files = sorted(by_class[cls])
            if len(files) < offset + per_class:
                raise ValueError(f"{zip_path}: only {len(files)} {split} images of class {cls!r}")
            rng.shuffle(files)
            for name in files[offset : offset + per_class]:
                rel = f"images/{cls}/{Path(name).name}"
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
                rows.append({
                    "id": f"{split}-{cls}-{Path(name).stem}",
                    "image": rel,
                    "caption": make_caption(cls, rng),
                    "label": cls,
                })
    rng.shuffle(rows)
    return _write_manifest(rows, out / "manifest.csv")


def digits_manifest(
    out_dir: str | Path,
    *,
    split: str = "train",
    test_fraction: float = 0.25,
    seed: int = 0,
    image_size: int = 16,
) -> Path:
    """Write scikit-learn's bundled handwritten digits as an image-caption dataset.

    Parameters
    ----------
    out_dir : path
        Receives ``images/NNNN.png`` and ``manifest.csv``.
    split : {"train", "test"}
        A fixed stratified split (``test_fraction``, ``seed``) of the 1,797 images.
    image_size : int
        Images are upscaled from 8x8 to this size (RGB PNG).

    Returns
    -------
    Path
        The manifest path; ``label`` is the digit's English name (``"seven"``).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    digits = load_digits()
    idx = np.arange(len(digits.target))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=digits.target)
    chosen = tr if split == "train" else te
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + (0 if split == "train" else 1))
    rows: list[dict[str, str]] = []
    for i in chosen:
        pixels = (digits.images[i] / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.Resampling.BILINEAR)
        rel = f"images/{int(i):04d}.png"
        img.convert("RGB").save(out / rel)
        label = DIGIT_CLASSES[int(digits.target[i])]
        rows.append({
            "id": f"digit-{int(i):04d}",
            "image": rel,
            "caption": make_caption(label, rng, templates=DIGIT_TEMPLATES),
            "label": label,
        })
    return _write_manifest(rows, out / "manifest.csv")
