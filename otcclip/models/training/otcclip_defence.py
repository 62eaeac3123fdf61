"""OTCCLIP's defence (DESIGN 2.4): how each step trains on what the passes decided.

The passes (:mod:`otcclip.models.training.otcclip_pass`) decide which pairs train and
with which caption. A step trains the kept and re-matched pairs with ``L_CLIP +
lam_inter * L_inter`` on full batches (``fill_batches``), the dropped ones (at most
``dropped_share`` of a batch per step) only through ``L_intra`` and, when quarantined, the
unlikelihood term that pushes them off the captions they were poisoned with; optionally a found trigger inoculates clean images. The shared
loop and the baselines are in :mod:`otcclip.models.training.defences`.
"""

from __future__ import annotations

import math
import random

import torch

from otcclip.models.features import (
    ImageFeatures,
    TextFeatures,
    image_features,
    text_features,
    trigger_residual,
)
from otcclip.models.training.augment import augment_caption
from otcclip.models.training.losses import clip_loss, ot_contrastive_loss, unlikelihood_loss
from otcclip.models.training.otcclip_pass import OtcClipPasses
from otcclip.models.triggers import stamp


class OtcClip(OtcClipPasses):
    name = "otcclip"

    def batch_loss(
        self, idx: torch.Tensor, epoch: int, gen: torch.Generator, rng: random.Random
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``L_CLIP + lam_inter * L_inter + lam_intra * L_intra + lam_unlearn * L_unlearn``.

        One image pass (the batch, plus the second view of the ``L_intra`` rows) and one
        text pass (the captions the active rows train with, the own captions of the rows
        that are unlearnt or enter ``L_intra``, each once, and the ``L_intra`` edits).
        """
        ctx, c, m = self.ctx, self.ctx.config, self.ctx.model
        restart = self.restart_epoch()
        if restart is not None and epoch < restart:
            # detection epochs: their model only feeds the first pass and is then discarded
            return super().batch_loss(idx, epoch, gen, rng)
        b0 = idx.numel()
        idx = self.cap_dropped(self.fill_batch(idx, gen), b0, gen)
        b = idx.numel()
        x = self.inoculate(idx, ctx.batch_images(idx, gen), gen)
        act = self.active[idx]
        use = idx[act]
        bad = self.unlearn_rows(idx)
        unlearn = c.lam_unlearn > 0 and bool(bad.any()) and use.numel() > 0
        pos = torch.zeros(0, dtype=torch.long)
        if c.lam_intra > 0 and c.intra_subsample > 0:
            # L_intra rows, dropped pairs first, and their second view
            n_sub = max(1, int(round(c.intra_subsample * b0)))
            pos = torch.argsort(act.float() + torch.rand(b, generator=gen))[:n_sub]
            x = torch.cat([x, ctx.batch_images(idx[pos], gen)])
        fi_all = image_features(m, x)
        fi = ImageFeatures(fi_all.global_[:b], fi_all.local[:b])
        # captions: trained-with (active rows), own (unlearnt rows, L_intra rows), edits;
        # an active row trained with its own caption has it encoded already
        nu = use.numel()
        own_at = {int(r): j for j, r in enumerate(use.tolist()) if int(self.match[r]) == int(r)}
        wanted = torch.unique(torch.cat([idx[bad] if unlearn else idx[:0], idx[pos]]))
        own_rows = wanted[torch.tensor([int(r) not in own_at for r in wanted.tolist()], dtype=torch.bool)]
        own_at.update({int(r): nu + j for j, r in enumerate(own_rows.tolist())})
        edits = ctx.tokenizer([augment_caption(ctx.captions[int(i)], rng) for i in idx[pos]]) if pos.numel() else None
        toks = [ctx.tokens[self.match[use]], ctx.tokens[own_rows]] + ([edits] if edits is not None else [])
        ft_all = text_features(m, torch.cat(toks).to(ctx.device))
        no = own_rows.numel()
        ft = _rows(ft_all, torch.arange(nu))
        dev_act = act.to(ctx.device)
        gi = fi.global_[dev_act]
        clip = clip_loss(gi, ft.global_, m.logit_scale.exp())
        loss = clip
        terms = {"clip": float(clip.detach())}
        if c.lam_inter > 0 and use.numel():
            inter = self._ot_loss(fi.local[dev_act], ft.local, y_mask=ft.mask)
            loss = loss + c.lam_inter * inter
            terms["inter"] = float(inter.detach())
        if pos.numel():
            k = pos.numel()
            li = self._ot_loss(fi.local[pos.to(ctx.device)], fi_all.local[b:])
            own = _rows(ft_all, torch.tensor([own_at[int(i)] for i in idx[pos]]))
            ed = _rows(ft_all, torch.arange(nu + no, nu + no + k))
            lt = self._ot_loss(own.local, ed.local, x_mask=own.mask, y_mask=ed.mask)
            intra = li + lt
            loss = loss + c.lam_intra * intra
            terms["intra"] = float(intra.detach())
        if unlearn:
            # dropping a quarantined pair (re-matching a triggered one) stops teaching its
            # poison; this unlearns it
            own_g = ft_all.global_[torch.tensor([own_at[int(i)] for i in idx[bad]])]
            un = unlikelihood_loss(fi.global_[bad.to(ctx.device)], own_g, ft.global_, m.logit_scale.exp())
            loss = loss + c.lam_unlearn * un
            terms["unlearn"] = float(un.detach())
        return loss, terms

    def fill_batch(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Batch ``idx`` plus as many kept pairs from outside it as it holds dropped ones.

        With ``config.fill_batches`` the CLIP loss of every step sees a full batch, as
        ``none``'s does, instead of shrinking by the dropped pairs (which stay in the
        batch for ``L_intra`` and the unlikelihood term).

        Parameters
        ----------
        idx : Tensor, shape (B,)

        Returns
        -------
        Tensor, shape (B + D,)
            D = number of dropped pairs in ``idx`` (fewer when not enough kept pairs).
        """
        k = int((~self.active[idx]).sum())
        if not self.ctx.config.fill_batches or k == 0:
            return idx
        ok = self.active & self.ctx.images.trainable
        ok[idx] = False
        cand = torch.nonzero(ok).flatten()
        return torch.cat([idx, cand[torch.randperm(cand.numel(), generator=gen)[:k]]])

    def cap_dropped(self, idx: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
        """Batch ``idx`` with at most ``ceil(config.dropped_share * size)`` of its dropped pairs.

        A dropped pair in a step costs an image and a caption forward for ``L_intra`` and
        the unlikelihood term, on top of the full batch of kept pairs (``fill_batches``).
        Beyond the cap a random subset of them stays; the others sit this step out and
        come back in later epochs' batches (each epoch's order is a new permutation).

        Parameters
        ----------
        idx : Tensor, shape (B',)
            A batch as :meth:`fill_batch` returns it.
        size : int
            The batch size the share is of (the loop's batch, before the refill).

        Returns
        -------
        Tensor, shape (B'',)
            ``idx`` without the dropped rows beyond the cap (order otherwise kept).
        """
        gone = ~self.active[idx]
        cap = math.ceil(self.ctx.config.dropped_share * size)  # a small batch still keeps one
        k = int(gone.sum())
        if k <= cap:
            return idx
        rows = torch.nonzero(gone).flatten()
        keep = torch.ones(idx.numel(), dtype=torch.bool)
        keep[rows[torch.randperm(k, generator=gen)[cap:]]] = False
        return idx[keep]

    def inoculate(self, idx: torch.Tensor, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Stamp the trigger onto clean images, which keep their captions.

        A share ``config.inoculate`` of the batch's clean pairs (active, neither triggered
        nor quarantined) gets a found trigger template (:func:`~otcclip.models.triggers.stamp`)
        or, while none was found, the :func:`~otcclip.models.features.trigger_residual` of
        a random image the trigger-sensitivity detector flagged (re-matched through its
        view, or dropped): the model learns that the trigger does not change what an
        image shows, on every class (the unlearning step of Neural Cleanse, with the
        trigger taken from the flagged images instead of reverse-engineered). Poisoned
        pairs the detector missed then teach a trigger the rest of the data contradicts.

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
        templates = self.templates
        if share <= 0 or (donors.numel() == 0 and not templates):
            return x
        hosts = torch.nonzero(
            self.active[idx] & ~self.triggered[idx] & ~self.quarantine[idx]
        ).flatten()
        k = int(round(share * hosts.numel()))
        if k == 0:
            return x
        hosts = hosts[torch.randperm(hosts.numel(), generator=gen)[:k]]
        if templates:
            # the shared trigger itself, without any one donor image's own detail
            x = x.clone()
            pick = torch.randint(len(templates), (k,), generator=gen)
            for j, t in enumerate(templates):
                h = hosts[pick == j].to(x.device)
                if h.numel():
                    x[h] = stamp(x[h], t, generator=gen)
            return x
        pick = donors[torch.randint(donors.numel(), (k,), generator=gen)]
        with torch.no_grad():
            res = trigger_residual(
                self.ctx.batch_images(pick, None), self.trigger_view[pick].to(x.device)
            )
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

    def _ot_loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        x_mask: torch.Tensor | None = None,
        y_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``L_inter`` / ``L_intra`` between paired local sets: the mean OT distance, or its
        contrastive form with ``config.ot_negatives`` in-batch negatives."""
        c = self.ctx.config
        return ot_contrastive_loss(
            x,
            y,
            x_mask=x_mask,
            y_mask=y_mask,
            negatives=c.ot_negatives,
            temperature=c.ot_temperature,
            settings=c.ot,
        )


def _rows(f: TextFeatures, rows: torch.Tensor) -> TextFeatures:
    """Rows ``rows`` (K,) of caption features, ``local`` / ``mask`` trimmed to their longest caption."""
    mask = f.mask[rows.to(f.mask.device)]
    length = int(mask.any(dim=0).nonzero().max().item()) + 1 if mask.numel() and bool(mask.any()) else mask.shape[1]
    r = rows.to(f.global_.device)
    return TextFeatures(f.global_[r], f.local[r, :length], mask[:, :length])
