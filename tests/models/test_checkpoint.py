"""Checkpoint format: round-trip, plain open_clip loads it with equal outputs, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from otcclip.models.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from otcclip.models.factory import ClipBundle, create_model


@pytest.fixture(scope="module")
def bundle() -> ClipBundle:
    b = create_model("otc-micro", seed=3)
    with torch.no_grad():  # move off the initialisation so a silent re-init would be caught
        for p in b.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return b


def _inputs(b: ClipBundle) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, b.image_size, b.image_size, generator=g)
    tokens = b.tokenizer(["a photo of a cat.", "a dog", "an airplane in the blue sky"])
    return images, tokens


def _outputs(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)  # type: ignore[operator]


def test_round_trip(tmp_path: Path, bundle: ClipBundle) -> None:
    path = save_checkpoint(bundle, tmp_path / "ckpt", meta={"epoch": 7, "defence": "none"})
    assert (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()
    cfg = read_checkpoint_config(path)
    assert cfg["model_cfg"] == bundle.model_cfg and cfg["otcclip"]["epoch"] == 7
    loaded = load_checkpoint(path)
    assert loaded.name == "otc-micro" and loaded.extra["defence"] == "none"
    ref, got = bundle.model.state_dict(), loaded.model.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k].cpu(), got[k]) for k in ref)
    images, tokens = _inputs(bundle)
    for a, b in zip(_outputs(bundle.model, images, tokens), _outputs(loaded.model, images, tokens), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(loaded.tokenizer(["a cat"]), bundle.tokenizer(["a cat"]))


def test_plain_open_clip_loads_it(tmp_path: Path, bundle: ClipBundle) -> None:
    path = save_checkpoint(bundle, tmp_path / "ckpt")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    images, _ = _inputs(bundle)
    tokens = tokenizer(["a photo of a cat.", "a dog", "an airplane in the blue sky"])
    assert torch.equal(tokens, bundle.tokenizer(["a photo of a cat.", "a dog", "an airplane in the blue sky"]))
    ours = _outputs(bundle.model, images, tokens)
    theirs = _outputs(model, images, tokens)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    assert torch.allclose(preprocess(pil), bundle.preprocess(pil))  # type: ignore[operator]


def test_overwrite_is_atomic_and_clean(tmp_path: Path, bundle: ClipBundle) -> None:
    other = create_model("otc-micro", seed=11)
    save_checkpoint(bundle, tmp_path / "ckpt", meta={"v": 1})
    save_checkpoint(other, tmp_path / "ckpt", meta={"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.extra["v"] == 2
    w = "visual.conv1.weight"
    assert torch.equal(loaded.model.state_dict()[w], other.model.state_dict()[w])
    assert not torch.equal(loaded.model.state_dict()[w], bundle.model.state_dict()[w].cpu())


def test_bad_checkpoints(tmp_path: Path, bundle: ClipBundle) -> None:
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path)
    path = save_checkpoint(bundle, tmp_path / "ckpt")
    cfg = json.loads((path / CONFIG_NAME).read_text())
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(path)
    cfg["model_cfg"]["vision_cfg"]["width"] = 128  # weights no longer fit
    cfg["model_cfg"]["vision_cfg"]["head_width"] = 64
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)
    (path / CONFIG_NAME).write_text(json.dumps({"preprocess_cfg": {}}))
    with pytest.raises(CheckpointError, match="model_cfg"):
        load_checkpoint(path)
