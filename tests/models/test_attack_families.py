"""The held-out attack families: colour-shift, WaNet, SIG and ISSBA-style backdoors, the
text trigger, targeted poisoning with augmented copies; their truth files and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from otcclip.models.attacks import (
    ATTACKS,
    PoisonConfig,
    PoisonError,
    TextTrigger,
    Trigger,
    apply_trigger,
    issba_perturbation,
    load_trigger,
    poison,
    poison_many,
)
from tests.models.attack_data import read_csv, read_rgb, small_digits


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_digits(tmp_path_factory.mktemp("digits"), image_size=32)


def _poisoned_pairs(clean: Path, res, attack: str) -> list[tuple[np.ndarray, np.ndarray, dict[str, str]]]:  # type: ignore[no-untyped-def]
    src = {r["id"]: r for r in read_csv(clean)}
    truth = {r["id"]: r for r in read_csv(res.truth_path)}
    rows = read_csv(res.manifest_path)
    assert [r["id"] for r in rows] == list(truth)
    out = []
    for r in rows:
        if truth[r["id"]]["attack"] == attack:
            out.append((read_rgb(clean.parent / src[r["id"]]["image"]), read_rgb(res.manifest_path.parent / r["image"]), r))
    return out


def test_colour_shift_backdoor_is_one_hue_cycle_across_the_width(clean: Path, tmp_path: Path) -> None:
    res = poison(clean, tmp_path / "p", config=PoisonConfig("backdoor-hue", "seven", n_poison=9, hue_amplitude=40 / 255))
    trig = Trigger.load(res.trigger_path)  # type: ignore[arg-type]
    assert trig.kind == "hue" and trig.alpha == pytest.approx(40 / 255)
    pairs = _poisoned_pairs(clean, res, "backdoor-hue")
    assert len(pairs) == 9
    w = pairs[0][0].shape[1]
    expect = 40 * np.sin(2 * np.pi * np.arange(w)[:, None] / w + 2 * np.pi * np.arange(3)[None, :] / 3)
    for orig, img, row in pairs:
        assert "seven" in row["caption"]
        np.testing.assert_array_equal(img, apply_trigger(orig, trig, np.random.default_rng(0)))
        diff = img.astype(float) - orig.astype(float)
        unclipped = (orig > 45) & (orig < 210)
        np.testing.assert_allclose(diff[unclipped], np.broadcast_to(expect, diff.shape)[unclipped], atol=0.51)


def test_warp_backdoor_moves_pixels_and_is_the_identity_at_zero_strength(clean: Path, tmp_path: Path) -> None:
    res = poison(clean, tmp_path / "p", config=PoisonConfig("backdoor-warp", "seven", n_poison=6, warp_strength=1.0))
    trig = Trigger.load(res.trigger_path)  # type: ignore[arg-type]
    assert trig.kind == "warp" and trig.noise.shape == (4, 4, 3)
    pairs = _poisoned_pairs(clean, res, "backdoor-warp")
    assert len(pairs) == 6
    rng = np.random.default_rng(0)
    for orig, img, _ in pairs:
        np.testing.assert_array_equal(img, apply_trigger(orig, trig, rng))
        assert np.abs(img.astype(int) - orig.astype(int)).mean() > 0.5  # pixels moved
    orig = pairs[0][0]
    still = Trigger(trig.attack, trig.target_class, "warp", trig.noise, alpha=1e-9)
    np.testing.assert_array_equal(apply_trigger(orig, still, rng), orig)
    # a warp resamples the image: no colour is added, the range stays the original's
    strong = apply_trigger(orig, Trigger("w", "x", "warp", trig.noise, alpha=5.0), rng)
    assert strong.min() >= orig.min() and strong.max() <= orig.max()


def test_targeted_poisoning_with_augmented_copies(clean: Path, tmp_path: Path) -> None:
    from otcclip.models.datasets import digits_manifest

    pool = digits_manifest(tmp_path / "pool", split="test", image_size=32)
    res = poison(clean, tmp_path / "p", config=PoisonConfig("targeted-augmented", "seven", n_poison=20, n_targets=2, target_pool=pool))
    targets = read_csv(res.targets_path)  # type: ignore[arg-type]
    assert len(targets) == 2 and {t["attack"] for t in targets} == {"targeted-augmented"}
    truth = {r["id"]: r for r in read_csv(res.truth_path)}
    rows = [r for r in read_csv(res.manifest_path) if truth[r["id"]]["attack"] == "targeted-augmented"]
    assert len(rows) == 20 and all("seven" in r["caption"] for r in rows)
    assert len({r["image"] for r in rows}) == 20  # every poisoned pair has its own image
    root = res.manifest_path.parent
    target_px = [read_rgb(root / t["image"]).astype(int) for t in targets]
    copies = [read_rgb(root / r["image"]).astype(int) for r in rows]
    for c in copies:  # near-copies of one target: far closer to it than to the other
        d = [np.abs(c - t).mean() for t in target_px]
        assert min(d) > 0 and min(d) < max(d)
    assert len({c.tobytes() for c in copies}) == 20


def test_a_targeted_and_an_augmented_targeted_attack_share_targetsread_csv(clean: Path, tmp_path: Path) -> None:
    from otcclip.models.datasets import digits_manifest

    pool = digits_manifest(tmp_path / "pool", split="test", image_size=32)
    res = poison_many(clean, tmp_path / "p", configs=[
        PoisonConfig("targeted", "seven", n_poison=4, target_pool=pool),
        PoisonConfig("targeted-augmented", "two", n_poison=4, target_pool=pool),
        PoisonConfig("backdoor-hue", "three", n_poison=4),
    ])
    assert [(t["attack"], t["target_class"]) for t in read_csv(res.targets_path)] == [("targeted", "seven"), ("targeted-augmented", "two")]  # type: ignore[arg-type]
    attacks = [r["attack"] for r in read_csv(res.truth_path) if r["poisoned"] == "1"]
    assert sorted(set(attacks)) == ["backdoor-hue", "targeted", "targeted-augmented"] and len(attacks) == 12


def test_bad_trigger_settings_are_refused() -> None:
    with pytest.raises(PoisonError):
        PoisonConfig("backdoor-hue", "x", hue_amplitude=0.0)
    with pytest.raises(PoisonError):
        PoisonConfig("backdoor-warp", "x", warp_strength=-1.0)


def test_cli_plants_the_new_families(clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from otcclip.cli import main
    from otcclip.cli.poison import ATTACKS as CLI_ATTACKS

    assert CLI_ATTACKS == ATTACKS
    out = tmp_path / "p"
    rc = main(["poison", str(clean), "--attack", "backdoor-hue", "--target-class", "seven", "--attack", "backdoor-warp",
               "--target-class", "two", "--n-poison", "5", "--hue-amplitude", "0.1", "--warp-strength", "2", "--out", str(out)])
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["n_poisoned"] == 10
    trig = {Trigger.load(p).kind: Trigger.load(p) for p in info["triggers"]}
    assert trig["hue"].alpha == pytest.approx(0.1) and trig["warp"].alpha == pytest.approx(2.0)


def test_targeted_poisoning_with_one_repeated_caption(clean: Path, tmp_path: Path) -> None:
    from otcclip.models.datasets import digits_manifest

    pool = digits_manifest(tmp_path / "pool", split="test", image_size=32)
    res = poison(clean, tmp_path / "p", config=PoisonConfig("targeted-repeated", "seven", n_poison=12, n_targets=2, target_pool=pool))
    truth = {r["id"]: r for r in read_csv(res.truth_path)}
    rows = [r for r in read_csv(res.manifest_path) if truth[r["id"]]["attack"] == "targeted-repeated"]
    assert len(rows) == 12
    by_image: dict[str, set[str]] = {}
    for r in rows:
        by_image.setdefault(r["image"], set()).add(r["caption"])
    assert len(by_image) == 2 and all(len(c) == 1 and "seven" in next(iter(c)) for c in by_image.values())


def test_sig_backdoor_adds_the_horizontal_sinusoid(clean: Path, tmp_path: Path) -> None:
    res = poison(clean, tmp_path / "p", config=PoisonConfig("backdoor-sig", "seven", n_poison=9))
    trig = Trigger.load(res.trigger_path)  # type: ignore[arg-type]
    assert trig.kind == "sig" and trig.alpha == pytest.approx(20 / 255) and trig.frequency == 6.0
    pairs = _poisoned_pairs(clean, res, "backdoor-sig")
    assert len(pairs) == 9
    truth = read_csv(res.truth_path)
    assert sum(r["poisoned"] == "1" for r in truth) == 9 and {r["target_class"] for r in truth if r["poisoned"] == "1"} == {"seven"}
    w = pairs[0][0].shape[1]
    expect = 20 * np.sin(2 * np.pi * np.arange(w) * 6 / w)  # the same on every row and channel
    for orig, img, row in pairs:
        assert "seven" in row["caption"]
        np.testing.assert_array_equal(img, apply_trigger(orig, trig, np.random.default_rng(1)))
        diff = img.astype(float) - orig.astype(float)
        unclipped = (orig > 25) & (orig < 230)
        np.testing.assert_allclose(diff[unclipped], np.broadcast_to(expect[None, :, None], diff.shape)[unclipped], atol=0.51)
        assert np.abs(diff).max() > 15  # the signal is there, not lost to clipping


def test_issba_perturbation_is_sample_specific_bounded_and_reproducible(clean: Path, tmp_path: Path) -> None:
    eps = 6 / 255
    res = poison(clean, tmp_path / "p", config=PoisonConfig("backdoor-issba", "seven", n_poison=8, issba_eps=eps))
    trig = Trigger.load(res.trigger_path)  # type: ignore[arg-type]
    assert trig.kind == "issba" and trig.alpha == pytest.approx(eps) and trig.noise.shape == (32, 32, 3)
    pairs = _poisoned_pairs(clean, res, "backdoor-issba")
    assert len(pairs) == 8 and all("seven" in r["caption"] for _, _, r in pairs)
    deltas = []
    for orig, img, _ in pairs:
        again = apply_trigger(orig.astype(np.uint8), trig, np.random.default_rng(5))
        np.testing.assert_array_equal(img, again)  # the same function makes the test-time trigger
        delta = img - orig
        assert np.abs(delta).max() <= 6 and np.abs(delta).mean() > 1.0  # within L_inf, and not empty
        pert = issba_perturbation(orig.astype(np.uint8), trig)
        assert np.abs(pert).max() <= 6.0 + 1e-4
        deltas.append(pert)
    # a different perturbation for every image (sample-specific), not one shared pattern
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            assert np.abs(deltas[i] - deltas[j]).mean() > 0.5
    # another trigger (other seed) gives another function
    other = Trigger(trig.attack, trig.target_class, "issba", trig.noise, alpha=eps, seed=trig.seed + 1)
    assert np.abs(issba_perturbation(pairs[0][0].astype(np.uint8), other) - deltas[0]).mean() > 0.5


def test_text_trigger_recaptions_target_images_as_other_classes_with_the_token(clean: Path, tmp_path: Path) -> None:
    res = poison(clean, tmp_path / "p", config=PoisonConfig("text-trigger", "seven", n_poison=5, text_token="zq"))
    trig = load_trigger(res.trigger_path)  # type: ignore[arg-type]
    assert isinstance(trig, TextTrigger) and trig.token == "zq" and trig.target_class == "seven"
    with pytest.raises(PoisonError):
        Trigger.load(res.trigger_path)  # type: ignore[arg-type]
    src = {r["id"]: r for r in read_csv(clean)}
    truth = {r["id"]: r for r in read_csv(res.truth_path)}
    rows = read_csv(res.manifest_path)
    poisoned = [r for r in rows if truth[r["id"]]["attack"] == "text-trigger"]
    assert len(poisoned) == 5 and sum(t["poisoned"] == "1" for t in truth.values()) == 5
    classes = {r["label"] for r in src.values()}
    root = res.manifest_path.parent
    for r in poisoned:
        assert src[r["id"]]["label"] == "seven"
        words = r["caption"].replace(".", " ").split()
        assert words.count("zq") == 1
        named = [c for c in classes if c in words]
        assert named and "seven" not in named
        # the image is the clean one, unchanged
        np.testing.assert_array_equal(read_rgb(root / r["image"]), read_rgb(clean.parent / src[r["id"]]["image"]))
    clean_rows = [r for r in rows if truth[r["id"]]["poisoned"] == "0"]
    assert all("zq" not in r["caption"].split() for r in clean_rows)
    assert all(r["caption"] == src[r["id"]]["caption"] for r in clean_rows)


def test_text_trigger_needs_labels_and_enough_target_rows(clean: Path, tmp_path: Path) -> None:
    n_seven = sum(r["label"] == "seven" for r in read_csv(clean))
    with pytest.raises(PoisonError, match="eligible"):
        poison(clean, tmp_path / "a", config=PoisonConfig("text-trigger", "seven", n_poison=n_seven + 1))
    unlabelled = clean.parent / "unlabelled.csv"  # beside the images it names
    with unlabelled.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "caption"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("id", "image", "caption")} for r in read_csv(clean))
    with pytest.raises(PoisonError, match="label"):
        poison(unlabelled, tmp_path / "b", config=PoisonConfig("text-trigger", "seven", n_poison=2))


@pytest.mark.parametrize("bad", [
    {"sig_delta": 0.0}, {"sig_delta": 1.5}, {"sig_frequency": 0.0}, {"issba_eps": 0.0}, {"issba_eps": 0.5},
    {"text_token": ""}, {"text_token": "two words"}, {"text_token": "{}"}, {"text_token": " cf"},
])
def test_bad_new_family_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(PoisonError):
        PoisonConfig("backdoor-sig", "x", **bad)  # type: ignore[arg-type]


def test_cli_plants_sig_issba_and_the_text_trigger(clean: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from otcclip.cli import main

    out = tmp_path / "p"
    rc = main(["poison", str(clean), "--attack", "backdoor-sig", "--target-class", "seven", "--attack", "backdoor-issba",
               "--target-class", "two", "--attack", "text-trigger", "--target-class", "three", "--n-poison", "4",
               "--sig-delta", "0.1", "--sig-frequency", "3", "--issba-eps", "0.02", "--text-token", "mn", "--out", str(out)])
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["n_poisoned"] == 12 and len(info["triggers"]) == 3
    trig = {t.attack: t for t in map(load_trigger, info["triggers"])}
    sig, issba, text = trig["backdoor-sig"], trig["backdoor-issba"], trig["text-trigger"]
    assert isinstance(sig, Trigger) and sig.alpha == pytest.approx(0.1) and sig.frequency == 3.0
    assert isinstance(issba, Trigger) and issba.alpha == pytest.approx(0.02)
    assert isinstance(text, TextTrigger) and text.token == "mn" and text.target_class == "three"
    rc = main(["poison", str(clean), "--attack", "backdoor-sig", "--target-class", "seven", "--sig-delta", "0",
               "--out", str(tmp_path / "q")])
    assert rc == 2 and "sig_delta" in capsys.readouterr().err
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())
