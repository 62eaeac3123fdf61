"""The defences sharing one training loop (DESIGN 2.4).

Each defence keeps a per-pair state (which caption an image is trained with, and which
pairs enter the CLIP loss), may update it before an epoch (re-match / re-split), and
computes the loss of a batch.

- ``none``: plain CLIP on the pairs as given.
- ``roclip``: after warm-up, every K epochs each image is re-paired with the caption of a
  fresh random pool (``pool_fraction`` of the data, own caption excluded) that is nearest
  to its own caption by global text similarity (RoCLIP).
- ``safeclip``: unimodal warm-up (SimCLR on images and on captions; the last warm-up
  epoch adds CLIP), then every K epochs a 2-component GMM on the pair cosines splits
  safe / risky; CLIP loss on safe pairs, unimodal losses on risky ones (SafeCLIP).
- ``otcclip``: warm-up with the full loss on own captions, then every K epochs the
  engine's ``sanitize_features`` on the current model's features decides keep / reassign
  / drop; training uses the re-matched captions, dropped pairs only feed ``L_intra``.
  Loss ``L_CLIP + lam_inter * L_inter + lam_intra * L_intra``. Verdicts are sticky:
  image bursts (targeted poisoning) stay dropped and are unlearnt (unlikelihood term),
  and pairs the trigger-sensitivity detector flagged are re-matched at every pass to the
  caption their purified view (the trigger filtered out) scores best with; what that
  view removed is stamped on clean images of each batch, which keep their captions
  (inoculation). The engine's score-based decisions apply only with ``score_rematch``
  (see :class:`TrainConfig`).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from otcclip.models.atomic import atomic_write
from otcclip.models.features import (
    ImageFeatures,
    TextFeatures,
    image_features,
    purified_image_global,
    text_features,
    trigger_residual,
)
from otcclip.models.training.augment import augment_caption, augment_images, normalize
from otcclip.models.training.config import (
    SCORE_REASONS,
    TRAINER_LEAN_K,
    TRAINER_SANITIZE,
    TrainConfig,
)
from otcclip.models.training.data import ImageSource
from otcclip.models.training.losses import clip_loss, nt_xent, ot_alignment_loss, unlikelihood_loss

log = logging.getLogger(__name__)


@dataclass
class Context:
    """Everything a defence needs: model, data and options of the run."""

    model: Any
    tokenizer: Any
    config: TrainConfig
    images: ImageSource
    captions: list[str]
    ids: list[str]
    tokens: torch.Tensor  # (N, context_length) int64
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    run_dir: Path

    @property
    def n(self) -> int:
        return len(self.captions)

    def batch_images(self, idx: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Normalised (augmented when ``gen`` is given) images of rows ``idx`` on the device."""
        pix, _ = self.images[idx]
        x = normalize(pix.to(self.device), self.mean, self.std)
        return augment_images(x, gen) if gen is not None else x


class Defence:
    """Plain CLIP (``none``); base class of the others."""

    name = "none"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.match = torch.arange(ctx.n)  # caption index each image is trained with
        self.active = torch.ones(ctx.n, dtype=torch.bool)  # pairs in the CLIP loss

    # --- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"match": self.match.clone(), "active": self.active.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.match = state["match"].clone()
        self.active = state["active"].clone()

    # --- schedule --------------------------------------------------------------------
    def is_rematch_epoch(self, epoch: int) -> bool:
        c = self.ctx.config
        return epoch >= c.warmup_epochs and (epoch - c.warmup_epochs) % c.rematch_every == 0

    def before_epoch(self, epoch: int) -> dict[str, Any]:
        """Update the per-pair state before ``epoch`` (0-based); returns counts for metrics."""
        return {}

    # --- loss ------------------------------------------------------------------------
    def batch_loss(self, idx: torch.Tensor, epoch: int, gen: torch.Generator, rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.ctx.model
        use = idx[self.active[idx]]
        x = self.ctx.batch_images(use, gen)
        img = F.normalize(m.encode_image(x), dim=-1)
        txt = F.normalize(m.encode_text(self.ctx.tokens[self.match[use]].to(self.ctx.device)), dim=-1)
        loss = clip_loss(img, txt, m.logit_scale.exp())
        return loss, {"clip": float(loss.detach())}

    # --- helpers ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_all(self, *, local: bool) -> tuple[ImageFeatures, TextFeatures]:
        """Features of every image (eval view) and caption with the current model."""
        m, ctx = self.ctx.model, self.ctx
        was_training = m.training
        m.eval()
        bs = max(ctx.config.batch_size, 256)
        ig, il, tg, tl, tm = [], [], [], [], []
        for s in range(0, ctx.n, bs):
            idx = torch.arange(s, min(s + bs, ctx.n))
            x = ctx.batch_images(idx, None)
            toks = ctx.tokens[idx].to(ctx.device)
            if local:
                fi = image_features(m, x)
                ft = text_features(m, toks)
                ig.append(fi.global_.cpu())
                il.append(fi.local.cpu())
                tg.append(ft.global_.cpu())
                tl.append(ft.local.cpu())
                tm.append(ft.mask.cpu())
            else:
                ig.append(F.normalize(m.encode_image(x), dim=-1).cpu())
                tg.append(F.normalize(m.encode_text(toks), dim=-1).cpu())
        m.train(was_training)
        if local:
            length = max(t.shape[1] for t in tl)
            tl = [F.pad(t, (0, 0, 0, length - t.shape[1])) for t in tl]
            tm = [F.pad(t, (0, length - t.shape[1]), value=False) for t in tm]
            return (
                ImageFeatures(torch.cat(ig), torch.cat(il)),
                TextFeatures(torch.cat(tg), torch.cat(tl), torch.cat(tm)),
            )
        empty = torch.zeros(0)
        return ImageFeatures(torch.cat(ig), empty), TextFeatures(torch.cat(tg), empty, empty)

    @torch.no_grad()
    def encode_purified(self) -> torch.Tensor:
        """Globals of every image's purified views (eval view), shape (N, V, d)."""
        m, ctx = self.ctx.model, self.ctx
        was_training = m.training
        m.eval()
        bs = max(ctx.config.batch_size, 256)
        out = [
            purified_image_global(m, ctx.batch_images(torch.arange(s, min(s + bs, ctx.n)), None)).cpu()
            for s in range(0, ctx.n, bs)
        ]
        m.train(was_training)
        return torch.cat(out)

    def unimodal_loss(self, idx: torch.Tensor, gen: torch.Generator, rng: random.Random) -> torch.Tensor:
        """SimCLR on two augmented views of the images plus caption vs edited caption."""
        m, ctx = self.ctx.model, self.ctx
        if idx.numel() < 2:
            return ctx.model.logit_scale.sum() * 0.0
        x1 = ctx.batch_images(idx, gen)
        x2 = ctx.batch_images(idx, gen)
        a = F.normalize(m.encode_image(torch.cat([x1, x2])), dim=-1)
        li = nt_xent(a[: len(idx)], a[len(idx) :], temperature=ctx.config.unimodal_temperature)
        caps = [ctx.captions[int(i)] for i in idx]
        aug = ctx.tokenizer([augment_caption(c, rng) for c in caps])
        t = F.normalize(m.encode_text(torch.cat([ctx.tokens[idx], aug]).to(ctx.device)), dim=-1)
        lt = nt_xent(t[: len(idx)], t[len(idx) :], temperature=ctx.config.unimodal_temperature)
        return li + lt

    def write_decisions(self, epoch: int, table: dict[str, Any]) -> Path:
        """Write ``run_dir/rematch/epoch_NNN/decisions.parquet`` atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.ctx.run_dir / "rematch" / f"epoch_{epoch:03d}" / "decisions.parquet"
        return atomic_write(path, lambda tmp: pq.write_table(pa.table(table), tmp))

    def _base_table(self, action: list[str]) -> dict[str, Any]:
        ctx = self.ctx
        match = self.match.tolist()
        return {
            "id": ctx.ids,
            "action": action,
            "caption_index": match,
            "original_caption": ctx.captions,
            "new_caption": [ctx.captions[j] for j in match],
        }


class RoClip(Defence):
    name = "roclip"

    def before_epoch(self, epoch: int) -> dict[str, Any]:
        if not self.is_rematch_epoch(epoch):
            return {}
        ctx = self.ctx
        _, txt = self.encode_all(local=False)
        g = torch.Generator().manual_seed(ctx.config.seed * 7919 + epoch)
        k = max(2, int(math.ceil(ctx.config.pool_fraction * ctx.n)))
        pool = torch.randperm(ctx.n, generator=g)[:k]
        sim = txt.global_ @ txt.global_[pool].t()  # (N, k)
        sim[pool, torch.arange(k)] = -2.0  # never the own caption
        self.match = pool[sim.argmax(dim=1)]
        action = ["keep" if int(j) == i else "reassign" for i, j in enumerate(self.match.tolist())]
        tab = self._base_table(action)
        tab["similarity"] = sim.max(dim=1).values.numpy()
        self.write_decisions(epoch, tab)
        return {"rematch": {"keep": action.count("keep"), "reassign": action.count("reassign"), "drop": 0}}


class SafeClip(Defence):
    name = "safeclip"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.safe = torch.ones(ctx.n, dtype=torch.bool)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "safe": self.safe.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.safe = state["safe"].clone()

    def before_epoch(self, epoch: int) -> dict[str, Any]:
        if not self.is_rematch_epoch(epoch):
            return {}
        from sklearn.mixture import GaussianMixture

        img, txt = self.encode_all(local=False)
        cos = (img.global_ * txt.global_).sum(1).numpy().astype(np.float64)
        gmm = GaussianMixture(2, random_state=self.ctx.config.seed).fit(cos[:, None])
        hi = int(np.argmax(gmm.means_.ravel()))
        post = gmm.predict_proba(cos[:, None])[:, hi]
        self.safe = torch.from_numpy(post >= self.ctx.config.safe_threshold)
        action = ["keep" if s else "risky" for s in self.safe.tolist()]
        tab = self._base_table(action)
        tab["cosine"] = cos
        tab["p_clean"] = post
        self.write_decisions(epoch, tab)
        n_safe = int(self.safe.sum())
        return {"rematch": {"keep": n_safe, "risky": self.ctx.n - n_safe}}

    def batch_loss(self, idx: torch.Tensor, epoch: int, gen: torch.Generator, rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.ctx.config
        if epoch < c.warmup_epochs:
            uni = self.unimodal_loss(idx, gen, rng)
            terms = {"unimodal": float(uni.detach())}
            if epoch == c.warmup_epochs - 1:
                clip, t = super().batch_loss(idx, epoch, gen, rng)
                return uni + clip, {**terms, **t}
            return uni, terms
        safe = idx[self.safe[idx]]
        risky = idx[~self.safe[idx]]
        m = self.ctx.model
        x = self.ctx.batch_images(safe, gen)
        img = F.normalize(m.encode_image(x), dim=-1)
        txt = F.normalize(m.encode_text(self.ctx.tokens[safe].to(self.ctx.device)), dim=-1)
        clip = clip_loss(img, txt, m.logit_scale.exp())
        uni = self.unimodal_loss(risky, gen, rng)
        return clip + uni, {"clip": float(clip.detach()), "unimodal": float(uni.detach())}


class OtcClip(Defence):
    name = "otcclip"

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

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(), "quarantine": self.quarantine.clone(), "triggered": self.triggered.clone(),
            "trigger_view": self.trigger_view.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        none = torch.zeros(self.ctx.n, dtype=torch.bool)
        self.quarantine = state.get("quarantine", none).clone()
        self.triggered = state.get("triggered", none).clone()
        self.trigger_view = state.get("trigger_view", torch.full((self.ctx.n,), -1, dtype=torch.long)).clone()

    def before_epoch(self, epoch: int) -> dict[str, Any]:
        if not self.is_rematch_epoch(epoch):
            return {}
        from otcclip.models.sanitize import SanitizeConfig, sanitize_features

        c = self.ctx.config
        img, txt = self.encode_all(local=True)
        lean = {} if c.score_rematch else {"k": TRAINER_LEAN_K}
        cfg = SanitizeConfig(**{"device": self.ctx.device.type, "seed": c.seed, **TRAINER_SANITIZE, **lean, **c.sanitize})
        purified = self.encode_purified() if "trigger_sensitivity" in cfg.detectors else None
        decisions = sanitize_features(img, txt, config=cfg, purified=purified)
        action, new_idx, extra = _decision_arrays(decisions, self.ctx.n)
        reasons = [str(r) for r in extra.get("reason", [""] * self.ctx.n)]
        flags = [str(f).split(",") for f in extra.get("detectors", [""] * self.ctx.n)]
        self._apply_verdicts(action, new_idx, reasons, flags, purified_views=purified is not None)
        for i in (i for i, f in enumerate(flags) if "trigger_sensitivity" in f):
            self.trigger_view[i] = int(decisions.purified_view[i])
        if purified is not None and bool(self.triggered.any()):
            self._purified_rematch(purified, txt.global_, decisions.purified_view, action, new_idx, reasons)
        extra["reason"] = reasons
        self.match = torch.where(torch.from_numpy(new_idx >= 0), torch.from_numpy(new_idx), torch.arange(self.ctx.n))
        self.active = torch.tensor([a != "drop" for a in action], dtype=torch.bool)
        tab = self._base_table(action)
        tab.update(extra)
        self.write_decisions(epoch, tab)
        return {"rematch": {a: action.count(a) for a in ("keep", "reassign", "drop")}}

    def _apply_verdicts(
        self, action: list[str], new_idx: np.ndarray, reasons: list[str], flags: list[list[str]], *, purified_views: bool,
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

    def _purified_rematch(
        self, purified: torch.Tensor, captions: torch.Tensor, view: np.ndarray,
        action: list[str], new_idx: np.ndarray, reasons: list[str],
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
        for i, j, a in zip(rows.tolist(), pool[torch.cat(best)].tolist(), torch.cat(above).tolist(), strict=True):
            if a < top:
                action[i], new_idx[i], reasons[i] = "keep", i, "purified_supports_own"
                continue
            action[i], new_idx[i] = "reassign", j
            if reasons[i] != "trigger_sensitivity":
                reasons[i] = "quarantined"

    def batch_loss(self, idx: torch.Tensor, epoch: int, gen: torch.Generator, rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        ctx, c, m = self.ctx, self.ctx.config, self.ctx.model
        x = self.inoculate(idx, ctx.batch_images(idx, gen), gen)
        fi = image_features(m, x)
        act = self.active[idx]
        use = idx[act]
        ft = text_features(m, ctx.tokens[self.match[use]].to(ctx.device))
        gi = fi.global_[act.to(ctx.device)]
        clip = clip_loss(gi, ft.global_, m.logit_scale.exp())
        loss = clip
        terms = {"clip": float(clip.detach())}
        if c.lam_inter > 0 and use.numel():
            inter = ot_alignment_loss(fi.local[act.to(ctx.device)], ft.local, y_mask=ft.mask, reg=c.ot_reg, iters=c.ot_iters)
            loss = loss + c.lam_inter * inter
            terms["inter"] = float(inter.detach())
        if c.lam_intra > 0 and c.intra_subsample > 0:
            intra = self._intra(idx, fi, act, gen, rng)
            loss = loss + c.lam_intra * intra
            terms["intra"] = float(intra.detach())
        bad = self.unlearn_rows(idx)
        if c.lam_unlearn > 0 and bool(bad.any()) and use.numel():
            # dropping a quarantined pair (re-matching a triggered one) stops teaching its
            # poison; this unlearns it
            own = text_features(m, ctx.tokens[idx[bad]].to(ctx.device)).global_
            un = unlikelihood_loss(fi.global_[bad.to(ctx.device)], own, ft.global_, m.logit_scale.exp())
            loss = loss + c.lam_unlearn * un
            terms["unlearn"] = float(un.detach())
        return loss, terms

    def inoculate(self, idx: torch.Tensor, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Stamp what triggered images lose in their purified view onto clean ones.

        A share ``config.inoculate`` of the batch's clean pairs (active, neither triggered
        nor quarantined) gets the :func:`~otcclip.models.features.trigger_residual` of a
        random image the trigger-sensitivity detector flagged (re-matched through its
        view, or dropped), and keeps its own caption: the
        model learns that the trigger does not change what an image shows, on every
        class (the unlearning step of Neural Cleanse, with the trigger taken from the
        flagged images instead of reverse-engineered). Poisoned pairs the detector
        missed then teach a trigger the rest of the data contradicts.

        Parameters
        ----------
        idx : Tensor, shape (B,)
        x : Tensor, shape (B, C, H, W)
            The batch's normalised (augmented) images.

        Returns
        -------
        Tensor, shape (B, C, H, W)
        """
        share = self.ctx.config.inoculate
        moved = self.quarantine | (self.triggered & (self.match != torch.arange(self.ctx.n)))
        donors = torch.nonzero(moved & (self.trigger_view >= 0)).flatten()
        if share <= 0 or donors.numel() == 0:
            return x
        hosts = torch.nonzero(self.active[idx] & ~self.triggered[idx] & ~self.quarantine[idx]).flatten()
        k = int(round(share * hosts.numel()))
        if k == 0:
            return x
        hosts = hosts[torch.randperm(hosts.numel(), generator=gen)[:k]]
        pick = donors[torch.randint(donors.numel(), (k,), generator=gen)]
        with torch.no_grad():
            res = trigger_residual(self.ctx.batch_images(pick, None), self.trigger_view[pick].to(x.device))
        x = x.clone()
        x[hosts.to(x.device)] += res
        return x

    def unlearn_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """(B,) bool: rows of batch ``idx`` the unlikelihood term pushes off their own caption.

        Quarantined pairs, and with ``unlearn_triggered`` triggered pairs trained on
        another caption (not those whose purified view supports their own).
        """
        bad = self.quarantine[idx]
        if self.ctx.config.unlearn_triggered:
            bad = bad | (self.triggered[idx] & (self.match[idx] != idx))
        return bad

    def _intra(self, idx: torch.Tensor, fi: ImageFeatures, act: torch.Tensor, gen: torch.Generator, rng: random.Random) -> torch.Tensor:
        """OT between patch sets of two views (images) and token sets of caption edits."""
        ctx, c, m = self.ctx, self.ctx.config, self.ctx.model
        n_sub = max(1, int(round(c.intra_subsample * idx.numel())))
        order = torch.argsort(act.float() + torch.rand(idx.numel(), generator=gen))  # dropped first
        pos = order[:n_sub]
        view2 = image_features(m, ctx.batch_images(idx[pos], gen))
        li = ot_alignment_loss(fi.local[pos.to(ctx.device)], view2.local, reg=c.ot_reg, iters=c.ot_iters)
        rows = idx[pos]
        caps = [ctx.captions[int(i)] for i in rows]
        both = torch.cat([ctx.tokens[rows], ctx.tokenizer([augment_caption(s, rng) for s in caps])])
        ft = text_features(m, both.to(ctx.device))
        k = rows.numel()
        lt = ot_alignment_loss(ft.local[:k], ft.local[k:], x_mask=ft.mask[:k], y_mask=ft.mask[k:], reg=c.ot_reg, iters=c.ot_iters)
        return li + lt


def _decision_arrays(decisions: Any, n: int) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Read action and new caption index per pair from the engine's ``Decisions``."""
    table = None
    if hasattr(decisions, "to_arrow"):
        table = decisions.to_arrow()
    elif hasattr(decisions, "table"):
        table = decisions.table
    if table is not None:
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
    else:
        cols = {k: list(v) for k, v in vars(decisions).items() if hasattr(v, "__len__") and not isinstance(v, str | dict)}
    action = [str(a) for a in cols["action"]]
    if len(action) != n:
        raise RuntimeError(f"sanitize_features returned {len(action)} decisions for {n} pairs")
    key = next((k for k in ("new_caption_index", "caption_index", "new_index", "best_index", "match") if k in cols), None)
    if key is None:
        raise RuntimeError(f"sanitize_features decisions lack a caption index column: {sorted(cols)}")
    new_idx = np.array([-1 if v is None else int(v) for v in cols[key]], dtype=np.int64)
    extra = {k: v for k, v in cols.items() if k not in ("id", "action", key) and len(v) == n and not isinstance(v[0] if v else 0, list | dict)}
    return action, new_idx, extra


DEFENCE_CLASSES: dict[str, type[Defence]] = {"none": Defence, "roclip": RoClip, "safeclip": SafeClip, "otcclip": OtcClip}
