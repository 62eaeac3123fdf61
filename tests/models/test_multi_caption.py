"""Multi-caption (COCO-style) data: each image on several rows, each with its own correct
caption. Neither ``image_burst`` nor ``duplicates`` may take those for an attack; a
targeted attack (one image under many more captions) in such a set is still caught."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from otcclip.models.config import ImageBurstSettings, OTSettings
from otcclip.models.config.detectors import DecisionSettings
from otcclip.models.decisions import MatchScores
from otcclip.models.detectors import detect_image_burst, typical_pairs_per_image
from otcclip.models.manifest import read_manifest
from otcclip.models.sanitize import SanitizeConfig, sanitize

CLASSES = ("cat", "dog", "ship", "truck")
STYLES = ("a photo of a {}.", "a {} in the picture.", "there is a {} here.", "a close-up of the {}.",
          "an image showing a {}.", "a blurry {}.", "my {}.", "a bright photo of the {}.", "a small {}.",
          "the {} seen from afar.", "a good picture of a {}.", "a dark photo of a {}.")
PER_IMAGE = 5
N_IMAGES = 40
N_POISON = 25


def _scores(n_images: int, per_image: int, burst: int = 0, burst_texts: int = 12) -> MatchScores:
    """Image globals and hashes of ``n_images`` distinct images, each on ``per_image`` rows
    with distinct caption texts; then ``burst`` rows of one more image with ``burst_texts``
    distinct texts (a targeted attack)."""
    rng = np.random.default_rng(0)
    img = rng.standard_normal((n_images + 1, 16)).astype(np.float32)
    image_of = np.r_[np.repeat(np.arange(n_images), per_image), np.full(burst, n_images)]
    texts = np.r_[np.arange(n_images * per_image), 10**6 + np.arange(burst) % burst_texts]
    n = len(image_of)
    fused = np.zeros((n, 1), dtype=np.float32)
    return MatchScores(candidates=np.arange(n)[:, None], global_=fused, ot=fused, fused=fused,
                       ok=np.ones(n, dtype=bool), image_global=img[image_of], caption_global=img[image_of],
                       caption_hash=texts.astype(np.int64), image_hash=(image_of + 7).astype(np.int64))


def test_image_burst_is_relative_to_the_typical_captions_per_image() -> None:
    m = _scores(60, PER_IMAGE)
    assert typical_pairs_per_image(m) == PER_IMAGE
    assert not detect_image_burst(m, ImageBurstSettings()).any()  # 5 correct captions per image: no burst
    attacked = _scores(60, PER_IMAGE, burst=40)
    flags = detect_image_burst(attacked, ImageBurstSettings())
    assert flags[-40:].all() and not flags[:-40].any()
    # the data's typical count sets the bar (more than twice it), burst_min stays the floor
    few = _scores(60, PER_IMAGE, burst=40, burst_texts=2 * PER_IMAGE)
    assert not detect_image_burst(few, ImageBurstSettings()).any()
    assert detect_image_burst(few, ImageBurstSettings(typical_ratio=1.0))[-40:].all()
    single = _scores(60, 1, burst=8, burst_texts=ImageBurstSettings().burst_min)
    assert typical_pairs_per_image(single) == 1 and detect_image_burst(single, ImageBurstSettings())[-8:].all()


def _image(i: int) -> bytes:
    rng = np.random.default_rng(3000 + i)
    img = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``N_IMAGES`` images, each on ``PER_IMAGE`` rows with distinct captions of its class,
    and a targeted attack: one unseen image on ``N_POISON`` rows captioned as another class."""
    root = tmp_path_factory.mktemp("coco")
    (root / "img").mkdir()
    rows = []
    for i in range(N_IMAGES + 1):
        (root / "img" / f"{i:03d}.png").write_bytes(_image(i))
    for i in range(N_IMAGES):
        for j in range(PER_IMAGE):
            style = STYLES[(i + j) % len(STYLES)]
            rows.append((f"c{i}-{j}", f"img/{i:03d}.png", style.format(CLASSES[i % len(CLASSES)])))
    for j in range(N_POISON):
        rows.append((f"poison{j}", f"img/{N_IMAGES:03d}.png", STYLES[j % len(STYLES)].format("airplane")))
    out = root / "m.csv"
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "caption"])
        w.writerows(rows)
    return out


def test_sanitize_leaves_clean_multi_caption_pairs_and_drops_the_attack(coco_like: Path, tiny_bundle) -> None:
    man = read_manifest(coco_like)
    cfg = SanitizeConfig(k=4, batch_size=32, shard_size=128, device="cpu", ot=OTSettings(iters=20),
                         decisions=DecisionSettings(min_quality_pairs=20))
    d = sanitize(man, tiny_bundle, config=cfg).decisions
    poison = np.array([i.startswith("poison") for i in man.ids])
    # an untrained model is weak: only image_burst (and exact copies) may act on their own
    assert (d.action[~poison] == "keep").all(), sorted(set(zip(d.action[~poison], d.reason[~poison], strict=True)))
    assert (d.action[poison] == "drop").all() and set(d.reason[poison]) == {"image_burst"}
    # the images' rows are still reported as groups of repeated images, but kept whole and
    # not flagged: the review table lists the attack, not every clean pair
    assert (d.dup_group[~poison] >= 0).all()
    assert not any("duplicates" in str(s) for s in d.detectors[~poison])
    assert all("duplicates" in str(s) for s in d.detectors[poison])
