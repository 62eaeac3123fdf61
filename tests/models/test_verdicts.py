"""The trainer's pass policy as pure functions (otcclip.models.training.verdicts)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from otcclip.models.decisions import Decisions
from otcclip.models.training.config import SCORE_REASONS, TrainConfig
from otcclip.models.training.verdicts import (
    PassState,
    Verdicts,
    apply_policy,
    apply_templates,
    purified_matches,
    purified_rematch,
    record_trigger_views,
    release_explained,
)


def _cfg(**kw: object) -> TrainConfig:
    return TrainConfig(defence="otcclip", **kw)  # type: ignore[arg-type]


def _v(*rows: tuple[str, int, str, str]) -> Verdicts:
    """Verdicts from ``(action, new caption row, reason, comma-separated flags)`` rows."""
    return Verdicts.of([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def _s(n: int, *, quarantine: tuple[int, ...] = (), triggered: tuple[int, ...] = (), views: dict[int, int] | None = None) -> PassState:
    q, t, v = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool), torch.full((n,), -1)
    q[list(quarantine)] = True
    t[list(triggered)] = True
    for i, view in (views or {}).items():
        v[i] = view
    return PassState(q, t, v)


def _row(v: Verdicts, i: int) -> tuple[str, int, str]:
    return str(v.action[i]), int(v.new_caption_index[i]), str(v.reason[i])


def _snapshot(v: Verdicts, s: PassState) -> tuple[object, ...]:
    return (
        v.action.tolist(), v.new_caption_index.tolist(), v.reason.tolist(), v.flags,
        s.quarantine.tolist(), s.triggered.tolist(), s.trigger_view.tolist(),
    )


def _mixed() -> tuple[Verdicts, PassState]:
    """Six pairs that every rule touches: bursts, trigger flags, score proposals, a quarantine."""
    v = _v(
        ("keep", 0, "own_best", ""),
        ("reassign", 5, "low_own_score", ""),
        ("reassign", 4, "image_burst", "image_burst"),
        ("drop", -1, "trigger_sensitivity", "trigger_sensitivity"),
        ("drop", -1, "trigger_sensitivity", "trigger_sensitivity"),
        ("keep", 5, "clean_score", ""),
    )
    return v, _s(6, quarantine=(5,), triggered=(4,), views={4: 1})


def test_no_function_changes_its_inputs() -> None:
    v, s = _mixed()
    e = torch.eye(4)
    purified, captions = torch.stack([torch.stack([e[i % 4], e[(i + 1) % 4]]) for i in range(6)]), e[[0, 1, 2, 3, 0, 1]]
    found = [(1, np.array([0, 0, 0, 1, 1, 0], dtype=bool)), (0, np.array([1, 0, 0, 0, 0, 0], dtype=bool))]
    view = np.array([-1, -1, -1, 1, 1, 0])
    calls: list[Callable[[], object]] = [
        lambda: apply_policy(v, s, _cfg(purified_rematch=True), purified_views=True),
        lambda: apply_policy(v, s, _cfg(score_rematch=True, reassign="drop"), purified_views=False),
        lambda: record_trigger_views(v, s, view),
        lambda: release_explained(v, found, view=view),
        lambda: apply_templates(v, s, found, purified_rematch=True),
        lambda: apply_templates(v, s, found, purified_rematch=False),
        lambda: purified_rematch(v, s, purified, captions, view, keep_top=0.05),
    ]
    for call in calls:
        before = _snapshot(v, s)
        out = call()
        assert _snapshot(v, s) == before
        outs = out if isinstance(out, tuple) else (out,)
        assert all(o is not v and o is not s for o in outs)
        for o in outs:  # the results share no storage with the inputs either
            if isinstance(o, PassState):
                assert o.quarantine.data_ptr() != s.quarantine.data_ptr()
                assert o.triggered.data_ptr() != s.triggered.data_ptr()
                assert o.trigger_view.data_ptr() != s.trigger_view.data_ptr()
    with pytest.raises(ValueError):  # verdict arrays are read-only
        v.action[0] = "drop"
    with pytest.raises(ValueError):
        v.new_caption_index[0] = 3


def test_the_first_listed_drop_reason_decides_whatever_the_engine_proposed() -> None:
    v = _v(
        ("keep", 0, "clean_score", "trigger_sensitivity,image_burst"),
        ("reassign", 0, "better_caption", "caption_burst"),
        ("reassign", 0, "image_burst", ""),  # the reason alone, without the flag: a re-assignment that drops
    )
    s = PassState.empty(3)
    out, _ = apply_policy(v, s, _cfg(), purified_views=False)
    # drop_reasons default lists image_burst before trigger_sensitivity
    assert _row(out, 0) == ("drop", -1, "image_burst")
    assert _row(out, 1) == ("drop", -1, "caption_burst")
    assert _row(out, 2) == ("drop", -1, "image_burst")
    out, _ = apply_policy(v, s, _cfg(drop_reasons=("trigger_sensitivity", "image_burst")), purified_views=False)
    assert _row(out, 0) == ("drop", -1, "trigger_sensitivity")
    # a detector outside drop_reasons does not decide: the score proposal is ignored instead
    assert _row(out, 1) == ("keep", 1, "score_ignored")
    assert out.flags == v.flags  # the policy never edits flags


def test_score_proposals_are_ignored_unless_score_rematch() -> None:
    rows = [("reassign", 2, r, "") for r in SCORE_REASONS] + [("drop", -1, "no_plausible_caption", ""), ("keep", 4, "clean_score", "")]
    v, s = _v(*rows), PassState.empty(len(rows))
    out, state = apply_policy(v, s, _cfg(), purified_views=True)
    for i in range(len(SCORE_REASONS) + 1):
        assert _row(out, i) == ("keep", i, "score_ignored")
    assert _row(out, len(rows) - 1) == ("keep", 4, "clean_score")  # keeps are left alone
    assert not state.quarantine.any() and not state.triggered.any()
    out, state = apply_policy(v, s, _cfg(score_rematch=True), purified_views=True)
    assert [_row(out, i) for i in range(len(rows))] == [(a, j, r) for a, j, r, _ in rows]
    assert not state.quarantine.any()  # score reasons are not sticky by default
    # reassign="drop": every re-assignment becomes a drop, its reason kept
    out, _ = apply_policy(v, s, _cfg(score_rematch=True, reassign="drop"), purified_views=True)
    assert [_row(out, i) for i in range(len(SCORE_REASONS))] == [("drop", -1, r) for r in SCORE_REASONS]


def test_sticky_reasons_quarantine_and_quarantine_outlasts_later_passes() -> None:
    v = _v(
        ("drop", -1, "image_burst", "image_burst"),
        ("drop", -1, "no_plausible_caption", ""),
        ("keep", 2, "own_best", ""),
    )
    cfg = _cfg(score_rematch=True)
    out, state = apply_policy(v, PassState.empty(3), cfg, purified_views=False)
    assert state.quarantine.tolist() == [True, False, False]  # no_plausible_caption is not sticky
    assert _row(out, 1) == ("drop", -1, "no_plausible_caption")
    # the next pass keeps everyone: the quarantined pair stays out
    again, state2 = apply_policy(_v(*[("keep", i, "own_best", "") for i in range(3)]), state, cfg, purified_views=False)
    assert [_row(again, i) for i in range(3)] == [("drop", -1, "quarantined"), ("keep", 1, "own_best"), ("keep", 2, "own_best")]
    assert state2.quarantine.tolist() == [True, False, False]
    # sticky_reasons can name a score reason too
    _, state3 = apply_policy(v, PassState.empty(3), _cfg(score_rematch=True, sticky_reasons=("no_plausible_caption",)), purified_views=False)
    assert state3.quarantine.tolist() == [False, True, False]
    # quarantine wins over triggered, and the trigger view stays
    s = _s(3, triggered=(0,), views={0: 1})
    _, state4 = apply_policy(v, s, cfg, purified_views=True)
    assert state4.quarantine[0] and not state4.triggered[0] and state4.trigger_view[0] == 1


def test_a_flag_the_decision_step_kept_for_review_drops_nothing() -> None:
    """The decision step's evidence rules come first: a pair it kept for review (a flag
    without calibrated evidence) is kept, not dropped, quarantined or triggered by the
    flag; a pair quarantined at an earlier pass stays out."""
    v = _v(
        ("keep", 0, "review", "trigger_sensitivity"),
        ("keep", 1, "review", "image_burst,trigger_sensitivity"),
        ("drop", -1, "trigger_sensitivity", "trigger_sensitivity"),  # the engine acted: evidence
        ("keep", 3, "review", "trigger_sensitivity"),
    )
    for cfg in (_cfg(), _cfg(purified_rematch=True)):
        out, state = apply_policy(v, _s(4, quarantine=(3,)), cfg, purified_views=True)
        assert [_row(out, i) for i in (0, 1)] == [("keep", 0, "review"), ("keep", 1, "review")]
        assert _row(out, 2) == ("drop", -1, "trigger_sensitivity")
        assert _row(out, 3) == ("drop", -1, "quarantined")
        assert not state.quarantine[:2].any() and not state.triggered[:2].any()
        assert out.flags == v.flags  # the flags stay on record (they still seed the template search)


def test_trigger_flags_trigger_a_purified_rematch_only_with_it_on_and_purified_views() -> None:
    v = _v(("drop", -1, "trigger_sensitivity", "trigger_sensitivity"), ("keep", 1, "own_best", ""))
    s = PassState.empty(2)
    out, state = apply_policy(v, s, _cfg(purified_rematch=True), purified_views=True)
    assert state.triggered.tolist() == [True, False] and not state.quarantine.any()
    assert _row(out, 0) == ("drop", -1, "trigger_sensitivity")  # purified_rematch re-matches it next
    for cfg, views in ((_cfg(purified_rematch=True), False), (_cfg(purified_rematch=False), True)):
        _, state = apply_policy(v, s, cfg, purified_views=views)
        assert state.quarantine.tolist() == [True, False] and not state.triggered.any()
    # a triggered pair stays triggered when later passes see nothing
    _, later = apply_policy(_v(("keep", 0, "own_best", ""), ("keep", 1, "own_best", "")), _s(2, triggered=(0,)), _cfg(purified_rematch=True), purified_views=True)
    assert later.triggered.tolist() == [True, False]
    # record_trigger_views notes the view of this pass's trigger flags only
    rec = record_trigger_views(v, _s(2, triggered=(1,), views={1: 0}), np.array([1, 1]))
    assert rec.trigger_view.tolist() == [1, 0] and rec.triggered.tolist() == [False, True]


def test_a_found_template_releases_the_flags_it_explains() -> None:
    v = _v(
        ("drop", -1, "trigger_sensitivity", "trigger_sensitivity"),  # view 1, does not carry: released
        ("drop", -1, "trigger_sensitivity", "trigger_sensitivity"),  # view 1, carries it: stands
        ("drop", -1, "trigger_sensitivity", "trigger_sensitivity"),  # view 0, no template there: stands
        ("drop", -1, "image_burst", "image_burst,trigger_sensitivity"),  # released flag, reason stays
        ("keep", 4, "own_best", ""),
    )
    view = np.array([1, 1, 0, 1, -1])
    found = [(1, np.array([False, True, False, False, False]))]
    out = release_explained(v, found, view=view)
    assert _row(out, 0) == ("keep", 0, "trigger_explained") and out.flags[0] == ()
    assert [_row(out, i) for i in (1, 2)] == [_row(v, 1), _row(v, 2)] and out.flags[1:3] == v.flags[1:3]
    assert _row(out, 3) == ("drop", -1, "image_burst") and out.flags[3] == ("image_burst",)
    assert out.detectors() == ["", "trigger_sensitivity", "trigger_sensitivity", "image_burst", ""]
    # nothing found: nothing released
    none = release_explained(v, [], view=view)
    assert _snapshot(none, PassState.empty(5)) == _snapshot(v, PassState.empty(5))


def test_template_images_are_dropped_for_good_or_rematched() -> None:
    v = _v(
        ("keep", 0, "own_best", ""),
        ("keep", 1, "clean_score", "image_burst"),
        ("drop", -1, "trigger_sensitivity", "trigger_sensitivity"),
        ("keep", 3, "own_best", ""),
    )
    s = _s(4, quarantine=(1,), triggered=(2,), views={2: 0})
    found = [(1, np.array([True, True, True, False]))]
    out, state = apply_templates(v, s, found, purified_rematch=False)
    assert _row(out, 0) == ("drop", -1, "trigger_template") and out.flags[0] == ("trigger_template",)
    assert _row(out, 1) == _row(v, 1) and out.flags[1] == ("image_burst",)  # quarantined: left alone
    # already triggered: keeps its view, dropped for good all the same
    assert _row(out, 2) == ("drop", -1, "trigger_template") and out.flags[2] == ("trigger_sensitivity", "trigger_template")
    assert _row(out, 3) == _row(v, 3)
    assert state.quarantine.tolist() == [True, True, True, False] and state.trigger_view.tolist() == [1, -1, 0, -1]
    out, state = apply_templates(v, s, found, purified_rematch=True)
    assert state.triggered.tolist() == [True, False, True, False] and state.quarantine.tolist() == [False, True, False, False]
    # re-matched later by purified_rematch: the action stands, the reason tells why
    assert _row(out, 0) == ("keep", 0, "trigger_template")
    assert _row(out, 2) == ("drop", -1, "trigger_sensitivity")  # triggered before: its own reason
    assert state.trigger_view.tolist() == [1, -1, 0, -1]


def test_purified_matches_scores_the_purified_view_against_the_pool() -> None:
    e = torch.eye(3)
    captions = torch.stack([e[0], e[1], e[2], e[0]])
    purified = torch.stack([torch.stack([e[2], e[1]]) for _ in range(4)])  # view 0 shows class C, view 1 class B
    rows, pool = torch.tensor([3]), torch.tensor([0, 1, 2])
    best, keep = purified_matches(purified, captions, torch.tensor([-1, -1, -1, 1]), rows, pool, keep_top=0.05)
    assert best.tolist() == [1] and keep.tolist() == [False]  # view 1: class B beats its own class A
    best, _ = purified_matches(purified, captions, torch.tensor([-1, -1, -1, -1]), rows, pool, keep_top=0.05)
    assert best.tolist() == [2]  # view -1 reads view 0
    # the own caption ranked below a share of the pool under keep_top: kept
    _, keep = purified_matches(purified, captions, torch.tensor([-1, -1, -1, 1]), rows, pool, keep_top=0.5)
    assert keep.tolist() == [True]  # beaten by 1 of 3 candidates: 1/3 < 0.5


def test_purified_rematch_drops_the_triggered_pairs_when_no_caption_is_left() -> None:
    v = _v(("drop", -1, "image_burst", "image_burst"), ("keep", 1, "trigger_template", "trigger_template"))
    e = torch.eye(2)
    out = purified_rematch(v, _s(2, quarantine=(0,), triggered=(1,)), torch.stack([torch.stack([e[0]])] * 2), e, np.array([-1, 0]), keep_top=0.05)
    assert _row(out, 1) == ("drop", -1, "trigger_template")


def test_verdicts_from_the_engine_decisions() -> None:
    n = 3
    f32, i64 = np.zeros(n, dtype=np.float32), np.arange(n, dtype=np.int64)
    d = Decisions(
        row=i64, action=np.array(["keep", "reassign", "drop"], dtype=object),
        reason=np.array(["own_best", "image_burst", "trigger_sensitivity"], dtype=object),
        detectors=np.array(["", "image_burst", "image_burst,trigger_sensitivity"], dtype=object),
        caption_index=i64, new_caption_index=np.array([0, 2, -1], dtype=np.int64), global_score=f32, ot_score=f32,
        fused_score=f32, best_caption_index=i64, best_global_score=f32, best_ot_score=f32, best_fused_score=f32,
        p_clean=f32, sensitivity_z=f32, purified_view=np.full(n, -1), sensitivity_enrichment=f32,
        review=np.zeros(n, dtype=bool), review_reason=np.full(n, "", dtype=object), template_z=f32,
        dup_group=np.full(n, -1),
    )
    v = Verdicts.from_decisions(d)
    assert v.action.tolist() == d.action.tolist() and v.new_caption_index.tolist() == [0, 2, -1]
    assert v.reason.tolist() == d.reason.tolist() and v.flags == ((), ("image_burst",), ("image_burst", "trigger_sensitivity"))
    assert v.detectors() == d.detectors.tolist() and v.counts() == {"keep": 1, "reassign": 1, "drop": 1}
    with pytest.raises(ValueError, match="length"):
        Verdicts.of(["keep"], [0, 1], ["own_best"], [""])
    with pytest.raises(ValueError, match="unknown actions"):
        Verdicts.of(["maybe"], [0], ["own_best"], [""])
    with pytest.raises(ValueError, match="length"):
        PassState(torch.zeros(2, dtype=torch.bool), torch.zeros(3, dtype=torch.bool), torch.zeros(2))
    with pytest.raises(ValueError, match="2 verdicts"):
        apply_policy(_v(("keep", 0, "own_best", ""), ("keep", 1, "own_best", "")), PassState.empty(3), _cfg(), purified_views=False)
