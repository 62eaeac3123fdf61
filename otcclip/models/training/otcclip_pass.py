"""OTCCLIP's re-matching passes (DESIGN 2.4): the trainer's policy on the engine's decisions.

At each pass (after the warm-up, then every K epochs, the interval doubling while passes
change nothing: ``rematch_backoff``), ``sanitize_features`` on the current model's
features decides keep / reassign / drop. With ``restart`` (the default) the warm-up
epochs are plain CLIP and only serve the first pass: after it the loop starts the model
again from its initial weights (:meth:`OtcClipPasses.restart_epoch`), so what the warm-up
learnt from the poison is discarded. Image bursts stay dropped (quarantine); the images
the trigger-sensitivity detector ranks highest seed a trigger-template search
(:mod:`otcclip.models.triggers`), every image carrying a found trigger is dropped for good
(or, with ``purified_rematch``, re-matched through its purified view), and the
detector's other flags on that view are released. How the kept, re-matched and dropped
pairs are trained is in :mod:`otcclip.models.training.otcclip_defence`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from otcclip.models.config.training import SCORE_REASONS
from otcclip.models.decisions import Decisions
from otcclip.models.training.defences import Context, Defence
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
        # Sticky verdicts. A trigger the model unlearns once its pairs are out would look
        # clean again at the next pass and be learned anew, so: pairs once dropped for a
        # reason in config.sticky_reasons stay dropped (quarantine), and pairs once flagged
        # by trigger_sensitivity are re-matched through their purified view at every pass
        # (triggered).
        self.quarantine = torch.zeros(ctx.n, dtype=torch.bool)
        self.triggered = torch.zeros(ctx.n, dtype=torch.bool)
        # the purified view (features.PURIFIERS) that flagged each triggered pair, -1 none
        self.trigger_view = torch.full((ctx.n,), -1, dtype=torch.long)
        # the shared triggers found behind the purified views' flags (triggers.py)
        self.templates: list[TriggerTemplate] = []
        # schedule (config.rematch_backoff): epoch of the next pass (None: the fixed
        # schedule of Defence.is_rematch_epoch, until the first pass) and the interval
        self.next_pass: int | None = None
        self.interval = ctx.config.rematch_every

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        none = torch.zeros(self.ctx.n, dtype=torch.bool)
        self.quarantine = state.get("quarantine", none).clone()
        self.triggered = state.get("triggered", none).clone()
        self.trigger_view = state.get(
            "trigger_view", torch.full((self.ctx.n,), -1, dtype=torch.long)
        ).clone()
        self.templates = [
            TriggerTemplate(t["kind"], t["pattern"].clone(), int(t["support"]))
            for t in state.get("templates", [])
            if t is not None
        ]
        # checkpoints written before the adaptive schedule follow the fixed one
        self.next_pass = state.get("next_pass")
        self.interval = int(state.get("interval", self.ctx.config.rematch_every))

    def restart_epoch(self) -> int | None:
        c = self.ctx.config
        return c.warmup_epochs if c.restart and c.warmup_epochs > 0 else None

    def is_rematch_epoch(self, epoch: int) -> bool:
        if self.next_pass is None:
            return super().is_rematch_epoch(epoch)
        return epoch == self.next_pass

    def _schedule_next(self, epoch: int, *, changed: bool) -> int:
        """Set the epoch of the next pass after the pass before ``epoch`` (``config.rematch_backoff``)."""
        c = self.ctx.config
        longest = c.rematch_every * c.rematch_backoff
        self.interval = c.rematch_every if changed else min(2 * self.interval, longest)
        self.next_pass = epoch + self.interval
        return self.next_pass

    def before_epoch(self, epoch: int) -> dict[str, Any]:
        if not self.is_rematch_epoch(epoch):
            return {}
        before = (self.active.clone(), self.match.clone())
        from otcclip.models.sanitize import sanitize_features

        c = self.ctx.config
        img, txt = self.encode_all(local=True)
        cfg = replace(c.sanitize, device=self.ctx.device.type, seed=c.seed)
        purified = self.encode_purified() if "trigger_sensitivity" in cfg.decisions.detectors else None
        decisions = sanitize_features(img, txt, config=cfg, purified=purified)
        action, new_idx, extra = _decision_arrays(decisions, self.ctx.n)
        reasons = [str(r) for r in extra.get("reason", [""] * self.ctx.n)]
        flags = [str(f).split(",") for f in extra.get("detectors", [""] * self.ctx.n)]
        found: list[tuple[int, TemplateSearch]] = []
        if purified is not None and c.template_search:
            found, template_z = self._find_templates(decisions, epoch)
            extra["template_z"] = template_z.tolist()
            self._release_explained(found, decisions.purified_view, action, new_idx, reasons, flags)
        self._apply_verdicts(action, new_idx, reasons, flags, purified_views=purified is not None)
        for i in (i for i, f in enumerate(flags) if "trigger_sensitivity" in f):
            self.trigger_view[i] = int(decisions.purified_view[i])
        self._apply_templates(found, action, new_idx, reasons, flags)
        if purified is not None and bool(self.triggered.any()):
            self._purified_rematch(
                purified, txt.global_, decisions.purified_view, action, new_idx, reasons
            )
        extra["reason"] = reasons
        extra["detectors"] = [",".join(x for x in f if x) for f in flags]
        self.match = torch.where(
            torch.from_numpy(new_idx >= 0), torch.from_numpy(new_idx), torch.arange(self.ctx.n)
        )
        self.active = torch.tensor([a != "drop" for a in action], dtype=torch.bool)
        tab = self._base_table(action)
        tab.update(extra)
        self.write_decisions(epoch, tab)
        changed = not (torch.equal(before[0], self.active) and torch.equal(before[1], self.match))
        return {
            "rematch": {a: action.count(a) for a in ("keep", "reassign", "drop")},
            "rematch_changed": changed,
            "next_rematch": self._schedule_next(epoch, changed=changed),
        }

    def _apply_verdicts(
        self,
        action: list[str],
        new_idx: np.ndarray,
        reasons: list[str],
        flags: list[list[str]],
        *,
        purified_views: bool,
    ) -> None:
        """The trainer's policy on the engine's decisions (in place; see :class:`TrainConfig`)."""
        c = self.ctx.config
        for i, r in enumerate(reasons):
            # a detector in drop_reasons decides, whatever the engine proposed on scores;
            # several: the one listed first (an image burst stays dropped even if a
            # trigger is seen too)
            first = next((d for d in c.drop_reasons if d in flags[i]), None)
            if first is not None:
                r = reasons[i] = first
                action[i], new_idx[i] = "drop", -1
            elif not c.score_rematch and r in SCORE_REASONS and action[i] != "keep":
                action[i], new_idx[i], reasons[i] = "keep", i, "score_ignored"
                continue
            if action[i] == "reassign" and (c.reassign == "drop" or r in c.drop_reasons):
                action[i], new_idx[i] = "drop", -1
            if r == "trigger_sensitivity" and c.purified_rematch and purified_views:
                self.triggered[i] = True
            elif action[i] == "drop" and r in c.sticky_reasons:
                self.quarantine[i] = True
        self.triggered &= ~self.quarantine
        for i in torch.nonzero(self.quarantine).flatten().tolist():
            if action[i] != "drop":
                action[i], new_idx[i], reasons[i] = "drop", -1, "quarantined"

    def _find_templates(
        self, decisions: Any, epoch: int
    ) -> tuple[list[tuple[int, TemplateSearch]], np.ndarray]:
        """Look for the triggers behind each purified view's flags (:mod:`~otcclip.models.triggers`).

        Seeds per view: the ``config.template_pool`` share of pairs most trigger-sensitive
        on that view, pairs whose z there exceeds ``config.template_seed_z`` (no
        neighbourhood test: false alarms share no pattern), and pairs already flagged
        through it; image bursts (quarantined, never trigger-flagged) are left out.
        Returns ``(view, search)`` for every template found, and the (N,) largest
        template z over the searches (0 where none).
        """
        c, n = self.ctx.config, self.ctx.n
        z = np.nan_to_num(np.asarray(decisions.sensitivity_z, dtype=np.float64), nan=-np.inf)
        view = np.asarray(decisions.purified_view)
        gen = torch.Generator().manual_seed(c.seed * 7919 + epoch)
        found: list[tuple[int, TemplateSearch]] = []
        best = np.zeros(n)
        for v, kind in enumerate(TEMPLATE_KINDS):
            on_view = np.where(view == v, z, -np.inf)
            top = np.argsort(-on_view, kind="stable")[: int(round(c.template_pool * n))]
            seeds = (on_view > c.template_seed_z) | (self.trigger_view.numpy() == v)
            seeds[top[np.isfinite(on_view[top])]] = True
            seeds &= ~(self.quarantine.numpy() & (self.trigger_view.numpy() < 0))  # image bursts
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

    def _release_explained(
        self,
        found: list[tuple[int, TemplateSearch]],
        view: np.ndarray,
        action: list[str],
        new_idx: np.ndarray,
        reasons: list[str],
        flags: list[list[str]],
    ) -> None:
        """A pass's trigger-sensitivity flag on a view whose trigger was found, on an image
        that does not carry it, is a false alarm (reason ``trigger_explained``, kept): the
        flagged images crowded that caption neighbourhood because of the trigger's images.
        """
        views = {v for v, _ in found}
        carries = np.zeros(len(action), dtype=bool)
        for _, r in found:
            carries |= r.flagged
        for i, f in enumerate(flags):
            if "trigger_sensitivity" in f and int(view[i]) in views and not carries[i]:
                f.remove("trigger_sensitivity")
                if reasons[i] == "trigger_sensitivity":
                    action[i], new_idx[i], reasons[i] = "keep", i, "trigger_explained"

    def _apply_templates(
        self,
        found: list[tuple[int, TemplateSearch]],
        action: list[str],
        new_idx: np.ndarray,
        reasons: list[str],
        flags: list[list[str]],
    ) -> None:
        """Images carrying a found trigger are handled as the trigger-sensitivity detector's
        flags (reason ``trigger_template``): re-matched through their purified view, or
        dropped for good when ``purified_rematch`` is off."""
        c = self.ctx.config
        for v, res in found:
            for i in np.flatnonzero(res.flagged).tolist():
                if self.quarantine[i]:
                    continue
                if "trigger_template" not in flags[i]:
                    flags[i].append("trigger_template")
                if not self.triggered[i]:
                    reasons[i] = "trigger_template"
                    self.trigger_view[i] = v
                if c.purified_rematch:
                    self.triggered[i] = True
                else:
                    self.quarantine[i] = True
                    action[i], new_idx[i], reasons[i] = "drop", -1, "trigger_template"

    def _purified_rematch(
        self,
        purified: torch.Tensor,
        captions: torch.Tensor,
        view: np.ndarray,
        action: list[str],
        new_idx: np.ndarray,
        reasons: list[str],
    ) -> None:
        """Re-match every triggered pair to the caption its purified view scores best with.

        Candidates are the captions of pairs that are neither dropped nor triggered (the
        trigger's own captions are out). Training the triggered image on what it shows
        teaches the model that the trigger means nothing (a dropped pair would only stop
        teaching it). A pair whose own caption still ranks in the top
        ``config.purified_keep_top`` of the candidates for the purified view keeps it
        (reason ``purified_supports_own``): the image shows what its caption says.
        ``purified`` (N, V, d), ``captions`` (N, d), ``view`` (N,).
        """
        rows = torch.nonzero(self.triggered).flatten()
        allowed = torch.tensor([a != "drop" for a in action], dtype=torch.bool) & ~self.triggered
        pool = torch.nonzero(allowed).flatten()
        if pool.numel() == 0:
            for i in rows.tolist():
                action[i], new_idx[i] = "drop", -1
            return
        v = torch.from_numpy(np.maximum(view, 0))[rows]
        query = F.normalize(purified[rows, v].float(), dim=-1)
        keys = F.normalize(captions[pool].float(), dim=-1)
        own = (query * F.normalize(captions[rows].float(), dim=-1)).sum(dim=1)
        best, above = [], []
        for q, o in zip(query.split(4096), own.split(4096), strict=True):
            sim = q @ keys.t()
            best.append(sim.argmax(dim=1))
            above.append((sim > o[:, None]).float().mean(dim=1))
        top = self.ctx.config.purified_keep_top
        for i, j, a in zip(
            rows.tolist(), pool[torch.cat(best)].tolist(), torch.cat(above).tolist(), strict=True
        ):
            if a < top:
                action[i], new_idx[i], reasons[i] = "keep", i, "purified_supports_own"
                continue
            action[i], new_idx[i] = "reassign", j
            if reasons[i] != "trigger_sensitivity":
                reasons[i] = "quarantined"


def _decision_arrays(decisions: Decisions, n: int) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """The engine's decisions as the trainer edits them: actions, new caption rows (-1:
    drop) and every other per-pair column (written to the pass's decisions file)."""
    if len(decisions) != n:
        raise RuntimeError(f"sanitize_features returned {len(decisions)} decisions for {n} pairs")
    table = decisions.to_arrow()
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    action = [str(a) for a in cols.pop("action")]
    new_idx = np.array([-1 if v is None else int(v) for v in cols.pop("new_caption_index")], dtype=np.int64)
    cols.pop("id", None)
    extra = {k: v for k, v in cols.items() if not isinstance(v[0] if v else 0, list | dict)}
    return action, new_idx, extra
