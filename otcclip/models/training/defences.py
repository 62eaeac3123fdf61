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
- ``otcclip`` (:mod:`~otcclip.models.training.otcclip_pass` decides,
  :mod:`~otcclip.models.training.otcclip_defence` trains): plain CLIP warm-up epochs feed
  a first pass of the engine's ``sanitize_features`` (keep / reassign / drop) and the
  trigger-template search; the model then restarts from its initial weights and trains
  ``L_CLIP + lam_inter * L_inter + lam_intra * L_intra`` on what the passes kept, with
  later passes every K epochs (fewer while they change nothing). Dropped pairs only feed
  ``L_intra`` and, quarantined, an unlikelihood term on their poisoned captions; verdicts
  are sticky. The engine's score-based decisions apply only with ``score_rematch`` (see
  :class:`TrainConfig`).
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
)
from otcclip.models.training.augment import augment_caption, augment_images, normalize
from otcclip.models.training.config import (
    TrainConfig,
)
from otcclip.models.training.data import ImageSource
from otcclip.models.training.losses import clip_loss, nt_xent

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

    def restart_epoch(self) -> int | None:
        """Epoch (0-based) at which the loop restarts the model from its initial weights,
        after this defence's ``before_epoch``; None: never. The run then trains
        ``config.epochs`` more epochs."""
        return None

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
