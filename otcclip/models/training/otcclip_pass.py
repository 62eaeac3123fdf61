"""OTCCLIP's re-matching passes (DESIGN 2.4): the trainer's policy on the engine's decisions.

At each pass (after the warm-up, then every K epochs, the interval doubling while passes
change nothing: ``rematch_backoff``; no later pass with fewer than K epochs left), ``sanitize_features`` on the current model's
features decides keep / reassign / drop. With ``restart`` (the default) the warm-up
epochs are plain CLIP and serve the first pass: when it drops or re-matches pairs the loop
starts the model again from its initial weights (:meth:`OtcClipPasses.restart_epoch`), so
what the warm-up learnt from the poison is discarded; when it changes nothing (clean
data, or poison it did not find) training goes on from the warm-up model, whose epochs
then count towards ``epochs``. Image bursts stay dropped (quarantine); the images
the trigger-sensitivity detector ranks highest seed a trigger-template search
(:mod:`otcclip.models.triggers`), every image carrying a found trigger is dropped for good
(or, with ``purified_rematch``, re-matched through its purified view), and the
detector's other flags on that view are released. How the kept, re-matched and dropped
pairs are trained is in :mod:`otcclip.models.training.otcclip_defence`; the policy itself,
as pure functions on :class:`~otcclip.models.training.verdicts.Verdicts`, is in
:mod:`otcclip.models.training.verdicts`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from otcclip.models.decisions import Decisions
from otcclip.models.training.defences import Context, Defence
from otcclip.models.training.verdicts import (
    PassState,
    Verdicts,
    apply_policy,
    apply_templates,
    purified_rematch,
    record_trigger_views,
    release_explained,
)
from otcclip.models.triggers import (
    TEMPLATE_KINDS,
    TemplateSearch,
    TriggerTemplate,
    search_templates,
)

log = logging.getLogger(__name__)


class OtcClipPasses(Defence):
    """OTCCLIP's per-pair state and its re-matching passes (the training side is :class:`~otcclip.models.training.otcclip_defence.OtcClip`)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        # sticky verdicts between passes (quarantine, triggered, trigger_view)
        self.state = PassState.empty(ctx.n)
        # the shared triggers found behind the purified views' flags (triggers.py)
        self.templates: list[TriggerTemplate] = []
        # schedule (config.rematch_backoff): epoch of the next pass (None: the fixed
        # schedule of Defence.is_rematch_epoch, until the first pass) and the interval
        self.next_pass: int | None = None
        self.interval = ctx.config.rematch_every
        # set by a first pass that changed no pair (config.restart_unchanged off): the
        # warm-up model trained on exactly the data the run goes on with, so it is kept
        self.skip_restart = False

    @property
    def quarantine(self) -> torch.Tensor:
        """(N,) bool: pairs dropped for good (:class:`~otcclip.models.training.verdicts.PassState`)."""
        return self.state.quarantine

    @property
    def triggered(self) -> torch.Tensor:
        """(N,) bool: pairs re-matched through their purified view at every pass."""
        return self.state.triggered

    @property
    def trigger_view(self) -> torch.Tensor:
        """(N,) int64: the purified view that flagged each triggered pair, -1 none."""
        return self.state.trigger_view

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "quarantine": self.quarantine.clone(),
            "triggered": self.triggered.clone(),
            "trigger_view": self.trigger_view.clone(),
            "templates": [
                {"kind": t.kind, "pattern": t.pattern.clone(), "support": t.support}
                for t in self.templates
            ],
            "next_pass": self.next_pass,
            "interval": self.interval,
            "skip_restart": self.skip_restart,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; every key is required (``KeyError`` otherwise) but
        ``skip_restart``, which checkpoints of versions that always restarted lack."""
        super().load_state_dict(state)
        self.state = PassState(
            state["quarantine"].clone(), state["triggered"].clone(), state["trigger_view"].clone()
        )
        if len(self.state) != self.ctx.n:
            raise ValueError(f"pass state of {len(self.state)} pairs for a run of {self.ctx.n}")
        self.templates = [
            TriggerTemplate(t["kind"], t["pattern"].clone(), int(t["support"]))
            for t in state["templates"]
            if t is not None
        ]
        self.next_pass = state["next_pass"]
        self.interval = int(state["interval"])
        self.skip_restart = bool(state.get("skip_restart", False))

    def restart_epoch(self) -> int | None:
        """The warm-up's end (``config.warmup_epochs``) with ``config.restart``, until a
        first pass that changed no pair sets :attr:`skip_restart` (then None): a restart
        discards what the warm-up learnt from the poison the pass removed, and where it
        removed nothing it would only repeat the warm-up epochs."""
        c = self.ctx.config
        return c.warmup_epochs if c.restart and c.warmup_epochs > 0 and not self.skip_restart else None

    def call_restart(self, *, changed: bool) -> None:
        """After the first pass: skip the restart (:attr:`skip_restart`) unless the pass
        ``changed`` a pair's verdict, found a trigger template or marked pairs triggered
        (with ``purified_rematch`` those keep a caption, yet the warm-up learnt the
        trigger), or ``config.restart_unchanged`` asks for it anyway."""
        c = self.ctx.config
        found = bool(self.templates) or bool(self.triggered.any())
        self.skip_restart = not (changed or found or c.restart_unchanged)

    def planned_epochs(self) -> int:
        """As :meth:`Defence.planned_epochs`; once :attr:`skip_restart` is set the
        detection epochs count towards ``config.epochs``, and at least one epoch follows
        the first pass (never more than a restart would train)."""
        if self.skip_restart:
            return max(self.ctx.config.epochs, self.ctx.config.warmup_epochs + 1)
        return super().planned_epochs()

    def is_rematch_epoch(self, epoch: int) -> bool:
        """The first pass at the end of the warm-up; a later one at the first epoch from
        :attr:`next_pass` on that leaves at least ``config.rematch_every`` epochs to
        train: a pass costs about an epoch of steps, and one that would steer less
        training than the interval between passes is put off. Within a run's plan it
        never comes; a run resumed with more ``epochs`` gets it at its first epoch."""
        if self.next_pass is None:
            return super().is_rematch_epoch(epoch)
        return epoch >= self.next_pass and self.planned_epochs() - epoch >= self.ctx.config.rematch_every

    def schedule_next(self, epoch: int, *, changed: bool) -> int:
        """Set and return the epoch of the next pass after the pass before ``epoch``.

        ``config.rematch_every`` after a pass that ``changed`` the verdicts, otherwise
        twice the last interval, up to ``rematch_every * rematch_backoff``.
        """
        c = self.ctx.config
        longest = c.rematch_every * c.rematch_backoff
        self.interval = c.rematch_every if changed else min(2 * self.interval, longest)
        self.next_pass = epoch + self.interval
        return self.next_pass

    def wants_purified(self) -> bool:
        """Whether this pass computes the purified views (``config.later_purified``).

        The first pass does when the trigger-sensitivity detector is on; a later one only
        with ``later_purified``, or when ``purified_rematch`` has triggered pairs to
        re-match through their views. Without them the pass's trigger-sensitivity detector
        flags nothing and no template is searched: the first pass's quarantine (sticky)
        and templates stand.
        """
        c = self.ctx.config
        if "trigger_sensitivity" not in c.sanitize.decisions.detectors:
            return False
        first = self.next_pass is None
        return first or c.later_purified or (c.purified_rematch and bool(self.triggered.any()))

    def before_epoch(self, epoch: int) -> dict[str, Any]:
        if not self.is_rematch_epoch(epoch):
            return {}
        before = (self.active.clone(), self.match.clone())
        from otcclip.models.sanitize import sanitize_features

        c = self.ctx.config
        clock = _Clock()
        img, txt = self.encode_all(local=True)
        clock.lap("encode")
        cfg = replace(c.sanitize, device=self.ctx.device.type, seed=c.seed)
        if self.next_pass is not None and c.first_pass_detectors:  # a later pass
            dec = cfg.decisions
            cfg = replace(cfg, decisions=replace(dec, detectors=tuple(d for d in dec.detectors if d not in c.first_pass_detectors)))
        wants = self.wants_purified() and "trigger_sensitivity" in cfg.decisions.detectors
        purified = self.encode_purified() if wants else None
        clock.lap("purified")
        needs_thumbs = {"collapse", "duplicates"} & set(cfg.decisions.detectors)
        thumbs = self.encode_thumbs() if needs_thumbs else None
        clock.lap("thumbs")
        decisions = sanitize_features(img, txt, config=cfg, purified=purified, thumbs=thumbs)
        clock.lap("decisions")
        extra = _decision_columns(decisions, self.ctx.n)
        verdicts = Verdicts.from_decisions(decisions)
        view = np.asarray(decisions.purified_view)
        found: list[tuple[int, np.ndarray]] = []
        if purified is not None and c.template_search:
            searches, template_z = self.find_templates(decisions, epoch)
            found = [(v, res.flagged) for v, res in searches]
            extra["template_z"] = template_z.tolist()
            verdicts = release_explained(verdicts, found, view=view)
        clock.lap("templates")
        verdicts, state = apply_policy(verdicts, self.state, c, purified_views=purified is not None)
        state = record_trigger_views(verdicts, state, view)
        verdicts, state = apply_templates(verdicts, state, found, purified_rematch=c.purified_rematch)
        if purified is not None and bool(state.triggered.any()):
            verdicts = purified_rematch(
                verdicts, state, purified, txt.global_, view, keep_top=c.purified_keep_top
            )
        self.state = state
        extra["reason"] = verdicts.reason.tolist()
        extra["detectors"] = verdicts.detectors()
        new = torch.from_numpy(verdicts.new_caption_index.copy())
        self.match = torch.where(new >= 0, new, torch.arange(self.ctx.n))
        self.active = torch.from_numpy(verdicts.action != "drop").to(torch.bool)
        tab = self._base_table(verdicts.action.tolist())
        tab.update(extra)
        self.write_decisions(epoch, tab)
        changed = not (torch.equal(before[0], self.active) and torch.equal(before[1], self.match))
        if self.next_pass is None:
            self.call_restart(changed=changed)
        clock.lap("policy")
        return {
            "pass_time_s": clock.laps,
            "pass_cpu_s": clock.cpu,
            "rematch": verdicts.counts(),
            "rematch_changed": changed,
            "next_rematch": self.schedule_next(epoch, changed=changed),
        }

    def find_templates(
        self, decisions: Any, epoch: int
    ) -> tuple[list[tuple[int, TemplateSearch]], np.ndarray]:
        """Look for the triggers behind each purified view's flags (:mod:`~otcclip.models.triggers`).

        Seeds per view: the ``config.template_pool`` share of pairs most trigger-sensitive
        on that view, pairs whose z there exceeds ``config.template_seed_z`` (no
        neighbourhood test: false alarms share no pattern), and pairs already flagged
        through it; image bursts (quarantined, never trigger-flagged) are left out.
        The templates found replace those of the same kind in :attr:`templates`.

        Parameters
        ----------
        decisions : Decisions
            The pass's decisions (``sensitivity_z`` and ``purified_view`` are read).
        epoch : int
            Seeds the cross-fitting split.

        Returns
        -------
        found : list of (int, TemplateSearch)
            ``(view, search)`` for every template found.
        best : ndarray, shape (N,)
            The largest template z over the searches (0 where none).
        """
        c, n = self.ctx.config, self.ctx.n
        z = np.nan_to_num(np.asarray(decisions.sensitivity_z, dtype=np.float64), nan=-np.inf)
        view = np.asarray(decisions.purified_view)
        gen = torch.Generator().manual_seed(c.seed * 7919 + epoch)
        found: list[tuple[int, TemplateSearch]] = []
        best = np.zeros(n)
        trigger_view, quarantine = self.trigger_view.numpy(), self.quarantine.numpy()
        for v, kind in enumerate(TEMPLATE_KINDS):
            on_view = np.where(view == v, z, -np.inf)
            top = np.argsort(-on_view, kind="stable")[: int(round(c.template_pool * n))]
            seeds = (on_view > c.template_seed_z) | (trigger_view == v)
            seeds[top[np.isfinite(on_view[top])]] = True
            seeds &= ~(quarantine & (trigger_view < 0))  # image bursts
            for res in search_templates(
                lambda idx: self.ctx.batch_images(idx, None), n, seeds, kind=kind, generator=gen
            ):
                assert res.template is not None
                log.info(
                    "epoch %d: %s trigger template matches %d images",
                    epoch,
                    kind,
                    res.template.support,
                )
                found.append((v, res))
                best = np.maximum(best, res.z)
        if found:
            kept = [
                t for t in self.templates if t.kind not in {TEMPLATE_KINDS[v] for v, _ in found}
            ]
            self.templates = kept + [r.template for _, r in found if r.template is not None]
        return found, best


class _Clock:
    """Wall and CPU seconds per named section of a pass (``pass_time_s`` and
    ``pass_cpu_s`` in the epoch's metrics)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t, self._c = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.laps[name] = round(now - self._t, 3)
        self.cpu[name] = round(cpu - self._c, 3)
        self._t, self._c = now, cpu


def _decision_columns(decisions: Decisions, n: int) -> dict[str, Any]:
    """Every per-pair column of the engine's decisions but the verdict ones (``action``,
    ``new_caption_index``, ``id``), as lists: written to the pass's decisions file."""
    if len(decisions) != n:
        raise RuntimeError(f"sanitize_features returned {len(decisions)} decisions for {n} pairs")
    table = decisions.to_arrow()
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    for name in ("action", "new_caption_index", "id"):
        cols.pop(name, None)
    return {k: v for k, v in cols.items() if not isinstance(v[0] if v else 0, list | dict)}
