"""OTCCLIP's trainer policy on the engine's decisions and its per-pair state between passes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from otcclip.models.training.config import TrainConfig
from otcclip.models.training.defences import Context
from otcclip.models.training.otcclip_defence import OtcClip
from otcclip.models.training.verdicts import (
    PassState,
    Verdicts,
    apply_policy,
    apply_templates,
    purified_rematch,
    release_explained,
)
from otcclip.models.triggers import TriggerTemplate


def _otcclip(n: int, **config: object) -> OtcClip:
    ctx = Context(
        model=None, tokenizer=None, config=TrainConfig(defence="otcclip", **config), images=None,  # type: ignore[arg-type]
        captions=[f"c{i}" for i in range(n)], ids=[str(i) for i in range(n)],
        tokens=torch.zeros(n, 4, dtype=torch.long), mean=(0.0,), std=(1.0,),
        device=torch.device("cpu"), run_dir=Path("."),
    )
    return OtcClip(ctx)


def _state(n: int, *, quarantine: tuple[int, ...] = (), triggered: tuple[int, ...] = (), views: dict[int, int] | None = None) -> PassState:
    """A pass state with the given rows quarantined / triggered and trigger views set."""
    q, t, v = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), torch.full((n,), -1)
    q[list(quarantine)] = True
    t[list(triggered)] = True
    for i, view in (views or {}).items():
        v[i] = view
    return PassState(q, t, v)


_KEEP_TOP = TrainConfig().purified_keep_top


def test_triggered_pairs_are_rematched_through_their_purified_view() -> None:
    e = torch.eye(4)
    # captions 0,1: class A; 2: class B; 3: dropped; 4,5: the trigger's target class T
    captions = torch.stack([e[0], e[0], e[1], e[2], e[3], e[3]])
    state = _state(6, triggered=(4, 5))
    # view 0 still shows the trigger (close to T), view 1 shows the content
    purified = torch.stack([
        torch.stack([e[3], e[3]]) for _ in range(6)
    ])  # (6, 2, 4)
    purified[4, 1] = e[1] + 0.1 * e[3]  # content: class B
    purified[5, 0] = e[0]  # the view that removed the trigger is 0 here: class A
    view = np.array([-1, -1, -1, -1, 1, 0])
    verdicts = Verdicts.of(
        ["keep", "keep", "keep", "drop", "drop", "keep"], [0, 1, 2, -1, -1, 5],
        ["own_best", "own_best", "own_best", "no_plausible_caption", "trigger_sensitivity", "clean_score"], [""] * 6,
    )
    out = purified_rematch(verdicts, state, purified, captions, view, keep_top=_KEEP_TOP)
    action, new_idx, reasons = out.action.tolist(), out.new_caption_index, out.reason.tolist()
    assert action == ["keep", "keep", "keep", "drop", "reassign", "reassign"]
    assert new_idx[4] == 2  # class B, never the trigger's captions 4/5 or the dropped 3
    assert new_idx[5] in (0, 1)
    # freshly flagged keeps its reason; flagged earlier and not now reads "quarantined"
    assert reasons[4] == "trigger_sensitivity" and reasons[5] == "quarantined"


def test_triggered_state_survives_a_checkpoint() -> None:
    d = _otcclip(3)
    d.state = _state(3, triggered=(1,), views={1: 1}, quarantine=(2,))
    e = _otcclip(3)
    e.load_state_dict(d.state_dict())
    assert e.triggered.tolist() == [False, True, False] and e.quarantine.tolist() == [False, False, True]
    assert e.trigger_view.tolist() == [-1, 1, -1]
    # every key is required: a checkpoint without the pass state is refused
    for key in ("quarantine", "triggered", "trigger_view", "templates"):
        with pytest.raises(KeyError, match=key):
            _otcclip(3).load_state_dict({k: v for k, v in d.state_dict().items() if k != key})
    # the first pass's call on the restart travels too; older checkpoints, without it, restarted
    d.skip_restart = True
    e.load_state_dict(d.state_dict())
    assert e.skip_restart and e.restart_epoch() is None
    e.load_state_dict({k: v for k, v in d.state_dict().items() if k != "skip_restart"})
    assert not e.skip_restart and e.restart_epoch() == e.ctx.config.warmup_epochs


def test_the_first_pass_skips_the_restart_only_when_nothing_is_to_be_forgotten() -> None:
    assert _otcclip(3).restart_epoch() == 1  # planned until the first pass decides
    d = _otcclip(3)
    d.call_restart(changed=False)
    assert d.skip_restart and d.restart_epoch() is None
    d.call_restart(changed=True)
    assert not d.skip_restart and d.restart_epoch() == 1
    t = _otcclip(3)
    t.templates = [TriggerTemplate("patch", torch.zeros(3, 4, 4), 5)]
    t.call_restart(changed=False)
    assert not t.skip_restart  # a found trigger was learnt by the warm-up model
    g = _otcclip(3)
    g.state = _state(3, triggered=(1,), views={1: 0})
    g.call_restart(changed=False)
    assert not g.skip_restart
    a = _otcclip(3, restart_unchanged=True)
    a.call_restart(changed=False)
    assert not a.skip_restart and a.restart_epoch() == 1


def test_a_flagged_pair_whose_purified_view_still_fits_its_caption_keeps_it() -> None:
    e = torch.eye(3)
    captions = torch.stack([e[0], e[0], e[1], e[2], e[0]])  # pair 4 (flagged) is captioned class A
    purified = torch.stack([torch.stack([e[2], e[2]]) for _ in range(5)])
    purified[4, 0] = e[0]  # with the trigger filtered out the image still shows class A
    verdicts = Verdicts.of(["keep"] * 4 + ["drop"], [0, 1, 2, 3, -1], ["own_best"] * 4 + ["trigger_sensitivity"], [""] * 5)
    out = purified_rematch(verdicts, _state(5, triggered=(4,)), purified, captions, np.array([-1, -1, -1, -1, 0]), keep_top=_KEEP_TOP)
    assert out.action[4] == "keep" and out.new_caption_index[4] == 4 and out.reason[4] == "purified_supports_own"


def _verdicts(d: OtcClip, rows: list[tuple[str, int, str, str]], purified: bool = True) -> tuple[list[str], list[int], list[str]]:
    """One pass of the policy on ``(action, new row, reason, flags)`` rows; ``d.state`` follows."""
    verdicts = Verdicts.of([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    out, d.state = apply_policy(verdicts, d.state, d.ctx.config, purified_views=purified)
    return out.action.tolist(), out.new_caption_index.tolist(), out.reason.tolist()


def test_detector_verdicts_win_and_score_decisions_are_ignored_by_default() -> None:
    rows = [
        ("keep", 0, "own_best", ""),
        ("reassign", 5, "low_own_score", ""),  # score-based: ignored while training
        ("reassign", 6, "low_own_score", "image_burst"),  # a burst is dropped whatever the score says
        ("keep", 3, "clean_score", "image_burst"),  # even when the engine would keep it
        ("drop", -1, "trigger_sensitivity", "trigger_sensitivity"),
        ("drop", -1, "trigger_sensitivity", "image_burst,trigger_sensitivity"),  # the burst wins
    ]
    d = _otcclip(6, purified_rematch=True)
    action, new_idx, reasons = _verdicts(d, rows)
    assert action == ["keep", "keep", "drop", "drop", "drop", "drop"]
    assert new_idx[:4] == [0, 1, -1, -1]
    assert reasons == ["own_best", "score_ignored", "image_burst", "image_burst", "trigger_sensitivity", "image_burst"]
    assert d.quarantine.tolist() == [False, False, True, True, False, True]
    assert d.triggered.tolist() == [False, False, False, False, True, False]
    # the next pass: quarantined pairs stay out although the engine now keeps them
    action, _, reasons = _verdicts(d, [("keep", i, "clean_score", "") for i in range(6)])
    assert action == ["keep", "keep", "drop", "drop", "keep", "drop"] and reasons[2] == "quarantined"
    assert d.triggered[4]  # still re-matched through its purified view (by purified_rematch)
    # by default a trigger flag is a drop for good, like an image burst
    e = _otcclip(6)
    action, _, reasons = _verdicts(e, rows)
    assert e.quarantine.tolist() == [False, False, True, True, True, True] and not e.triggered.any()
    action, _, reasons = _verdicts(e, [("keep", i, "clean_score", "") for i in range(6)])
    assert action == ["keep", "keep", "drop", "drop", "drop", "drop"] and reasons[4] == "quarantined"


def test_score_rematch_applies_the_engine_decisions() -> None:
    d = _otcclip(2, score_rematch=True)
    action, new_idx, reasons = _verdicts(d, [("reassign", 1, "low_own_score", ""), ("keep", 1, "own_best", "")])
    assert action == ["reassign", "keep"] and new_idx == [1, 1] and reasons[0] == "low_own_score"
    # without purified views a trigger flag is a sticky drop
    e = _otcclip(1)
    action, _, _ = _verdicts(e, [("drop", -1, "trigger_sensitivity", "trigger_sensitivity")], purified=False)
    assert action == ["drop"] and e.quarantine[0] and not e.triggered[0]


def test_unlearning_covers_quarantine_and_optionally_rematched_triggered_pairs() -> None:
    for on in (False, True):
        d = _otcclip(5, unlearn_triggered=on)
        d.state = _state(5, quarantine=(0,), triggered=(1, 2))
        d.match = torch.tensor([0, 3, 2, 3, 4])  # 1 re-matched through its view, 2 kept its own
        got = d.unlearn_rows(torch.tensor([4, 2, 1, 0])).tolist()
        assert got == [False, False, on, True]


def test_fill_batch_tops_up_dropped_slots_with_kept_pairs_from_outside_the_batch() -> None:
    d = _otcclip(12)
    d.ctx.images = SimpleNamespace(trainable=torch.tensor([True] * 11 + [False]))  # type: ignore[assignment]
    d.active[[1, 2, 7]] = False
    idx = torch.tensor([0, 1, 2, 3])
    for seed in range(5):
        out = d.fill_batch(idx, torch.Generator().manual_seed(seed))
        assert out[:4].tolist() == idx.tolist() and out.numel() == 6
        extra = set(out[4:].tolist())
        # two kept, readable rows that were not in the batch, no repeats
        assert len(extra) == 2 and extra <= {4, 5, 6, 8, 9, 10}
    assert d.fill_batch(torch.tensor([0, 3]), torch.Generator()).tolist() == [0, 3]
    off = _otcclip(12, fill_batches=False)
    off.active[1] = False
    assert off.fill_batch(idx, torch.Generator()).tolist() == idx.tolist()


def test_cap_dropped_keeps_every_kept_pair_and_at_most_the_share_of_dropped_ones() -> None:
    d = _otcclip(40, dropped_share=0.25)
    d.active[torch.arange(0, 40, 2)] = False  # every even row is dropped
    idx = torch.arange(0, 16)  # 8 dropped, 8 kept
    seen: set[int] = set()
    for seed in range(20):
        out = d.cap_dropped(idx, 16, torch.Generator().manual_seed(seed))
        kept, gone = out[d.active[out]], out[~d.active[out]]
        assert kept.tolist() == list(range(1, 16, 2))  # all kept pairs, in order
        assert gone.numel() == 4 and set(gone.tolist()) <= set(range(0, 16, 2))  # 0.25 * 16
        seen |= set(gone.tolist())
    assert seen == set(range(0, 16, 2))  # a random subset: every dropped pair gets its turn
    # the share is of the loop's batch size, not of the refilled batch
    assert (~d.active[d.cap_dropped(idx, 8, torch.Generator())]).sum() == 2
    # at the default share, or under the cap, the batch is unchanged
    assert torch.equal(_otcclip(40).cap_dropped(idx, 16, torch.Generator()), idx)
    assert torch.equal(d.cap_dropped(torch.tensor([0, 1, 3, 5]), 16, torch.Generator()), torch.tensor([0, 1, 3, 5]))
    # a small batch keeps one (the share rounds up), share 0 none
    assert (~d.active[d.cap_dropped(idx, 2, torch.Generator())]).sum() == 1
    # share 0: no dropped pair trains
    none = _otcclip(40, dropped_share=0.0)
    none.active[torch.arange(0, 40, 2)] = False
    assert none.cap_dropped(idx, 16, torch.Generator()).tolist() == list(range(1, 16, 2))


class _Pixels:
    """Images of a run as the trainer's ImageSource serves them: ``source[idx] -> (pixels, ok)``."""

    def __init__(self, pix: torch.Tensor) -> None:
        self.pix = pix

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pix[idx], torch.ones(len(idx), dtype=torch.bool)


def test_inoculation_stamps_the_triggers_residual_on_clean_pairs_only() -> None:
    from otcclip.models.features import trigger_residual

    g = torch.Generator().manual_seed(0)
    pix = torch.rand(6, 3, 16, 16, generator=g)
    d = _otcclip(6, inoculate=0.5)
    d.ctx.images, d.ctx.mean, d.ctx.std = _Pixels(pix), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # type: ignore[assignment]
    idx = torch.arange(5)
    x = d.ctx.batch_images(idx, None)
    assert torch.equal(d.inoculate(idx, x, g), x)  # nothing triggered yet
    d.state = _state(6, triggered=(4, 5), views={4: 0, 5: 1}, quarantine=(3,))
    d.match[4], d.match[5] = 0, 1  # both re-matched through their view: donors
    out = d.inoculate(idx, x, torch.Generator().manual_seed(1))
    changed = [i for i in range(5) if not torch.equal(out[i], x[i])]
    assert len(changed) == 2 and set(changed) <= {0, 1, 2}  # half the clean rows; never 3 or 4
    donors = d.ctx.batch_images(torch.tensor([4, 5]), None)
    res = trigger_residual(donors, torch.tensor([0, 1]))
    for i in changed:
        assert any(torch.allclose(out[i] - x[i], r, atol=1e-6) for r in res)
    d0 = _otcclip(6, inoculate=0.0)
    d0.ctx.images, d0.ctx.mean, d0.ctx.std = d.ctx.images, d.ctx.mean, d.ctx.std
    d0.state, d0.match = d.state, d.match
    assert torch.equal(d0.inoculate(idx, x, g), x)


def _patched_pixels(n: int, n_poison: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 images (n, 3, 32, 32), smooth content; one 8x8 noise patch pasted at random
    positions on ``n_poison`` of them (returned mask)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear", align_corners=False)
    x = x + 0.2 * torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear", align_corners=False)
    pix = (x / 1.2 * 255).round().clamp(0, 255).to(torch.uint8)
    rng = np.random.default_rng(seed)
    truth = np.zeros(n, dtype=bool)
    truth[rng.choice(n, n_poison, replace=False)] = True
    patch = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)
    for i in np.flatnonzero(truth):
        y, z = rng.integers(0, 25, size=2)
        pix[i, :, y : y + 8, z : z + 8] = patch
    return pix, truth


def _with_patched_images(n: int, **config: object) -> tuple[OtcClip, np.ndarray, SimpleNamespace]:
    pix, truth = _patched_pixels(n, 20, seed=0)
    d = _otcclip(n, **config)
    d.ctx.images, d.ctx.mean, d.ctx.std = _Pixels(pix), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # type: ignore[assignment]
    z = np.zeros(n)
    z[np.flatnonzero(truth)[:3]] = 3.0  # the detector saw 3 of the 20 ...
    z[np.flatnonzero(~truth)[:40]] = 2.5  # ... among 40 false alarms
    return d, truth, SimpleNamespace(sensitivity_z=z, purified_view=np.ones(n, dtype=np.int64))


def _template_pass(d: OtcClip, decisions: SimpleNamespace) -> tuple[list[str], np.ndarray, list[str], list[list[str]], np.ndarray]:
    """The template steps of one pass, on the sensitivity detector's verdicts: pairs with
    z > 2 flagged and dropped by it."""
    n = d.ctx.n
    hit = decisions.sensitivity_z > 2
    verdicts = Verdicts.of(
        ["drop" if h else "keep" for h in hit], np.where(hit, -1, np.arange(n)),
        ["trigger_sensitivity" if h else "own_best" for h in hit], ["trigger_sensitivity" if h else "" for h in hit],
    )
    searches, best = d.find_templates(decisions, 2)
    found = [(v, r.flagged) for v, r in searches]
    verdicts = release_explained(verdicts, found, view=decisions.purified_view)
    verdicts, d.state = apply_templates(verdicts, d.state, found, purified_rematch=d.ctx.config.purified_rematch)
    flags = [list(f) for f in verdicts.flags]
    return verdicts.action.tolist(), verdicts.new_caption_index, verdicts.reason.tolist(), flags, best


def test_template_search_drops_every_image_that_carries_the_flagged_images_trigger() -> None:
    n = 200
    d, truth, decisions = _with_patched_images(n, purified_rematch=False)
    action, new_idx, reasons, flags, best = _template_pass(d, decisions)
    assert d.quarantine.numpy().tolist() == truth.tolist()
    assert all((action[i], reasons[i], new_idx[i]) == ("drop", "trigger_template", -1) for i in np.flatnonzero(truth))
    assert all("trigger_template" in flags[i] for i in np.flatnonzero(truth))
    # the 40 false alarms on the same view do not carry the trigger: released
    false_alarm = (decisions.sensitivity_z > 2) & ~truth
    assert all((action[i], reasons[i], new_idx[i]) == ("keep", "trigger_explained", i) for i in np.flatnonzero(false_alarm))
    assert all(action[i] == "keep" and "trigger_sensitivity" not in flags[i] for i in np.flatnonzero(~truth))
    assert [t.kind for t in d.templates] == ["patch"] and d.templates[0].support == 20
    assert best[truth].min() > 12 > best[~truth].max()
    # re-matching instead: the images are triggered through the patch view, to be
    # re-matched by purified_rematch
    e, truth, decisions = _with_patched_images(n, purified_rematch=True)
    _template_pass(e, decisions)
    assert e.triggered.numpy().tolist() == truth.tolist() and not e.quarantine.any()
    assert (e.trigger_view[torch.from_numpy(truth)] == 1).all()


def test_without_a_template_the_sensitivity_flags_stand() -> None:
    n = 200
    d, truth, decisions = _with_patched_images(n, purified_rematch=False)
    decisions.sensitivity_z[truth] = 0.0  # only the false alarms: no shared pattern
    action, _, reasons, flags, best = _template_pass(d, decisions)
    assert d.templates == [] and not d.quarantine.any() and (best < 12).all()
    hit = decisions.sensitivity_z > 2
    assert all(action[i] == "drop" and reasons[i] == "trigger_sensitivity" for i in np.flatnonzero(hit))


def test_inoculation_stamps_a_found_template_and_it_survives_a_checkpoint() -> None:
    n = 200
    d, truth, decisions = _with_patched_images(n, inoculate=0.5, purified_rematch=False)
    _template_pass(d, decisions)
    assert len(d.templates) == 1
    t = d.templates[0]
    e = _otcclip(n)
    e.load_state_dict(d.state_dict())
    assert len(e.templates) == 1 and torch.equal(e.templates[0].pattern, t.pattern) and e.templates[0].kind == "patch"
    idx = torch.arange(40)
    x = d.ctx.batch_images(idx, None)
    out = d.inoculate(idx, x, torch.Generator().manual_seed(0))
    clean = [i for i in range(40) if not truth[i]]
    changed = [i for i in range(40) if not torch.equal(out[i], x[i])]
    assert len(changed) == round(0.5 * len(clean)) and set(changed) <= set(clean)
    for i in changed:  # the template pasted over one 8x8 window
        win = torch.nn.functional.unfold(out[i : i + 1], 8)[0]  # (3*64, L)
        assert torch.isclose(win, t.pattern.reshape(-1, 1), atol=1e-5).all(dim=0).any()


def _next_pass(d: OtcClip, epochs: int, *, start: int = 0) -> int | None:
    """The first epoch from ``start`` on with a pass due, as the loop meets it (None: none)."""
    return next((e for e in range(start, epochs) if d.is_rematch_epoch(e)), None)


def test_the_adaptive_schedule_survives_a_checkpoint() -> None:
    d = _otcclip(3, epochs=30, warmup_epochs=1, rematch_every=2, rematch_backoff=4)
    assert [e for e in range(8) if d.is_rematch_epoch(e)] == [1, 3, 5, 7]  # fixed until a pass
    assert d.schedule_next(1, changed=False) == 5 and d.schedule_next(5, changed=False) == 13
    assert d.schedule_next(13, changed=False) == 21  # capped at 4 x 2
    e = _otcclip(3, epochs=30, warmup_epochs=1, rematch_every=2, rematch_backoff=4)
    e.load_state_dict(d.state_dict())
    assert _next_pass(e, 30) == 21
    assert e.schedule_next(21, changed=True) == 23  # back to K after a pass that changed
    for key in ("next_pass", "interval"):  # both are required to resume
        with pytest.raises(KeyError, match=key):
            _otcclip(3).load_state_dict({k: v for k, v in d.state_dict().items() if k != key})


def test_no_later_pass_steers_fewer_epochs_than_the_interval() -> None:
    """A later pass runs only with at least rematch_every epochs left to train after it,
    counted on the run's plan: config.epochs plus the warm-up a restart repeats."""
    restarted = _otcclip(3, epochs=10, warmup_epochs=1, rematch_every=4, rematch_backoff=4)
    assert restarted.planned_epochs() == 11 and restarted.is_rematch_epoch(1)  # the first pass
    restarted.call_restart(changed=True)
    assert restarted.schedule_next(1, changed=True) == 5
    assert _next_pass(restarted, 11) == 5  # 6 epochs left
    assert restarted.schedule_next(5, changed=False) == 13  # past the end
    kept = _otcclip(3, epochs=10, warmup_epochs=1, rematch_every=4, rematch_backoff=4)
    kept.call_restart(changed=False)
    assert kept.planned_epochs() == 10
    assert kept.schedule_next(1, changed=False) == 9
    assert _next_pass(kept, 10) is None  # 1 epoch left after epoch 9
    longer = _otcclip(3, epochs=13, warmup_epochs=1, rematch_every=4, rematch_backoff=4)
    longer.call_restart(changed=False)
    longer.schedule_next(1, changed=False)
    assert _next_pass(longer, 13) == 9  # 4 left: it runs
    # a run resumed with more epochs gets the pass it put off, at its first epoch
    extended = _otcclip(3, epochs=30, warmup_epochs=1, rematch_every=4, rematch_backoff=4)
    extended.load_state_dict(kept.state_dict())
    assert extended.planned_epochs() == 30 and _next_pass(extended, 30, start=10) == 10
    assert not extended.is_rematch_epoch(8)  # before the pass it put off
    every = _otcclip(3, epochs=3, warmup_epochs=1, rematch_every=1)
    every.call_restart(changed=False)
    every.schedule_next(1, changed=True)
    assert every.is_rematch_epoch(2)  # K = 1: a pass before the last epoch still runs
    short = _otcclip(3, epochs=1, warmup_epochs=2)
    short.call_restart(changed=False)
    assert short.planned_epochs() == 3  # epochs <= warm-up: one epoch after the pass


def test_one_pass_per_modality_gives_each_term_as_defined() -> None:
    """batch_loss runs one image and one (de-duplicated) text pass; every term must equal
    the term computed on its own rows with separate passes."""
    import copy
    import random

    from otcclip.models.factory import create_model
    from otcclip.models.features import image_features, text_features
    from otcclip.models.training.augment import augment_caption
    from otcclip.models.training.losses import clip_loss, ot_contrastive_loss, unlikelihood_loss

    n = 12
    bundle = create_model("otc-micro", device=torch.device("cpu"), seed=0)
    m = bundle.model.eval()  # no dropout either way; eval only pins it
    names = ["cat", "dog", "frog", "truck", "ship", "bird"]
    captions = [f"a photo of a {names[i % 6]} number {i}" for i in range(n)]
    d = _otcclip(n, restart=False, fill_batches=False, lam_inter=0.5, lam_intra=0.5, lam_unlearn=1.0, intra_subsample=0.45,
                 dropped_share=1.0)
    s = bundle.image_size if isinstance(bundle.image_size, int) else bundle.image_size[0]
    pix = (torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    d.ctx.model, d.ctx.tokenizer, d.ctx.captions = m, bundle.tokenizer, captions
    d.ctx.tokens = bundle.tokenizer(captions)
    d.ctx.images, d.ctx.mean, d.ctx.std = _Pixels(pix), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # type: ignore[assignment]
    d.state = _state(n, quarantine=(2, 5))
    d.active[[2, 5]] = False
    d.match[7] = 3  # a re-matched pair trains on caption 3
    idx = torch.tensor([8, 5, 0, 2, 6, 1, 7, 3, 4])  # unsorted: rows and positions differ
    gen, rng = torch.Generator().manual_seed(3), random.Random(3)
    gen_ref, rng_ref = copy.deepcopy(gen), copy.deepcopy(rng)
    with torch.no_grad():
        _, terms = d.batch_loss(idx, 5, gen, rng)
        # reference: the same draws, each term on its own rows
        c = d.ctx.config
        x = d.ctx.batch_images(idx, gen_ref)
        act = d.active[idx]
        pos = torch.argsort(act.float() + torch.rand(9, generator=gen_ref))[: round(0.45 * 9)]
        assert set(idx[pos].tolist()) > {2, 5}  # dropped rows first, then active ones
        fi, view2 = image_features(m, x), image_features(m, d.ctx.batch_images(idx[pos], gen_ref))
        ft = text_features(m, d.ctx.tokens[d.match[idx[act]]])
        assert terms["clip"] == pytest.approx(float(clip_loss(fi.global_[act], ft.global_, m.logit_scale.exp())), rel=1e-5)

        def ot(a: torch.Tensor, b: torch.Tensor, **kw: torch.Tensor) -> float:
            return float(ot_contrastive_loss(a, b, negatives=c.ot_negatives, temperature=c.ot_temperature, settings=c.ot, **kw))

        assert terms["inter"] == pytest.approx(ot(fi.local[act], ft.local, y_mask=ft.mask), rel=1e-4)
        own = text_features(m, d.ctx.tokens[idx[pos]])
        edits = text_features(m, bundle.tokenizer([augment_caption(captions[int(i)], rng_ref) for i in idx[pos]]))
        intra = ot(fi.local[pos], view2.local) + ot(own.local, edits.local, x_mask=own.mask, y_mask=edits.mask)
        assert terms["intra"] == pytest.approx(intra, rel=1e-4)
        bad = d.quarantine[idx]
        un = unlikelihood_loss(fi.global_[bad], text_features(m, d.ctx.tokens[idx[bad]]).global_, ft.global_, m.logit_scale.exp())
        assert terms["unlearn"] == pytest.approx(float(un), rel=1e-5)


def test_only_the_first_pass_computes_purified_views_unless_later_purified() -> None:
    """later_purified off: the first pass computes purified views, later
    ones do not, also after a resume; on, every pass does. Triggered pairs to re-match
    through their views (purified_rematch) need them at every pass."""
    d = _otcclip(3, warmup_epochs=1, rematch_every=2, later_purified=False)
    assert d.wants_purified()  # before any pass
    d.schedule_next(1, changed=True)
    assert not d.wants_purified()
    resumed = _otcclip(3, warmup_epochs=1, rematch_every=2, later_purified=False)
    resumed.load_state_dict(d.state_dict())
    assert not resumed.wants_purified()
    every = _otcclip(3, warmup_epochs=1, rematch_every=2)  # the default
    every.schedule_next(1, changed=True)
    assert every.wants_purified()
    rematch = _otcclip(3, warmup_epochs=1, rematch_every=2, purified_rematch=True, later_purified=False)
    rematch.schedule_next(1, changed=True)
    assert not rematch.wants_purified()  # nothing triggered yet
    rematch.state = _state(3, triggered=(1,), views={1: 0})
    assert rematch.wants_purified()
    off = _otcclip(3, sanitize={"decisions": {"detectors": ["image_burst"]}})
    assert not off.wants_purified()  # no trigger-sensitivity detector, no views


def test_pass_encodes_do_not_depend_on_encode_batch_size() -> None:
    """encode_batch_size is a speed setting: the pass's features, purified views and
    thumbnails are the same (to float rounding) whatever chunks they are computed in."""
    from otcclip.models.factory import create_model

    n = 11
    bundle = create_model("otc-micro", device=torch.device("cpu"), seed=0)
    s = bundle.image_size if isinstance(bundle.image_size, int) else bundle.image_size[0]
    pix = (torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    captions = [f"a photo of thing {i}" + " big" * (i % 4) for i in range(n)]
    out = []
    for bs in (2, 5, 256):
        d = _otcclip(n, encode_batch_size=bs)
        d.ctx.model, d.ctx.tokenizer, d.ctx.captions = bundle.model.train(), bundle.tokenizer, captions
        d.ctx.tokens = bundle.tokenizer(captions)
        d.ctx.images, d.ctx.mean, d.ctx.std = _Pixels(pix), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # type: ignore[assignment]
        img, txt = d.encode_all(local=True)
        out.append((img.global_, img.local, txt.global_, txt.local, txt.mask, d.encode_purified(), d.encode_thumbs()))
        assert bundle.model.training  # left as it was
    for other in out[1:]:
        for a, b in zip(out[0], other, strict=True):
            assert a.shape == b.shape
            assert torch.allclose(a.float(), b.float(), atol=1e-5)
