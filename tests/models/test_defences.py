"""OTCCLIP's trainer policy on the engine's decisions and its per-pair state between passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from otcclip.models.training.config import TrainConfig
from otcclip.models.training.defences import Context, OtcClip


def _otcclip(n: int, **config: object) -> OtcClip:
    ctx = Context(
        model=None, tokenizer=None, config=TrainConfig(defense="otcclip", **config), images=None,  # type: ignore[arg-type]
        captions=[f"c{i}" for i in range(n)], ids=[str(i) for i in range(n)],
        tokens=torch.zeros(n, 4, dtype=torch.long), mean=(0.0,), std=(1.0,),
        device=torch.device("cpu"), run_dir=Path("."),
    )
    return OtcClip(ctx)


def test_triggered_pairs_are_rematched_through_their_purified_view() -> None:
    e = torch.eye(4)
    # captions 0,1: class A; 2: class B; 3: dropped; 4,5: the trigger's target class T
    captions = torch.stack([e[0], e[0], e[1], e[2], e[3], e[3]])
    d = _otcclip(6)
    d.triggered[4] = d.triggered[5] = True
    # view 0 still shows the trigger (close to T), view 1 shows the content
    purified = torch.stack([
        torch.stack([e[3], e[3]]) for _ in range(6)
    ])  # (6, 2, 4)
    purified[4, 1] = e[1] + 0.1 * e[3]  # content: class B
    purified[5, 0] = e[0]  # the view that removed the trigger is 0 here: class A
    view = np.array([-1, -1, -1, -1, 1, 0])
    action = ["keep", "keep", "keep", "drop", "drop", "keep"]
    new_idx = np.array([0, 1, 2, -1, -1, 5])
    reasons = ["own_best", "own_best", "own_best", "no_plausible_caption", "trigger_sensitivity", "clean_score"]
    d._purified_rematch(purified, captions, view, action, new_idx, reasons)
    assert action == ["keep", "keep", "keep", "drop", "reassign", "reassign"]
    assert new_idx[4] == 2  # class B, never the trigger's captions 4/5 or the dropped 3
    assert new_idx[5] in (0, 1)
    # freshly flagged keeps its reason; flagged earlier and not now reads "quarantined"
    assert reasons[4] == "trigger_sensitivity" and reasons[5] == "quarantined"


def test_triggered_state_survives_a_checkpoint() -> None:
    d = _otcclip(3)
    d.triggered[1] = True
    d.quarantine[2] = True
    e = _otcclip(3)
    e.load_state_dict(d.state_dict())
    assert e.triggered.tolist() == [False, True, False] and e.quarantine.tolist() == [False, False, True]
    # checkpoints written before these fields existed still load
    old = {k: v for k, v in d.state_dict().items() if k in ("match", "active")}
    f = _otcclip(3)
    f.load_state_dict(old)
    assert not f.triggered.any() and not f.quarantine.any()


def test_a_flagged_pair_whose_purified_view_still_fits_its_caption_keeps_it() -> None:
    e = torch.eye(3)
    captions = torch.stack([e[0], e[0], e[1], e[2], e[0]])  # pair 4 (flagged) is captioned class A
    d = _otcclip(5)
    d.triggered[4] = True
    purified = torch.stack([torch.stack([e[2], e[2]]) for _ in range(5)])
    purified[4, 0] = e[0]  # with the trigger filtered out the image still shows class A
    action = ["keep"] * 4 + ["drop"]
    new_idx = np.array([0, 1, 2, 3, -1])
    reasons = ["own_best"] * 4 + ["trigger_sensitivity"]
    d._purified_rematch(purified, captions, np.array([-1, -1, -1, -1, 0]), action, new_idx, reasons)
    assert action[4] == "keep" and new_idx[4] == 4 and reasons[4] == "purified_supports_own"


def _verdicts(d: OtcClip, rows: list[tuple[str, int, str, str]], purified: bool = True) -> tuple[list[str], list[int], list[str]]:
    action = [r[0] for r in rows]
    new_idx = np.array([r[1] for r in rows])
    reasons = [r[2] for r in rows]
    d._apply_verdicts(action, new_idx, reasons, [r[3].split(",") for r in rows], purified_views=purified)
    return action, new_idx.tolist(), reasons


def test_detector_verdicts_win_and_score_decisions_are_ignored_by_default() -> None:
    rows = [
        ("keep", 0, "own_best", ""),
        ("reassign", 5, "low_own_score", ""),  # score-based: ignored while training
        ("reassign", 6, "low_own_score", "image_burst"),  # a burst is dropped whatever the score says
        ("keep", 3, "clean_score", "image_burst"),  # even when the engine would keep it
        ("drop", -1, "trigger_sensitivity", "trigger_sensitivity"),
        ("drop", -1, "trigger_sensitivity", "image_burst,trigger_sensitivity"),  # the burst wins
    ]
    d = _otcclip(6)
    action, new_idx, reasons = _verdicts(d, rows)
    assert action == ["keep", "keep", "drop", "drop", "drop", "drop"]
    assert new_idx[:4] == [0, 1, -1, -1]
    assert reasons == ["own_best", "score_ignored", "image_burst", "image_burst", "trigger_sensitivity", "image_burst"]
    assert d.quarantine.tolist() == [False, False, True, True, False, True]
    assert d.triggered.tolist() == [False, False, False, False, True, False]
    # the next pass: quarantined pairs stay out although the engine now keeps them
    action, _, reasons = _verdicts(d, [("keep", i, "clean_score", "") for i in range(6)])
    assert action == ["keep", "keep", "drop", "drop", "keep", "drop"] and reasons[2] == "quarantined"
    assert d.triggered[4]  # still re-matched through its purified view (by _purified_rematch)


def test_score_rematch_applies_the_engine_decisions() -> None:
    d = _otcclip(2, score_rematch=True)
    action, new_idx, reasons = _verdicts(d, [("reassign", 1, "low_own_score", ""), ("keep", 1, "own_best", "")])
    assert action == ["reassign", "keep"] and new_idx == [1, 1] and reasons[0] == "low_own_score"
    # without purified views a trigger flag is a sticky drop
    e = _otcclip(1)
    action, _, _ = _verdicts(e, [("drop", -1, "trigger_sensitivity", "trigger_sensitivity")], purified=False)
    assert action == ["drop"] and e.quarantine[0] and not e.triggered[0]
