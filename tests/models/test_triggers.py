"""Trigger templates: the pattern shared by flagged images, found from noisy seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from otcclip.models.triggers import TemplateConfig, TriggerTemplate, search_template, stamp

N, S = 400, 32


def _natural(n: int, seed: int) -> torch.Tensor:
    """Smooth random images with some edges, shape (n, 3, S, S), roughly unit scale."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    x = F.interpolate(coarse, size=(S, S), mode="bicubic", align_corners=False)
    mid = F.interpolate(torch.randn(n, 3, 8, 8, generator=g), size=(S, S), mode="bilinear", align_corners=False)
    return x + 0.5 * mid + 0.05 * torch.randn(n, 3, S, S, generator=g)


def _seeds(truth: np.ndarray, n_true: int, n_false: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = np.zeros(len(truth), dtype=bool)
    s[rng.choice(np.flatnonzero(truth), n_true, replace=False)] = True
    s[rng.choice(np.flatnonzero(~truth), n_false, replace=False)] = True
    return s


def _blended(seed: int = 0) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    x = _natural(N, seed)
    truth = np.zeros(N, dtype=bool)
    truth[np.random.default_rng(seed).choice(N, 30, replace=False)] = True
    noise = torch.rand(3, S, S, generator=torch.Generator().manual_seed(99)) * 4 - 2
    x[torch.from_numpy(truth)] = 0.7 * x[torch.from_numpy(truth)] + 0.3 * noise
    return x, truth, noise


def _patched(seed: int = 0) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    x = _natural(N, seed)
    rng = np.random.default_rng(seed)
    truth = np.zeros(N, dtype=bool)
    truth[rng.choice(N, 30, replace=False)] = True
    patch = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(98)) * 4 - 2
    for i in np.flatnonzero(truth):
        y, z = rng.integers(0, S - 8 + 1, size=2)
        x[i, :, y : y + 8, z : z + 8] = patch
    return x, truth, patch


def test_a_blended_trigger_is_found_from_seeds_that_are_mostly_false_alarms() -> None:
    x, truth, _ = _blended()
    seeds = _seeds(truth, 8, 60, seed=1)  # 12 % of the seeds carry the trigger
    found = search_template(lambda i: x[i], N, seeds, kind="additive", generator=torch.Generator().manual_seed(0))
    assert found.flagged.tolist() == truth.tolist()
    assert found.template is not None and found.template.support == 30
    assert found.template.pattern.shape == (3, S, S)
    assert found.z[truth].min() > 12 > found.z[~truth].max()


def test_a_patch_at_random_positions_is_found_from_a_handful_of_seeds() -> None:
    x, truth, patch = _patched()
    seeds = _seeds(truth, 3, 80, seed=2)  # the seeds' mean matches nothing; their near-copies do
    found = search_template(lambda i: x[i], N, seeds, kind="patch", generator=torch.Generator().manual_seed(0))
    assert found.flagged.tolist() == truth.tolist()
    assert found.template is not None and found.template.pattern.shape == (3, 8, 8)
    assert torch.allclose(found.template.pattern, patch, atol=1e-5)


@pytest.mark.parametrize("kind", ["additive", "patch"])
def test_seeds_that_share_no_pattern_flag_nothing(kind: str) -> None:
    x = _natural(N, 3)
    for s in range(3):
        seeds = np.zeros(N, dtype=bool)
        seeds[np.random.default_rng(s).choice(N, 60, replace=False)] = True
        found = search_template(lambda i: x[i], N, seeds, kind=kind, generator=torch.Generator().manual_seed(s))
        assert not found.flagged.any() and found.template is None


def test_too_few_seeds_or_a_wrong_shape_or_kind() -> None:
    x, truth, _ = _blended()
    few = _seeds(truth, 3, 2, seed=0)
    assert search_template(lambda i: x[i], N, few, kind="additive").template is None
    with pytest.raises(ValueError, match="seeds must have shape"):
        search_template(lambda i: x[i], N, truth[:-1], kind="additive")
    with pytest.raises(ValueError, match="kind must be one of"):
        search_template(lambda i: x[i], N, truth, kind="stripes")
    # a stricter threshold than the trigger's match flags nothing rather than a few
    found = search_template(lambda i: x[i], N, _seeds(truth, 8, 60, seed=1), kind="additive", config=TemplateConfig(z_flag=1e6))
    assert not found.flagged.any() and found.template is None


def test_stamp_adds_or_pastes_the_template() -> None:
    x = _natural(5, 4)
    pattern = torch.randn(3, S, S)
    out = stamp(x, TriggerTemplate("additive", pattern, 10))
    assert torch.allclose(out - x, pattern.expand_as(x), atol=1e-5) and not torch.equal(out, x)
    patch = torch.randn(3, 8, 8)
    out = stamp(x, TriggerTemplate("patch", patch, 10), generator=torch.Generator().manual_seed(0))
    changed = (out != x).any(dim=1)  # (5, S, S)
    for i in range(5):
        ys, xs = torch.nonzero(changed[i], as_tuple=True)
        y0, x0 = int(ys.min()), int(xs.min())
        assert changed[i].sum() == 64 and torch.equal(out[i, :, y0 : y0 + 8, x0 : x0 + 8], patch)
    with pytest.raises(ValueError, match="does not fit"):
        stamp(x[:, :, :4, :4], TriggerTemplate("patch", patch, 10))


def test_two_triggers_of_one_kind_are_both_found() -> None:
    from otcclip.models.triggers import search_templates

    x, truth, _ = _blended()
    other = np.zeros(N, dtype=bool)
    other[np.random.default_rng(7).choice(np.flatnonzero(~truth), 30, replace=False)] = True
    noise2 = torch.rand(3, S, S, generator=torch.Generator().manual_seed(5)) * 4 - 2
    x[torch.from_numpy(other)] = 0.7 * x[torch.from_numpy(other)] + 0.3 * noise2
    seeds = _seeds(truth, 10, 40, seed=1) | _seeds(other, 10, 0, seed=2)
    found = search_templates(lambda i: x[i], N, seeds, kind="additive", generator=torch.Generator().manual_seed(0))
    # one template for both (their mean matches each), or one each
    assert 1 <= len(found) <= 2
    assert np.logical_or.reduce([f.flagged for f in found]).tolist() == (truth | other).tolist()


def test_copies_of_one_whole_image_are_not_taken_for_a_shared_trigger() -> None:
    x, truth, _ = _patched()
    # a targeted attack repeats one image: 12 copies among the seeds, besides 2 patch images
    copies = np.flatnonzero(~truth)[:12]
    x[torch.from_numpy(copies)] = x[int(copies[0])].clone()
    seeds = _seeds(truth, 2, 0, seed=4)
    seeds[copies] = True
    seeds[np.flatnonzero(~truth)[12:92]] = True
    found = search_template(lambda i: x[i], N, seeds, kind="patch", generator=torch.Generator().manual_seed(0))
    assert found.flagged.tolist() == truth.tolist()
    # the copies' windows are near-copies too, but never form a group to start from
    from otcclip.models.triggers import _near_copy_cores

    cores = _near_copy_cores(lambda i: x[i], np.flatnonzero(seeds), "patch", 8, TemplateConfig())
    assert cores and all(not set(c.tolist()) & set(copies.tolist()) for c in cores)


def test_apply_templates_drops_every_image_with_the_trigger_whatever_the_model_verdict() -> None:
    """The decide stage's template search: seeds from the trigger-sensitivity evidence of
    a weak model (a third of the patched images, many false alarms), every patched image
    dropped with reason ``trigger_template``, nothing else touched."""
    from otcclip.models.config import DecisionSettings
    from otcclip.models.decisions import MatchScores, decide_pairs
    from otcclip.models.triggers import apply_templates

    x, truth, _ = _patched(seed=3)
    rng = np.random.default_rng(3)
    own = rng.normal(0.3, 0.02, N).astype(np.float32)
    purified = np.stack([own - rng.normal(0.02, 0.01, N), own - rng.normal(0.02, 0.01, N)], axis=1)
    sensitive = np.zeros(N, dtype=bool)
    sensitive[rng.choice(np.flatnonzero(truth), 10, replace=False)] = True
    sensitive[rng.choice(np.flatnonzero(~truth), 20, replace=False)] = True
    purified[sensitive, 1] = own[sensitive] - 0.3  # the fill_local view (patch triggers)
    fused = np.stack([own, own - 0.05], axis=1)
    m = MatchScores(
        candidates=np.stack([np.arange(N), (np.arange(N) + 1) % N], axis=1).astype(np.int64),
        global_=fused, ot=fused, fused=fused, ok=np.ones(N, dtype=bool),
        image_global=rng.standard_normal((N, 16)).astype(np.float32),  # no relation: a weak model
        caption_global=rng.standard_normal((N, 16)).astype(np.float32),
        caption_hash=np.arange(N, dtype=np.int64), purified_own=purified.astype(np.float32),
    )
    st = DecisionSettings(detectors=("trigger_sensitivity",))
    d = decide_pairs(m, settings=st)
    assert d.model_quality["verdict"] == "weak" and not (d.action == "drop").any()
    out, found = apply_templates(d, lambda i: x[i], settings=st)
    assert [f.kind for f in found] == ["patch"]
    dropped = out.action == "drop"
    assert dropped.tolist() == truth.tolist()
    assert set(out.reason[dropped]) == {"trigger_template"} and (out.new_caption_index[dropped] == -1).all()
    assert all("trigger_template" in s for s in out.detectors[dropped]) and not out.review[dropped].any()
    assert out.template_z[truth].min() > 12 > out.template_z[~truth].max()
    # false alarms the template does not explain stay for review; without purified views nothing is searched
    assert out.review[sensitive & ~truth].all()
    plain = decide_pairs(MatchScores(m.candidates, fused, fused, fused, m.ok, m.image_global, m.caption_global,
                                     m.caption_hash), settings=st)
    assert apply_templates(plain, lambda i: x[i], settings=st)[1] == []


def test_a_model_that_does_not_react_to_the_trigger_still_seeds_the_search_through_mismatched_captions() -> None:
    """A model trained without the trigger (on cleaned data, or pretrained elsewhere) shows no
    trigger sensitivity on the patched images, but sees their pairs as mismatched (another
    caption beats the own one): those pairs seed the search, and every patched image is
    dropped. Without the mismatch seeds the search finds nothing."""
    from dataclasses import replace

    from otcclip.models.config import DecisionSettings
    from otcclip.models.decisions import MatchScores, decide_pairs
    from otcclip.models.triggers import apply_templates

    x, truth, _ = _patched(seed=4)
    rng = np.random.default_rng(4)
    own = rng.normal(0.3, 0.02, N).astype(np.float32)
    # the purified views change the patched images' scores least: they seed no sensitivity search
    drop = rng.normal(0.02, 0.01, (N, 2))
    drop[truth] = 0.0
    purified = own[:, None] - drop
    # half the patched pairs and 45 clean ones have a better caption than their own
    mismatched = np.zeros(N, dtype=bool)
    mismatched[rng.choice(np.flatnonzero(truth), 15, replace=False)] = True
    mismatched[rng.choice(np.flatnonzero(~truth), 45, replace=False)] = True
    alt = np.where(mismatched, own + rng.uniform(0.05, 0.1, N), own - 0.05)
    fused = np.stack([own, alt], axis=1).astype(np.float32)
    m = MatchScores(
        candidates=np.stack([np.arange(N), (np.arange(N) + 1) % N], axis=1).astype(np.int64),
        global_=fused, ot=fused, fused=fused, ok=np.ones(N, dtype=bool),
        image_global=rng.standard_normal((N, 16)).astype(np.float32),
        caption_global=rng.standard_normal((N, 16)).astype(np.float32),
        caption_hash=np.arange(N, dtype=np.int64), purified_own=purified.astype(np.float32),
    )
    st = DecisionSettings(detectors=("trigger_sensitivity",))
    d = decide_pairs(m, settings=st)
    out, found = apply_templates(d, lambda i: x[i], settings=st)
    assert [f.kind for f in found] == ["patch"]
    dropped = out.reason == "trigger_template"
    assert dropped.tolist() == truth.tolist()
    assert out.template_z[truth].min() > 12 > out.template_z[~truth].max()
    off = replace(st, template_mismatch_pool=0.0)
    assert apply_templates(decide_pairs(m, settings=off), lambda i: x[i], settings=off)[1] == []
