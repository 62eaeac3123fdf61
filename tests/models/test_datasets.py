"""The dataset builders write real, readable, class-balanced caption manifests."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from otcclip.models.datasets import (
    CIFAR10_CLASSES,
    DIGIT_CLASSES,
    cifar10_manifest,
    digits_manifest,
)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.cifar
def test_cifar_slice_is_balanced_and_disjoint(cifar_zip: Path, tmp_path: Path) -> None:
    a = _rows(cifar10_manifest(cifar_zip, tmp_path / "a", per_class=3, seed=1))
    b = _rows(cifar10_manifest(cifar_zip, tmp_path / "b", per_class=3, seed=1, offset=3))
    assert Counter(r["label"] for r in a) == {c: 3 for c in CIFAR10_CLASSES}
    assert not {r["id"] for r in a} & {r["id"] for r in b}
    for r in a:
        assert r["label"] in r["caption"]
        with Image.open(tmp_path / "a" / r["image"]) as im:
            assert im.size == (32, 32)


def test_digits_split_and_captions(tmp_path: Path) -> None:
    train = _rows(digits_manifest(tmp_path / "tr", split="train"))
    test = _rows(digits_manifest(tmp_path / "te", split="test"))
    assert len(train) + len(test) == 1797
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert set(r["label"] for r in test) == set(DIGIT_CLASSES)
    r = train[0]
    assert r["label"] in r["caption"]
    with Image.open(tmp_path / "tr" / r["image"]) as im:
        assert im.mode == "RGB" and im.size == (16, 16)
