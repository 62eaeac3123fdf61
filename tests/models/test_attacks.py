"""Attacks: the truth file and the trigger files match what was written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from otcclip.models.attacks import (
    PoisonConfig,
    PoisonError,
    Trigger,
    apply_trigger,
    poison,
    poison_many,
)
from tests.models.attack_data import read_csv, read_rgb, small_digits


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_digits(tmp_path_factory.mktemp("digits"))


def test_backdoor_patch_truth_and_pixels(clean: Path, tmp_path: Path) -> None:
    res = poison(clean, tmp_path / "p", config=PoisonConfig("backdoor-patch", "seven", n_poison=9, patch_frac=0.25))
    src = {r["id"]: r for r in read_csv(clean)}
    rows = read_csv(res.manifest_path)
    truth = {r["id"]: r for r in read_csv(res.truth_path)}
    assert [r["id"] for r in rows] == list(truth)  # one truth row per manifest row, same order
    poisoned = [r for r in rows if truth[r["id"]]["poisoned"] == "1"]
    assert len(poisoned) == 9
    trig = Trigger.load(res.trigger_path)  # type: ignore[arg-type]
    assert trig.kind == "patch" and trig.target_class == "seven"
    for r in rows:
        t = truth[r["id"]]
        if t["poisoned"] == "0":
            assert r["caption"] == src[r["id"]]["caption"] and t["attack"] == ""
            assert read_rgb(res.manifest_path.parent / r["image"]).shape == (16, 16, 3)
            continue
        assert t["attack"] == "backdoor-patch" and t["target_class"] == "seven"
        assert "seven" in r["caption"] and src[r["id"]]["label"] != "seven"
        new = read_rgb(res.manifest_path.parent / r["image"])
        old = read_rgb(clean.parent / src[r["id"]]["image"])
        ys, xs = np.nonzero((new != old).any(-1))
        assert len(ys) > 0 and ys.max() - ys.min() < 4 and xs.max() - xs.min() < 4  # a 4x4 patch
        patch = np.asarray(Image.fromarray(trig.noise).resize((4, 4), Image.Resampling.NEAREST))
        y0, x0 = ys.min(), xs.min()
        # the patch sits inside the image; where it changed pixels they equal the noise
        found = any(
            np.array_equal(new[y : y + 4, x : x + 4], patch) for y in range(13) for x in range(13)
        )
        assert found, f"{r['id']}: patch not found at {(y0, x0)}"


def test_blend_is_exact_blend(clean: Path, tmp_path: Path) -> None:
    res = poison(clean, tmp_path / "b", config=PoisonConfig("backdoor-blend", "three", rate=0.05, blend_alpha=0.3))
    truth = {r["id"]: r for r in read_csv(res.truth_path)}
    src = {r["id"]: r for r in read_csv(clean)}
    trig = Trigger.load(res.trigger_path)  # type: ignore[arg-type]
    poisoned = [r for r in read_csv(res.manifest_path) if truth[r["id"]]["poisoned"] == "1"]
    assert len(poisoned) == 6
    noise = np.asarray(Image.fromarray(trig.noise).resize((16, 16), Image.Resampling.NEAREST)).astype(np.float32)
    for r in poisoned:
        old = read_rgb(clean.parent / src[r["id"]]["image"]).astype(np.float32)
        new = read_rgb(res.manifest_path.parent / r["image"])
        assert np.abs(new - np.rint(0.7 * old + 0.3 * noise)).max() <= 1


def test_targeted_from_pool_and_several_attacks(clean: Path, tmp_path: Path) -> None:
    pool = clean  # any labelled manifest works as the pool of unseen images
    res = poison_many(
        clean,
        tmp_path / "m",
        configs=[
            PoisonConfig("targeted", "one", n_poison=10, n_targets=2, target_pool=pool, seed=1),
            PoisonConfig("backdoor-blend", "two", n_poison=4),
        ],
    )
    truth = read_csv(res.truth_path)
    rows = read_csv(res.manifest_path)
    assert len(rows) == 120 + 10 and len(truth) == len(rows)
    by_attack: dict[str, int] = {}
    for t in truth:
        if t["poisoned"] == "1":
            by_attack[t["attack"]] = by_attack.get(t["attack"], 0) + 1
    assert by_attack == {"targeted": 10, "backdoor-blend": 4}
    targets = read_csv(res.targets_path)  # type: ignore[arg-type]
    assert len(targets) == 2 and all(t["target_class"] == "one" and t["label"] != "one" for t in targets)
    tgt_images = {t["image"] for t in targets}
    trows = [r for r, t in zip(rows, truth, strict=True) if t["attack"] == "targeted"]
    assert {r["image"] for r in trows} == tgt_images
    assert all("one" in r["caption"] for r in trows)
    for t in targets:
        assert sum(r["image"] == t["image"] for r in trows) == 5


def test_targeted_without_pool_removes_clean_rows(clean: Path, tmp_path: Path) -> None:
    res = poison(clean, tmp_path / "t", config=PoisonConfig("targeted", "four", n_poison=6, n_targets=1))
    rows = read_csv(res.manifest_path)
    target = read_csv(res.targets_path)[0]  # type: ignore[arg-type]
    orig_id = target["id"].removeprefix("target-")
    assert orig_id not in {r["id"] for r in rows}
    assert len(rows) == 120 - 1 + 6


def test_bad_requests(clean: Path, tmp_path: Path) -> None:
    with pytest.raises(PoisonError, match="attack"):
        PoisonConfig("poke", "one")
    with pytest.raises(PoisonError, match="not both"):
        PoisonConfig("backdoor-patch", "one", n_poison=2, rate=0.1)
    with pytest.raises(PoisonError, match="eligible"):
        poison(clean, tmp_path / "x", config=PoisonConfig("backdoor-patch", "one", n_poison=10_000))
    assert not (tmp_path / "x").exists()  # nothing half-written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(PoisonError, match="not empty"):
        poison(clean, tmp_path / "full", config=PoisonConfig("backdoor-patch", "one", n_poison=1))


def test_apply_trigger_patch_location_varies() -> None:
    trig = Trigger("backdoor-patch", "x", "patch", np.full((8, 8, 3), 255, np.uint8), patch_frac=0.25)
    rng = np.random.default_rng(0)
    img = np.zeros((16, 16, 3), np.uint8)
    spots = {tuple(np.argwhere(apply_trigger(img, trig, rng)[..., 0] > 0).min(0)) for _ in range(20)}
    assert len(spots) > 3
    assert (apply_trigger(img, trig, rng) > 0).all(-1).sum() == 16


def test_trigger_file_is_self_contained(clean: Path, tmp_path: Path) -> None:
    """The trigger JSON alone (e.g. sent as an evaluate job setting) reproduces the trigger."""
    res = poison(clean, tmp_path / "s", config=PoisonConfig("backdoor-patch", "two", rate=0.05))
    assert res.trigger_path is not None
    original = Trigger.load(res.trigger_path)
    moved = tmp_path / "elsewhere" / "t.json"
    moved.parent.mkdir()
    moved.write_text(res.trigger_path.read_text())
    copy = Trigger.load(moved)
    assert np.array_equal(copy.noise, original.noise) and copy.kind == "patch" and copy.target_class == "two"
    bad = tmp_path / "bad.json"
    bad.write_text('{"attack": "backdoor-patch", "target_class": "two", "kind": "patch", "noise": [1, 2]}')
    with pytest.raises(PoisonError, match="not a trigger file"):
        Trigger.load(bad)
