"""OTCCLIP's trainer policy on the engine's decisions, as pure functions (DESIGN 2.4).

A re-matching pass (:mod:`otcclip.models.training.otcclip_pass`) turns the engine's
:class:`~otcclip.models.decisions.Decisions` into :class:`Verdicts` (per pair: action,
caption row, reason, the detectors that flagged it) and edits them with the functions
here, in this order:

1. :func:`release_explained`: trigger-sensitivity flags on a view whose trigger template
   was found, on images that do not carry it, are false alarms (kept).
2. :func:`apply_policy`: pairs the engine kept for review (no calibrated evidence,
   :mod:`otcclip.models.decisions`) are kept; otherwise the detectors in
   ``drop_reasons`` decide, score-based proposals are ignored unless ``score_rematch``, and verdicts are sticky across passes
   (:class:`PassState`: quarantined pairs stay dropped, triggered pairs are re-matched
   through their purified view); :func:`record_trigger_views` then notes the view that
   flagged each triggered pair.
3. :func:`apply_templates`: images carrying a found trigger template are triggered (or
   quarantined when ``purified_rematch`` is off).
4. :func:`purified_rematch`: every triggered pair is re-matched to the caption its
   purified view scores best with (:func:`purified_matches`).

No function mutates its inputs: each returns new :class:`Verdicts` / :class:`PassState`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from otcclip.models.config.training import SCORE_REASONS, TrainConfig
from otcclip.models.decisions import ACTIONS, REVIEW, Decisions

__all__ = [
    "Found",
    "PassState",
    "Verdicts",
    "apply_policy",
    "apply_templates",
    "purified_matches",
    "purified_rematch",
    "record_trigger_views",
    "release_explained",
]

#: Trigger templates a pass found: ``(purified view, (N,) bool mask of the images carrying it)``.
Found = Sequence[tuple[int, np.ndarray]]


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Verdicts:
    """The trainer's verdict on each of N pairs (rows in dataset order).

    Attributes
    ----------
    action : ndarray of str (object), shape (N,)
        ``keep``, ``reassign`` or ``drop``.
    new_caption_index : ndarray of int64, shape (N,)
        The caption row the pair trains with (its own for keep), -1 for drop.
    reason : ndarray of str (object), shape (N,)
        The reason code (:mod:`otcclip.models.decisions`, plus the trainer's own:
        ``score_ignored``, ``quarantined``, ``trigger_explained``, ``trigger_template``,
        ``purified_supports_own``).
    flags : tuple of tuple of str, length N
        The detectors that flagged each pair, in order (no empty names).

    The arrays are stored as read-only copies; edits return new objects. Build from
    plain sequences with :meth:`of`, from the engine's decisions with
    :meth:`from_decisions`.
    """

    action: np.ndarray
    new_caption_index: np.ndarray
    reason: np.ndarray
    flags: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        action = _frozen(np.array([str(a) for a in self.action], dtype=object))
        new = _frozen(np.array(self.new_caption_index, dtype=np.int64, copy=True).reshape(-1))
        reason = _frozen(np.array([str(r) for r in self.reason], dtype=object))
        flags = tuple(tuple(str(x) for x in f if x) for f in self.flags)
        n = len(action)
        if not (len(new) == len(reason) == len(flags) == n):
            raise ValueError(
                f"verdict columns differ in length: action {n}, new_caption_index {len(new)}, "
                f"reason {len(reason)}, flags {len(flags)}"
            )
        bad = set(action.tolist()) - set(ACTIONS)
        if bad:
            raise ValueError(f"unknown actions {sorted(bad)}; expected {ACTIONS}")
        object.__setattr__(self, "action", action)
        object.__setattr__(self, "new_caption_index", new)
        object.__setattr__(self, "reason", reason)
        object.__setattr__(self, "flags", flags)

    @classmethod
    def of(
        cls,
        action: Sequence[str] | np.ndarray,
        new_caption_index: Sequence[int] | np.ndarray,
        reason: Sequence[str] | np.ndarray,
        flags: Sequence[Sequence[str] | str],
    ) -> Verdicts:
        """Verdicts from plain sequences; a pair's flags may be one comma-separated string."""
        return cls(
            np.array([str(a) for a in action], dtype=object),
            np.asarray(new_caption_index, dtype=np.int64),
            np.array([str(r) for r in reason], dtype=object),
            tuple(tuple(f.split(",") if isinstance(f, str) else f) for f in flags),
        )

    @classmethod
    def from_decisions(cls, decisions: Decisions) -> Verdicts:
        """The engine's decisions as verdicts (``detectors`` split into ``flags``)."""
        return cls.of(
            decisions.action,
            decisions.new_caption_index,
            decisions.reason,
            [str(f) for f in decisions.detectors.tolist()],
        )

    def __len__(self) -> int:
        return len(self.action)

    def counts(self) -> dict[str, int]:
        """Pairs per action, ``{"keep": .., "reassign": .., "drop": ..}``."""
        return {a: int((self.action == a).sum()) for a in ACTIONS}

    def detectors(self) -> list[str]:
        """``flags`` as the decisions file writes them: comma-separated names per pair."""
        return [",".join(f) for f in self.flags]

    def _draft(self) -> _Draft:
        return _Draft(
            self.action.tolist(),
            self.new_caption_index.copy(),
            self.reason.tolist(),
            [list(f) for f in self.flags],
        )


@dataclass
class _Draft:
    """Mutable working copies of :class:`Verdicts` inside one pure function."""

    action: list[str]
    new: np.ndarray
    reason: list[str]
    flags: list[list[str]]

    def set(self, i: int, action: str, new: int, reason: str | None = None) -> None:
        self.action[i], self.new[i] = action, new
        if reason is not None:
            self.reason[i] = reason

    def freeze(self) -> Verdicts:
        return Verdicts.of(self.action, self.new, self.reason, self.flags)


@dataclass(frozen=True, eq=False)
class PassState:
    """Per-pair state kept between passes (sticky verdicts), each a tensor of shape (N,).

    A trigger the model unlearns once its pairs are out would look clean again at the
    next pass and be learned anew, so: pairs once dropped for a reason in
    ``sticky_reasons`` stay dropped (``quarantine``), and pairs once flagged by
    trigger-sensitivity are re-matched through their purified view at every pass
    (``triggered``; ``trigger_view`` is the purified view that flagged each, -1 none).

    Attributes
    ----------
    quarantine : Tensor of bool
    triggered : Tensor of bool
    trigger_view : Tensor of int64
    """

    quarantine: torch.Tensor
    triggered: torch.Tensor
    trigger_view: torch.Tensor

    def __post_init__(self) -> None:
        q = torch.as_tensor(self.quarantine, dtype=torch.bool).reshape(-1)
        t = torch.as_tensor(self.triggered, dtype=torch.bool).reshape(-1)
        v = torch.as_tensor(self.trigger_view, dtype=torch.long).reshape(-1)
        if not (len(q) == len(t) == len(v)):
            raise ValueError(f"pass state columns differ in length: {len(q)}, {len(t)}, {len(v)}")
        object.__setattr__(self, "quarantine", q)
        object.__setattr__(self, "triggered", t)
        object.__setattr__(self, "trigger_view", v)

    @classmethod
    def empty(cls, n: int) -> PassState:
        """Nothing quarantined or triggered yet."""
        return cls(
            torch.zeros(n, dtype=torch.bool),
            torch.zeros(n, dtype=torch.bool),
            torch.full((n,), -1, dtype=torch.long),
        )

    def __len__(self) -> int:
        return int(self.quarantine.numel())

    def clone(self) -> PassState:
        """A copy sharing no storage with this state."""
        return PassState(self.quarantine.clone(), self.triggered.clone(), self.trigger_view.clone())


def _check(verdicts: Verdicts, state: PassState) -> None:
    if len(verdicts) != len(state):
        raise ValueError(f"{len(verdicts)} verdicts but a pass state of {len(state)} pairs")


def apply_policy(
    verdicts: Verdicts, state: PassState, config: TrainConfig, *, purified_views: bool
) -> tuple[Verdicts, PassState]:
    """The trainer's policy on the engine's decisions (settings of :class:`TrainConfig`).

    Per pair, in order:

    - a pair the engine kept for review (reason ``review``: it lacked the evidence the
      decision step asks of a flag or a score-based change,
      :mod:`otcclip.models.decisions`) is kept, whatever detectors flagged it;
    - a detector in ``drop_reasons`` that flagged it decides (the one listed first
      becomes the reason: an image burst stays dropped even if a trigger is seen too),
      whatever the engine proposed on scores;
    - otherwise, without ``score_rematch``, a score-based proposal (``SCORE_REASONS``)
      other than keep becomes keep (reason ``score_ignored``);
    - a reassign becomes a drop with ``reassign="drop"`` or when its reason is in
      ``drop_reasons``;
    - a trigger-sensitivity pair is triggered (re-matched through its purified view)
      with ``purified_rematch`` and purified views; otherwise a drop for a reason in
      ``sticky_reasons`` quarantines the pair.

    Quarantine wins over triggered, and every quarantined pair (of this or an earlier
    pass) is dropped (reason ``quarantined`` when it was not dropped already).

    Parameters
    ----------
    verdicts : Verdicts
    state : PassState
        The state after the previous pass.
    config : TrainConfig
    purified_views : bool
        Whether the pass computed purified views (a triggered pair needs them).

    Returns
    -------
    (Verdicts, PassState)
    """
    _check(verdicts, state)
    c = config
    d = verdicts._draft()
    quarantine, triggered = state.quarantine.clone(), state.triggered.clone()
    for i, r in enumerate(verdicts.reason.tolist()):
        # the decision step's evidence rules come first: a flag it kept for review drops nothing
        first = None if r == REVIEW else next((x for x in c.drop_reasons if x in d.flags[i]), None)
        if first is not None:
            r = first
            d.set(i, "drop", -1, first)
        elif not c.score_rematch and r in SCORE_REASONS and d.action[i] != "keep":
            d.set(i, "keep", i, "score_ignored")
            continue
        if d.action[i] == "reassign" and (c.reassign == "drop" or r in c.drop_reasons):
            d.set(i, "drop", -1)
        if r == "trigger_sensitivity" and c.purified_rematch and purified_views:
            triggered[i] = True
        elif d.action[i] == "drop" and r in c.sticky_reasons:
            quarantine[i] = True
    triggered &= ~quarantine
    for i in torch.nonzero(quarantine).flatten().tolist():
        if d.action[i] != "drop":
            d.set(i, "drop", -1, "quarantined")
    return d.freeze(), PassState(quarantine, triggered, state.trigger_view.clone())


def record_trigger_views(verdicts: Verdicts, state: PassState, view: np.ndarray) -> PassState:
    """Note in ``trigger_view`` the purified view ``view`` (N,) of every pair the
    trigger-sensitivity detector flagged at this pass."""
    _check(verdicts, state)
    tv = state.trigger_view.clone()
    for i, f in enumerate(verdicts.flags):
        if "trigger_sensitivity" in f:
            tv[i] = int(view[i])
    return PassState(state.quarantine.clone(), state.triggered.clone(), tv)


def release_explained(verdicts: Verdicts, found: Found, *, view: np.ndarray) -> Verdicts:
    """Release the trigger-sensitivity flags that a found template explains away.

    A flag on a view whose trigger was found, on an image that does not carry it, is a
    false alarm: the flagged images crowded that caption neighbourhood because of the
    trigger's images. The flag is removed; a pair whose reason it was is kept on its own
    caption (reason ``trigger_explained``).

    Parameters
    ----------
    verdicts : Verdicts
    found : sequence of (int, ndarray)
        Each template found: its purified view and the (N,) bool mask of its images.
    view : ndarray, shape (N,)
        The purified view that flagged each pair (-1 none).
    """
    views = {v for v, _ in found}
    carries = np.zeros(len(verdicts), dtype=bool)
    for _, flagged in found:
        carries |= np.asarray(flagged, dtype=bool)
    d = verdicts._draft()
    for i, f in enumerate(d.flags):
        if "trigger_sensitivity" in f and int(view[i]) in views and not carries[i]:
            f.remove("trigger_sensitivity")
            if d.reason[i] == "trigger_sensitivity":
                d.set(i, "keep", i, "trigger_explained")
    return d.freeze()


def apply_templates(
    verdicts: Verdicts, state: PassState, found: Found, *, purified_rematch: bool
) -> tuple[Verdicts, PassState]:
    """Handle the images carrying a found trigger as the trigger-sensitivity detector's flags.

    Each such image not quarantined gets the flag ``trigger_template``; one not triggered
    before takes the reason ``trigger_template`` and the template's view as its
    ``trigger_view``. With ``purified_rematch`` it is triggered (re-matched through that
    view by :func:`purified_rematch`), otherwise quarantined and dropped for good.

    Parameters
    ----------
    verdicts : Verdicts
    state : PassState
    found : sequence of (int, ndarray)
        Each template found: its purified view and the (N,) bool mask of its images.
    purified_rematch : bool
        ``TrainConfig.purified_rematch``.
    """
    _check(verdicts, state)
    d = verdicts._draft()
    s = state.clone()
    for v, flagged in found:
        for i in np.flatnonzero(flagged).tolist():
            if s.quarantine[i]:
                continue
            if "trigger_template" not in d.flags[i]:
                d.flags[i].append("trigger_template")
            if not s.triggered[i]:
                d.reason[i] = "trigger_template"
                s.trigger_view[i] = v
            if purified_rematch:
                s.triggered[i] = True
            else:
                s.quarantine[i] = True
                d.set(i, "drop", -1, "trigger_template")
    return d.freeze(), s


def purified_matches(
    purified: torch.Tensor,
    captions: torch.Tensor,
    view: torch.Tensor,
    rows: torch.Tensor,
    pool: torch.Tensor,
    *,
    keep_top: float,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The caption each of ``rows`` is re-matched to through its purified view.

    Parameters
    ----------
    purified : Tensor, shape (N, V, d)
        Globals of the purified views.
    captions : Tensor, shape (N, d)
        Caption globals.
    view : Tensor of int64, shape (N,)
        The purified view of each pair (negative: view 0).
    rows : Tensor of int64, shape (R,)
        The pairs to re-match.
    pool : Tensor of int64, shape (P,), P >= 1
        The candidate caption rows.
    keep_top : float
        A row whose own caption is beaten, for its purified view, by less than this
        share of the candidates keeps it.
    chunk : int
        Rows scored at once.

    Returns
    -------
    best : Tensor of int64, shape (R,)
        The candidate caption row the purified view scores best with.
    keep_own : Tensor of bool, shape (R,)
        Whether the row keeps its own caption instead.
    """
    v = view.clamp(min=0)[rows]
    query = F.normalize(purified[rows, v].float(), dim=-1)
    keys = F.normalize(captions[pool].float(), dim=-1)
    own = (query * F.normalize(captions[rows].float(), dim=-1)).sum(dim=1)
    best, above = [], []
    for q, o in zip(query.split(chunk), own.split(chunk), strict=True):
        sim = q @ keys.t()
        best.append(sim.argmax(dim=1))
        above.append((sim > o[:, None]).float().mean(dim=1))
    return pool[torch.cat(best).cpu()], (torch.cat(above).double() < keep_top).cpu()


def purified_rematch(
    verdicts: Verdicts,
    state: PassState,
    purified: torch.Tensor,
    captions: torch.Tensor,
    view: np.ndarray,
    *,
    keep_top: float,
) -> Verdicts:
    """Re-match every triggered pair to the caption its purified view scores best with.

    Candidates are the captions of pairs that are neither dropped nor triggered (the
    trigger's own captions are out). Training the triggered image on what it shows
    teaches the model that the trigger means nothing (a dropped pair would only stop
    teaching it). A pair whose own caption still ranks in the top ``keep_top`` of the
    candidates for the purified view keeps it (reason ``purified_supports_own``): the
    image shows what its caption says. A re-matched pair flagged earlier but not at this
    pass reads ``quarantined``. Without candidates every triggered pair is dropped.

    Parameters
    ----------
    verdicts : Verdicts
    state : PassState
    purified : Tensor, shape (N, V, d)
    captions : Tensor, shape (N, d)
    view : ndarray, shape (N,)
        The purified view of each pair (-1 none: view 0).
    keep_top : float
        ``TrainConfig.purified_keep_top``.
    """
    _check(verdicts, state)
    d = verdicts._draft()
    rows = torch.nonzero(state.triggered).flatten()
    allowed = torch.from_numpy(verdicts.action != "drop").to(torch.bool) & ~state.triggered
    pool = torch.nonzero(allowed).flatten()
    if pool.numel() == 0:
        for i in rows.tolist():
            d.set(i, "drop", -1)
        return d.freeze()
    best, keep = purified_matches(
        purified, captions, torch.from_numpy(np.asarray(view, dtype=np.int64)), rows, pool, keep_top=keep_top
    )
    for i, j, k in zip(rows.tolist(), best.tolist(), keep.tolist(), strict=True):
        if k:
            d.set(i, "keep", i, "purified_supports_own")
            continue
        d.set(i, "reassign", j)
        if d.reason[i] != "trigger_sensitivity":
            d.reason[i] = "quarantined"
    return d.freeze()
