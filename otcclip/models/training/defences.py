"""The defences sharing one training loop (DESIGN 2.4).

Each defence keeps a per-pair state (which caption an image is trained with, and which
pairs enter the CLIP loss), may update it before an epoch (re-match / re-split), and
computes the loss of a batch.

- ``none``: plain CLIP on the pairs as given.
- ``roclip``: RoCLIP as its official code trains it (:class:`RoClip`): every
  ``rematch_every``-th epoch each image is paired with its nearest caption, by image
  embedding, in a FIFO memory bank of recent caption embeddings; other epochs plain CLIP.
- ``safeclip``: SafeCLIP (:class:`SafeClip`): unimodal warm-up, then a safe set (GMM on the
  pair cosines, top share by cosine) that grows every epoch; CLIP loss on safe pairs,
  unimodal losses on the others.
- ``otcclip`` (:mod:`~otcclip.models.training.otcclip_pass` decides,
  :mod:`~otcclip.models.training.otcclip_defence` trains): plain CLIP warm-up epochs feed
  a first pass of the engine's ``sanitize_features`` (keep / reassign / drop) and the
  trigger-template search; the model then restarts from its initial weights (when that
  pass changed any pair; otherwise it trains on) and trains
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
    content_thumbnail,
    encode_text,
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
        ``config.epochs`` more epochs. The loop asks again after that epoch's
        ``before_epoch``: None there calls the restart off, and the epochs before it
        count towards ``config.epochs``."""
        return None

    def planned_epochs(self) -> int:
        """Epochs the run trains as things stand: ``config.epochs``, plus the detection
        epochs a restart (:meth:`restart_epoch`) repeats. The loop asks at the start, on
        resume and after the restart epoch's ``before_epoch``."""
        return self.ctx.config.epochs + (self.restart_epoch() or 0)

    def before_epoch(self, epoch: int) -> dict[str, Any]:
        """Update the per-pair state before ``epoch`` (0-based); returns counts for metrics."""
        return {}

    # --- loss ------------------------------------------------------------------------
    def batch_loss(self, idx: torch.Tensor, epoch: int, gen: torch.Generator, rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.ctx.model
        use = idx[self.active[idx]]
        x = self.ctx.batch_images(use, gen)
        img = F.normalize(m.encode_image(x), dim=-1)
        txt = F.normalize(encode_text(m, self.ctx.tokens[self.match[use]].to(self.ctx.device)), dim=-1)
        loss = clip_loss(img, txt, m.logit_scale.exp())
        return loss, {"clip": float(loss.detach())}

    # --- helpers ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_all(self, *, local: bool) -> tuple[ImageFeatures, TextFeatures]:
        """Features of every image (eval view) and caption with the current model."""
        m, ctx = self.ctx.model, self.ctx
        was_training = m.training
        m.eval()
        bs = ctx.config.encode_batch_size
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
                tg.append(F.normalize(encode_text(m, toks), dim=-1).cpu())
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
        bs = max(1, ctx.config.encode_batch_size // 2)  # two views per image in one forward
        out = [
            purified_image_global(m, ctx.batch_images(torch.arange(s, min(s + bs, ctx.n)), None)).cpu()
            for s in range(0, ctx.n, bs)
        ]
        m.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def encode_thumbs(self) -> torch.Tensor:
        """:func:`~otcclip.models.features.content_thumbnail` of every image (eval view), shape (N, t)."""
        ctx = self.ctx
        bs = ctx.config.encode_batch_size
        return torch.cat([content_thumbnail(ctx.batch_images(torch.arange(s, min(s + bs, ctx.n)), None)).cpu()
                          for s in range(0, ctx.n, bs)])

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
        t = F.normalize(encode_text(m, torch.cat([ctx.tokens[idx], aug]).to(ctx.device)), dim=-1)
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
    """RoCLIP (Yang et al., NeurIPS 2023) as its official code trains it.

    Source: BigML-CS-UCLA/RoCLIP, ``model/src/train.py`` (``get_loss``),
    ``model/src/memory_bank.py`` (``NNMemoryBankModule``, on lightly's ``MemoryBankModule``)
    and ``model/src/data.py`` (``cross_aug``):

    - a FIFO memory bank of the most recent caption embeddings (``memory_bank_size``;
      here ``pool_fraction`` of the dataset), initialised, as lightly does, with random
      unit vectors that the first batches push out;
    - on a RoCLIP epoch (``current_epoch % break_epoch == 0`` with 1-based epochs; here
      ``rematch_every`` plays ``break_epoch`` and ``warmup_epochs`` the plain-CLIP epochs
      before the first one, whose defaults 1 and 2 give the official epochs 2, 4, 6, ...)
      each IMAGE embedding queries the bank (``memory_bank(image_embeds, update=False)``)
      for its nearest caption embedding, the batch's caption embeddings are then enqueued
      (``memory_bank(text_embeds, update=True)``), and the CLIP loss pairs each image with
      its nearest bank caption (``logits_image_per_text = scale * text_embeds_nn @
      image_embeds.t()``). Bank entries are detached, so only the image tower learns from
      the matched captions in those epochs;
    - every other epoch is plain CLIP and leaves the bank as it is;
    - ``cross_aug``: each caption is trained in one EDA-augmented form fixed at start
      (``augment_caption``; the official ``data.py`` augments each caption once when the
      dataset loads), each image with the trainer's random crop and flip per step (the
      official ``augment_image.py`` also applies colour jitter, grayscale and blur).

    ``matched`` holds, for each image, the caption index of the bank entry its last RoCLIP
    step paired it with (-1: a random initial entry, -2: never queried).
    """

    name = "roclip"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.bank_size = max(2, int(math.ceil(ctx.config.pool_fraction * ctx.n)))
        self.bank: torch.Tensor | None = None  # (bank_size, d) caption embeddings, FIFO
        self.bank_ids = torch.full((self.bank_size,), -1, dtype=torch.long)  # caption index per slot
        self.bank_ptr = 0
        self.matched = torch.full((ctx.n,), -2, dtype=torch.long)
        self._aug_tokens: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "bank": None if self.bank is None else self.bank.clone(),
            "bank_ids": self.bank_ids.clone(),
            "bank_ptr": self.bank_ptr,
            "matched": self.matched.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "bank_ids" in state:
            self.bank = None if state["bank"] is None else state["bank"].clone()
            self.bank_ids = state["bank_ids"].clone()
            self.bank_ptr = int(state["bank_ptr"])
            self.matched = state["matched"].clone()

    # --- the memory bank -------------------------------------------------------------
    def _init_bank(self, dim: int, dtype: torch.dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.ctx.config.seed * 7919 + 17)
        return F.normalize(torch.randn(self.bank_size, dim, generator=g), dim=1).to(dtype)

    @torch.no_grad()
    def query(self, image_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest bank caption embedding to each image embedding (cosine) and its caption index."""
        if self.bank is None:
            self.bank = self._init_bank(image_emb.shape[1], image_emb.dtype)
        bank = self.bank.to(image_emb.device)
        sim = F.normalize(image_emb, dim=1) @ F.normalize(bank, dim=1).t()
        j = sim.argmax(dim=1)
        return bank[j], self.bank_ids[j.cpu()]

    @torch.no_grad()
    def enqueue(self, text_emb: torch.Tensor, ids: torch.Tensor) -> None:
        """Push a batch of caption embeddings into the FIFO bank (lightly's
        ``_dequeue_and_enqueue``: fill from the pointer; a batch that reaches the end fills
        the tail, drops its rest, and the pointer returns to 0)."""
        if self.bank is None:
            self.bank = self._init_bank(text_emb.shape[1], text_emb.dtype)
        b, ptr = text_emb.shape[0], self.bank_ptr
        emb = text_emb.detach().to(self.bank.device, self.bank.dtype)
        if ptr + b >= self.bank_size:
            self.bank[ptr:] = emb[: self.bank_size - ptr]
            self.bank_ids[ptr:] = ids[: self.bank_size - ptr]
            self.bank_ptr = 0
        else:
            self.bank[ptr : ptr + b] = emb
            self.bank_ids[ptr : ptr + b] = ids
            self.bank_ptr = ptr + b

    # --- training --------------------------------------------------------------------
    def caption_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """Tokens of the captions of ``idx`` in their fixed EDA-augmented form (``cross_aug``)."""
        if self._aug_tokens is None:
            ctx = self.ctx
            rng = random.Random(ctx.config.seed * 7919 + 3)
            self._aug_tokens = ctx.tokenizer([augment_caption(c, rng) for c in ctx.captions])
        return self._aug_tokens[idx]

    def batch_loss(self, idx: torch.Tensor, epoch: int, gen: torch.Generator, rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        m, ctx = self.ctx.model, self.ctx
        img = F.normalize(m.encode_image(ctx.batch_images(idx, gen)), dim=-1)
        txt = F.normalize(encode_text(m, self.caption_tokens(idx).to(ctx.device)), dim=-1)
        scale = m.logit_scale.exp()
        if not self.is_rematch_epoch(epoch):
            loss = clip_loss(img, txt, scale)
            return loss, {"clip": float(loss.detach())}
        nn_txt, nn_ids = self.query(img.detach())
        self.enqueue(txt.detach(), idx)
        self.matched[idx] = nn_ids
        own = sum(int(j) >= 0 and ctx.captions[int(j)] == ctx.captions[int(i)] for i, j in zip(idx, nn_ids, strict=True))
        logits_per_text = scale * nn_txt @ img.t()  # (B, B): bank caption of image i vs every image
        target = torch.arange(len(idx), device=img.device)
        loss = (F.cross_entropy(logits_per_text.t(), target) + F.cross_entropy(logits_per_text, target)) / 2
        # the official loss adds 0 * CE(image vs own caption): the text tower gets no gradient
        loss = loss + 0.0 * txt.sum()
        return loss, {"roclip": float(loss.detach()), "nn_same_text": own / max(1, len(idx))}


class SafeClip(Defence):
    """SafeCLIP (Yang, Gu and Mirzasoleiman, "Better Safe than Sorry", ICML 2024).

    As the paper describes it (Sec. 4; no official code is public):

    1. unimodal warm-up: ``warmup_epochs`` epochs of in-modality contrastive learning
       (SimCLR on two image views, caption vs its edited form); the last warm-up epoch adds
       the CLIP loss on all pairs (the paper's one short CLIP epoch);
    2. the split: every ``rematch_every`` epochs the image-caption cosine of every pair is
       computed and a 2-component GMM fitted to it; a pair can be safe only while its
       posterior of the high-cosine component is at least ``safe_threshold``;
    3. the growing safe set: the safe set is the ``safe_start`` share of the data with the
       highest cosine at the first split, and grows by ``safe_growth`` of the data every
       epoch after it (ranked by the latest cosines), never past the GMM's clean pairs;
    4. safe pairs train with the CLIP loss, the rest (risky) with the unimodal losses only,
       so a poisoned caption is never pulled towards its image.
    """

    name = "safeclip"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.safe = torch.ones(ctx.n, dtype=torch.bool)
        self.cosine = torch.zeros(ctx.n, dtype=torch.float64)  # latest pair cosines
        self.clean = torch.ones(ctx.n, dtype=torch.bool)  # GMM posterior >= safe_threshold

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "safe": self.safe.clone(), "cosine": self.cosine.clone(), "clean": self.clean.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.safe = state["safe"].clone()
        if "cosine" in state:
            self.cosine = state["cosine"].clone()
            self.clean = state["clean"].clone()

    def safe_share(self, epoch: int) -> float:
        """Share of the data the safe set may hold in (0-based) ``epoch`` (0 before the first split)."""
        c = self.ctx.config
        if epoch < c.warmup_epochs:
            return 0.0
        return min(1.0, c.safe_start + c.safe_growth * (epoch - c.warmup_epochs))

    def split(self, cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """GMM posterior of the high-cosine component per pair, and whether it passes the threshold."""
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(2, random_state=self.ctx.config.seed).fit(cos[:, None])
        hi = int(np.argmax(gmm.means_.ravel()))
        post = gmm.predict_proba(cos[:, None])[:, hi]
        return post, post >= self.ctx.config.safe_threshold

    def grow(self, epoch: int) -> None:
        """The safe set of ``epoch``: the top ``safe_share`` by cosine among the GMM's clean pairs."""
        k = int(math.ceil(self.safe_share(epoch) * self.ctx.n))
        order = torch.argsort(self.cosine, descending=True)
        order = order[self.clean[order]][:k]
        self.safe = torch.zeros(self.ctx.n, dtype=torch.bool)
        self.safe[order] = True

    def before_epoch(self, epoch: int) -> dict[str, Any]:
        if epoch < self.ctx.config.warmup_epochs:
            return {}
        out: dict[str, Any] = {}
        if self.is_rematch_epoch(epoch):
            img, txt = self.encode_all(local=False)
            cos = (img.global_ * txt.global_).sum(1).numpy().astype(np.float64)
            post, clean = self.split(cos)
            self.cosine = torch.from_numpy(cos)
            self.clean = torch.from_numpy(clean)
            self.grow(epoch)
            action = ["keep" if s else "risky" for s in self.safe.tolist()]
            tab = self._base_table(action)
            tab["cosine"] = cos
            tab["p_clean"] = post
            self.write_decisions(epoch, tab)
        else:
            self.grow(epoch)
        n_safe = int(self.safe.sum())
        out["rematch"] = {"keep": n_safe, "risky": self.ctx.n - n_safe}
        return out

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
        txt = F.normalize(encode_text(m, self.ctx.tokens[safe].to(self.ctx.device)), dim=-1)
        clip = clip_loss(img, txt, m.logit_scale.exp())
        uni = self.unimodal_loss(risky, gen, rng)
        return clip + uni, {"clip": float(clip.detach()), "unimodal": float(uni.detach())}
