"""Fine-grained features: shapes, globals equal open_clip's encoders, EOT local equals global."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from otcclip.models.factory import ClipBundle
from otcclip.models.features import (
    PURIFIERS,
    encode_text,
    fill_local,
    image_features,
    low_pass,
    pad_text_features,
    purified_image_global,
    text_features,
    trigger_residual,
)

CAPTIONS = ["a cat.", "a blurry photo of a small dog on the grass.", "two birds", "a red car"]


def _images(b: ClipBundle, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, b.image_size, b.image_size, generator=g)


def test_image_features_shapes_and_global(tiny_bundle: ClipBundle) -> None:
    b = tiny_bundle
    x = _images(b)
    with torch.no_grad():
        f = image_features(b.model, x)
        ref = F.normalize(b.model.encode_image(x), dim=-1)
    cfg = b.model_cfg["vision_cfg"]
    patches = (cfg["image_size"] // cfg["patch_size"]) ** 2  # CLS token excluded
    assert f.global_.shape == (3, b.model_cfg["embed_dim"])
    assert f.local.shape == (3, patches, b.model_cfg["embed_dim"])
    assert torch.allclose(f.global_, ref, atol=1e-5)
    assert torch.allclose(f.local.norm(dim=-1), torch.ones(3, patches), atol=1e-5)
    # patches carry per-image information: different images give different local sets
    assert not torch.allclose(f.local[0], f.local[1])


def test_text_features_mask_eot_and_global(tiny_bundle: ClipBundle) -> None:
    b = tiny_bundle
    tokens = b.tokenizer(CAPTIONS)
    with torch.no_grad():
        t = text_features(b.model, tokens)
        ref = F.normalize(b.model.encode_text(tokens), dim=-1)
    eot = tokens.argmax(dim=-1)
    n, length, d = t.local.shape
    assert (n, d) == (len(CAPTIONS), b.model_cfg["embed_dim"]) and length == int(eot.max())
    assert torch.allclose(t.global_, ref, atol=1e-5)
    # positions 1..EOT are valid: SOT excluded, EOT included
    assert t.mask.sum(dim=1).tolist() == eot.tolist()
    for i in range(n):
        k = int(eot[i])
        assert torch.allclose(t.local[i, k - 1], t.global_[i], atol=1e-5)  # EOT token == global
        assert torch.allclose(t.local[i, :k].norm(dim=-1), torch.ones(k), atol=1e-5)
        assert t.local[i, k:].abs().sum() == 0 and not t.mask[i, k:].any()


def test_encode_text_cut_to_the_longest_caption_equals_open_clip(tiny_bundle: ClipBundle) -> None:
    """The context is cut after the batch's last EOT; causal attention makes that exact,
    forward and backward, and a caption's features do not depend on its batch."""
    b = tiny_bundle
    tokens = b.tokenizer(CAPTIONS)
    assert int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]  # there is padding to cut
    ref = b.model.encode_text(tokens)
    got = encode_text(b.model, tokens)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)
    alone = encode_text(b.model, b.tokenizer(CAPTIONS[:1]))  # a shorter cut
    assert torch.allclose(alone[0], ref[0], atol=1e-5)
    g_ref = torch.autograd.grad(ref.square().sum(), b.model.token_embedding.weight)[0]
    g_got = torch.autograd.grad(encode_text(b.model, tokens).square().sum(), b.model.token_embedding.weight)[0]
    assert torch.allclose(g_got, g_ref, rtol=1e-4, atol=1e-3)


def test_encode_text_runs_the_full_context_without_a_causal_mask(tiny_bundle: ClipBundle) -> None:
    """Without the causal mask padding is seen by every position: nothing is cut."""
    import copy

    m = copy.deepcopy(b := tiny_bundle).model
    m.attn_mask = None
    tokens = b.tokenizer(CAPTIONS)
    with torch.no_grad():
        ref = m.encode_text(tokens)
        assert torch.allclose(encode_text(m, tokens), ref, atol=1e-5)
        assert torch.allclose(text_features(m, tokens).global_, F.normalize(ref, dim=-1), atol=1e-5)
        # and a cut would not have been exact here
        x = m.token_embedding(tokens[:, :8]) + m.positional_embedding[:8]
        assert not torch.allclose(m.ln_final(m.transformer(x))[:, 0], m.ln_final(
            m.transformer(m.token_embedding(tokens) + m.positional_embedding))[:, 0], atol=1e-5)


def test_pad_text_features_equals_joint_batch(tiny_bundle: ClipBundle) -> None:
    b = tiny_bundle
    with torch.no_grad():
        joint = text_features(b.model, b.tokenizer(CAPTIONS))
        parts = [text_features(b.model, b.tokenizer(CAPTIONS[:1])), text_features(b.model, b.tokenizer(CAPTIONS[1:]))]
    assert parts[0].local.shape[1] < parts[1].local.shape[1]  # different lengths get padded
    padded = pad_text_features(parts)
    assert torch.equal(padded.mask, joint.mask)
    assert torch.allclose(padded.local, joint.local, atol=1e-5)
    assert torch.allclose(padded.global_, joint.global_, atol=1e-5)


def test_features_are_differentiable(tiny_bundle: ClipBundle) -> None:
    from otcclip.models.factory import create_model

    b = create_model("otc-micro", seed=1)  # own copy: gradients must not touch the shared fixture
    b.model.train()
    fi = image_features(b.model, _images(b, 2))
    ft = text_features(b.model, b.tokenizer(CAPTIONS[:2]))
    loss = (fi.local.sum(dim=1) * ft.local.sum(dim=1)).sum()
    loss.backward()
    assert b.model.visual.conv1.weight.grad is not None and b.model.visual.conv1.weight.grad.abs().sum() > 0
    assert b.model.token_embedding.weight.grad is not None and b.model.token_embedding.weight.grad.abs().sum() > 0


def test_low_pass_keeps_smooth_content_and_removes_pixel_noise() -> None:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    smooth = torch.stack([xx, yy, xx * yy])[None]  # (1, 3, 32, 32)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(low_pass(torch.full((2, 3, 8, 8), 0.7)), torch.full((2, 3, 8, 8), 0.7), atol=1e-6)
    # interior of a linear ramp is unchanged (unit gain, symmetric kernel)
    assert torch.allclose(low_pass(smooth)[..., 2:-2, 2:-2], smooth[..., 2:-2, 2:-2], atol=1e-5)
    assert low_pass(noise).std() < 0.4 * noise.std()
    assert low_pass(noise).shape == noise.shape


def test_fill_local_replaces_the_noise_patch_and_nothing_else() -> None:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    img = torch.stack([xx, yy, xx * yy])[None].repeat(2, 1, 1, 1)
    g = torch.Generator().manual_seed(1)
    img[0, :, 20:28, 3:11] = torch.rand(3, 8, 8, generator=g) * 4 - 2  # a noise patch
    img[1, :, 0:8, 22:30] = torch.rand(3, 8, 8, generator=g) * 4 - 2
    out = fill_local(img, frac=0.25)
    changed = (out != img).any(dim=1)  # (2, 32, 32)
    assert changed[0, 20:28, 3:11].all() and changed[0].sum() == 64
    assert changed[1, 0:8, 22:30].all() and changed[1].sum() == 64
    assert torch.allclose(out[0, :, 24, 5], img[0].mean(dim=(1, 2)))


def test_purified_global_is_the_encoder_on_each_view(tiny_bundle: ClipBundle) -> None:
    b = tiny_bundle
    x = _images(b)
    with torch.no_grad():
        got = purified_image_global(b.model, x)
        ref = [F.normalize(b.model.encode_image(v), dim=-1) for v in (low_pass(x), fill_local(x))]
    assert got.shape == (3, len(PURIFIERS), b.model_cfg["embed_dim"])
    for v, r in enumerate(ref):
        assert torch.allclose(got[:, v], r, atol=1e-5)


def test_trigger_residual_is_what_the_purified_view_removes() -> None:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    smooth = torch.stack([xx, yy, xx * yy])[None]
    g = torch.Generator().manual_seed(2)
    noise = 0.3 * torch.randn(1, 3, 32, 32, generator=g)
    patched = smooth.clone()
    patched[0, :, 4:12, 16:24] = torch.rand(3, 8, 8, generator=g) * 4 - 2
    x = torch.cat([smooth + noise, patched, smooth])
    r = trigger_residual(x, torch.tensor([0, 1, -1]))
    # low-pass view: the residual is mostly the blended noise
    assert F.cosine_similarity(r[0, :, 2:-2, 2:-2].flatten(), noise[0, :, 2:-2, 2:-2].flatten(), dim=0) > 0.8
    # fill view: the residual lives in the patch window only
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[4:12, 16:24] = True
    assert (r[1][:, ~inside] == 0).all() and (r[1][:, inside] != 0).any()
    # no view (-1): nothing
    assert (r[2] == 0).all()
