"""Fine-grained CLIP features: global embeddings plus projected local token sets.

DESIGN 2.1. All functions here are differentiable (the trainer back-propagates through
them); wrap calls in ``torch.no_grad()`` for extraction.

Shapes: ``N`` items, ``P`` image patches (CLS excluded), ``L`` caption positions
(1..EOT of the context, trimmed to the longest caption in the batch), ``d`` embed dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ImageFeatures:
    """Image features.

    Attributes
    ----------
    global_ : Tensor, shape (N, d)
        L2-normalised ``encode_image`` output.
    local : Tensor, shape (N, P, d)
        Patch tokens after ``ln_post``, times ``visual.proj``, L2-normalised.
    """

    global_: torch.Tensor
    local: torch.Tensor


@dataclass(frozen=True)
class TextFeatures:
    """Caption features.

    Attributes
    ----------
    global_ : Tensor, shape (N, d)
        L2-normalised ``encode_text`` output.
    local : Tensor, shape (N, L, d)
        ``ln_final(transformer(x)) @ text_projection`` at positions 1..EOT, L2-normalised;
        zero where ``mask`` is False.
    mask : Tensor, shape (N, L), bool
        True at the valid (content and EOT) positions.
    """

    global_: torch.Tensor
    local: torch.Tensor
    mask: torch.Tensor


def image_features(model: torch.nn.Module, images: torch.Tensor) -> ImageFeatures:
    """Encode a batch of preprocessed images.

    Parameters
    ----------
    model : open_clip.CLIP
        Model with a ViT image tower (``visual.proj`` not None).
    images : Tensor, shape (N, 3, H, W)

    Returns
    -------
    ImageFeatures
    """
    visual: Any = model.visual  # open_clip VisionTransformer internals
    x = visual._embeds(images)
    x = visual.transformer(x)
    pooled, tokens = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
        tokens = tokens @ visual.proj
    return ImageFeatures(global_=F.normalize(pooled, dim=-1), local=F.normalize(tokens, dim=-1))


def low_pass(images: torch.Tensor) -> torch.Tensor:
    """Binomial 5x5 low-pass filter per channel (reflect padding).

    Natural image content lives mostly at low spatial frequencies; high-frequency noise
    triggers (a blended noise pattern, a noise patch) do not survive it. Linear with unit
    gain, so it may be applied to normalised images.

    Parameters
    ----------
    images : Tensor, shape (N, C, H, W), float

    Returns
    -------
    Tensor, shape (N, C, H, W)
    """
    if min(images.shape[-2:]) <= 2:  # reflect padding needs more than the pad width
        return images
    c = images.shape[1]
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=images.dtype, device=images.device) / 16.0
    kernel = (k1[:, None] * k1[None, :]).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(images, (2, 2, 2, 2), mode="reflect"), kernel, groups=c)


def fill_local(images: torch.Tensor, *, frac: float = 0.25) -> torch.Tensor:
    """Replace each image's most high-frequency square window by the image's mean colour.

    A local noise trigger (a patch) is the most high-frequency window of an image it is
    pasted on; natural textures rarely are by the same margin. The window side is
    ``frac`` of the shorter image side.

    Parameters
    ----------
    images : Tensor, shape (N, C, H, W), float

    Returns
    -------
    Tensor, shape (N, C, H, W)
    """
    n, _, h, w = images.shape
    side = max(1, min(h, w, round(frac * min(h, w))))
    energy = (images - low_pass(images)).abs().mean(dim=1, keepdim=True)  # (N, 1, H, W)
    window = F.avg_pool2d(energy, side, stride=1)  # (N, 1, H-side+1, W-side+1)
    width = window.shape[-1]
    pos = window.flatten(1).argmax(dim=1)
    y0, x0 = (pos // width)[:, None], (pos % width)[:, None]
    ys = torch.arange(h, device=images.device)[None, :]
    xs = torch.arange(w, device=images.device)[None, :]
    inside = ((ys >= y0) & (ys < y0 + side))[:, :, None] & ((xs >= x0) & (xs < x0 + side))[:, None, :]
    mean = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    return torch.where(inside[:, None], mean, images)


#: Side of :func:`content_thumbnail` (its vectors have ``THUMB_SIDE ** 2`` entries).
THUMB_SIDE = 8


def content_thumbnail(images: torch.Tensor, *, side: int = THUMB_SIDE) -> torch.Tensor:
    """A cheap descriptor of what an image shows, independent of any model: its
    grayscale (channel mean) averaged down to ``side x side``, centred and L2-normalised.

    Centring and normalising remove brightness and contrast; the low resolution removes
    noise and fine texture (and most small triggers), so two photos of the same scene
    have a cosine near 1 and two unrelated images one near 0. A flat image gives zeros.

    Parameters
    ----------
    images : Tensor, shape (N, C, H, W), float
        Any per-channel affine normalisation (e.g. CLIP's) is fine.

    Returns
    -------
    Tensor, shape (N, side * side), float32
    """
    g = F.adaptive_avg_pool2d(images.float().mean(dim=1, keepdim=True), side).flatten(1)
    g = g - g.mean(dim=1, keepdim=True)
    return g / g.norm(dim=1, keepdim=True).clamp_min(1e-6)


#: The purified views of the trigger-sensitivity detector, in the order of
#: :func:`purified_image_global`'s second axis.
PURIFIERS = ("low_pass", "fill_local")


def trigger_residual(images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """What each image loses in its purified view: the trigger, when it carries one.

    Parameters
    ----------
    images : Tensor, shape (N, C, H, W), float
        Normalised images.
    views : Tensor, shape (N,), int64
        Index into :data:`PURIFIERS` per image.

    Returns
    -------
    Tensor, shape (N, C, H, W)
        ``image - purified view`` (the high-frequency part for ``low_pass``; the filled
        window, less the image's mean colour, for ``fill_local``).
    """
    out = torch.zeros_like(images)
    for v, fn in enumerate((low_pass, fill_local)):
        rows = views == v
        if bool(rows.any()):
            out[rows] = images[rows] - fn(images[rows])
    return out


def purified_image_global(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised ``encode_image`` of each purified view (:data:`PURIFIERS`).

    The trigger-sensitivity detector compares a pair's own-caption score on these views
    with the score on the image itself (:mod:`otcclip.models.decisions`).

    Parameters
    ----------
    images : Tensor, shape (N, C, H, W)

    Returns
    -------
    Tensor, shape (N, V, d)
        ``V = len(PURIFIERS)``.
    """
    views = [low_pass(images), fill_local(images)]
    z = model.encode_image(torch.cat(views))  # type: ignore[operator]
    return F.normalize(z, dim=-1).view(len(views), images.shape[0], -1).transpose(0, 1)


def _builtin_tower(model: torch.nn.Module) -> bool:
    """Whether ``model`` has open_clip's built-in text tower (``CLIP``, not
    ``CustomTextCLIP``) with EOT / EOS pooling, the features of :func:`text_features`."""
    m: Any = model
    return (
        hasattr(m, "token_embedding")
        and getattr(m, "text_pool_type", "argmax") in ("argmax", "eos")
        and (getattr(m, "text_pool_type", "argmax") != "eos" or getattr(m, "text_eos_id", None) is not None)
    )


def _eot_positions(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(N,) int64: the position each caption is pooled at (its EOT / EOS token)."""
    m: Any = model
    if getattr(m, "text_pool_type", "argmax") == "eos":
        return (tokens == m.text_eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)  # EOT has the largest id in open_clip's vocab


def _text_tower(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in text tower on the context cut after the batch's longest caption.

    With a causal attention mask (open_clip's default; otherwise the full context runs)
    causal attention lets no position see a later one, so positions past the last EOT of
    the batch (padding) change nothing before it: cutting them is exact and saves their
    share of the tower (a caption of ~15 tokens in a 77-token context: ~80 %).

    Returns
    -------
    x : Tensor, shape (N, L', width)
        ``ln_final`` output at positions 0..L'-1, ``L' = max EOT + 1``.
    eot : Tensor, shape (N,), int64
    """
    m: Any = model
    eot = _eot_positions(model, tokens)
    mask = m.attn_mask
    # without a causal mask every position sees the padding: the full context runs
    length = (int(eot.max().item()) + 1 if tokens.shape[0] else 1) if mask is not None else tokens.shape[1]
    cast_dtype = m.transformer.get_cast_dtype()
    x = m.token_embedding(tokens[:, :length]).to(cast_dtype)
    x = x + m.positional_embedding[:length].to(cast_dtype)
    x = m.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
    return m.ln_final(x), eot


def _project(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    proj = getattr(model, "text_projection", None)
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def encode_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)``, cut to the batch's longest caption where that is exact.

    Parameters
    ----------
    model : open_clip model
        With open_clip's built-in text tower (``CLIP``) and its causal mask the context is
        cut after the batch's last EOT (:func:`_text_tower`); any other text tower (Hugging
        Face, ``CustomTextCLIP``) runs ``model.encode_text`` on the full context.
    tokens : Tensor, shape (N, context_length), int64

    Returns
    -------
    Tensor, shape (N, d)
        Not normalised, as ``encode_text``.
    """
    m: Any = model
    if not _builtin_tower(model):
        return m.encode_text(tokens)
    x, eot = _text_tower(model, tokens)
    return _project(model, x[torch.arange(x.shape[0], device=x.device), eot])


def text_features(model: torch.nn.Module, tokens: torch.Tensor) -> TextFeatures:
    """Encode a batch of tokenized captions.

    Parameters
    ----------
    model : open_clip.CLIP
        Model with open_clip's built-in text tower (EOT or EOS pooling); with its causal
        mask the context is cut after the batch's longest caption (:func:`_text_tower`).
    tokens : Tensor, shape (N, context_length), int64

    Returns
    -------
    TextFeatures
        ``local`` and ``mask`` cover positions 1..max EOT in the batch.
    """
    if not _builtin_tower(model):
        raise ValueError("text_features needs open_clip's built-in text tower (CLIP with EOT or EOS pooling)")
    x, eot = _text_tower(model, tokens)
    x = _project(model, x)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]
    length = int(eot.max().item()) if tokens.shape[0] else 0
    local = x[:, 1 : length + 1]
    pos = torch.arange(1, length + 1, device=tokens.device)
    mask = pos[None, :] <= eot[:, None]
    local = F.normalize(local, dim=-1) * mask[..., None].to(local.dtype)
    return TextFeatures(global_=F.normalize(pooled, dim=-1), local=local, mask=mask)


def pad_text_features(feats: list[TextFeatures]) -> TextFeatures:
    """Concatenate caption feature batches of different ``L`` (zero-padding, mask False)."""
    length = max(f.local.shape[1] for f in feats)
    locs, masks = [], []
    for f in feats:
        pad = length - f.local.shape[1]
        locs.append(F.pad(f.local, (0, 0, 0, pad)))
        masks.append(F.pad(f.mask, (0, pad), value=False))
    return TextFeatures(
        global_=torch.cat([f.global_ for f in feats]),
        local=torch.cat(locs),
        mask=torch.cat(masks),
    )
