"""Models users have: open_clip names with pretrained weights through open_clip's own loader.

Offline (HF_HUB_OFFLINE=1): the tests write their own weight files of the ``otc-micro``
architecture and check that ``load_pretrained(name, pretrained=PATH)`` gives the same
features as the same weights loaded as a checkpoint directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch
from PIL import Image

from otcclip.models.checkpoint import CONFIG_NAME, load_checkpoint
from otcclip.models.factory import (
    ClipBundle,
    ModelLoadError,
    get_model_config,
    load_pretrained,
    register_shipped_configs,
    weights_cache_dir,
)
from otcclip.models.features import image_features, text_features
from otcclip.models.model_names import (
    UnknownModelError,
    known_model,
    known_model_names,
    validate_model_name,
)

CAPTIONS = ["a photo of a cat.", "a dog", "an airplane in the blue sky"]


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """Weights of an ``otc-micro`` model made by plain open_clip, moved off its initialisation."""
    register_shipped_configs()
    torch.manual_seed(5)
    model = open_clip.create_model("otc-micro")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _checkpoint_dir(root: Path, state: dict[str, torch.Tensor], *, preprocess_cfg: dict | None = None,
                    weights: str = "open_clip_model.safetensors") -> Path:
    """A checkpoint folder as open_clip publishes one: config + weights, no otcclip keys."""
    root.mkdir(parents=True)
    cfg: dict = {"model_cfg": get_model_config("otc-micro")}
    if preprocess_cfg is not None:
        cfg["preprocess_cfg"] = preprocess_cfg
    (root / CONFIG_NAME).write_text(json.dumps(cfg))
    if weights.endswith(".safetensors"):
        safetensors.torch.save_file(state, str(root / weights))
    else:
        torch.save(state, root / weights)
    return root


def _features(b: ClipBundle) -> list[torch.Tensor]:
    """Preprocessed pixels, global and patch/token features of fixed inputs."""
    rng = np.random.default_rng(0)
    pils = [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(3)]
    pixels = torch.stack([b.preprocess(p) for p in pils])
    with torch.no_grad():
        img = image_features(b.model, pixels)
        txt = text_features(b.model, b.tokenizer(CAPTIONS))
    return [pixels, img.global_, img.local, txt.global_, txt.local]


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_pretrained_file_equals_checkpoint(tmp_path: Path, state: dict[str, torch.Tensor], suffix: str) -> None:
    weights = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(weights))
    elif suffix == ".pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, weights)  # a DDP training save
    else:
        torch.save(state, weights)
    pre = load_pretrained("otc-micro", weights)
    assert pre.extra == {"model_name": "otc-micro", "pretrained": str(weights)}
    assert not pre.model.training and pre.model_cfg == get_model_config("otc-micro")
    ckpt = load_checkpoint(_checkpoint_dir(tmp_path / "ckpt", state))
    got = pre.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
    for a, b in zip(_features(pre), _features(ckpt), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(pre.tokenizer(CAPTIONS), ckpt.tokenizer(CAPTIONS))


def test_hf_layout_with_partial_preprocess_cfg_loads(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    path = _checkpoint_dir(tmp_path / "hf", state, preprocess_cfg={"mean": mean, "std": std, "interpolation": "bilinear"},
                           weights="open_clip_pytorch_model.bin")
    b = load_checkpoint(path)
    assert b.preprocess_cfg["size"] == [16, 16] and b.preprocess_cfg["mean"] == mean and b.preprocess_cfg["std"] == std
    assert b.preprocess_cfg["interpolation"] == "bilinear" and b.preprocess_cfg["resize_mode"] == "shortest"
    assert all(torch.equal(b.model.state_dict()[k], state[k]) for k in state)
    # the transforms are the ones plain open_clip builds for this folder
    _, _, theirs = open_clip.create_model_and_transforms(f"local-dir:{path}")
    pil = Image.fromarray(np.random.default_rng(1).integers(0, 255, (33, 47, 3), dtype=np.uint8))
    x = b.preprocess(pil)
    assert x.shape == (3, 16, 16) and torch.equal(x, theirs(pil))  # type: ignore[operator]


def test_bad_pretrained_values(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ModelLoadError, match="unknown model 'ViT-Q-99'"):
        load_pretrained("ViT-Q-99", "openai")
    with pytest.raises(ModelLoadError, match="pretrained weights are required"):
        load_pretrained("otc-micro")
    with pytest.raises(ModelLoadError, match="neither a known tag .*'openai'"):
        load_pretrained("ViT-B-32", str(tmp_path / "missing.pt"))
    other = tmp_path / "tiny.safetensors"  # otc-tiny weights do not fit otc-micro
    register_shipped_configs()
    safetensors.torch.save_file(open_clip.create_model("otc-tiny").state_dict(), str(other))
    with pytest.raises(ModelLoadError, match="does not fit this architecture"):
        load_pretrained("otc-micro", other)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a state dict")
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_pretrained("otc-micro", junk)


@pytest.mark.parametrize(("name", "tag"), [("ViT-B-32", "laion2b_s34b_b79k"),
                                           ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)])
def test_missing_weights_offline_name_model_tag_and_dir(tmp_path: Path, name: str, tag: str | None) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError) as info:
        load_pretrained(name, tag, cache_dir=cache)
    msg = str(info.value)
    where = weights_cache_dir(name, tag, cache_dir=cache)
    assert where.parent == cache and where.name.startswith("models--")
    assert repr(name) in msg and str(where) in msg and "HF_HUB_OFFLINE" in msg
    if tag:
        assert repr(tag) in msg
    else:
        assert where.name == "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"


def test_known_model_names_match_open_clip() -> None:
    register_shipped_configs()
    assert known_model_names() == set(open_clip.list_models())
    assert known_model("ViT-B-32") and known_model("ViT-B/32") and known_model("otc-micro")
    assert known_model("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert not known_model("ViT-Q-99") and not known_model("hf-hub:no-repo") and not known_model("hf-hub:a/b/../c")
    assert not known_model("local-dir:/etc")
    with pytest.raises(UnknownModelError, match="did you mean ViT-B-32"):
        validate_model_name("ViT-B-23")


def test_model_names_is_torch_free() -> None:
    code = ("import sys; from otcclip.models.model_names import known_model; assert known_model('ViT-B-32'); "
            "bad = [m for m in ('torch', 'open_clip', 'numpy') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
