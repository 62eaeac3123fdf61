"""Build open_clip models from the configs this package ships, never from a hub.

Every model is created with ``pretrained=None``: weights come from training or from a
local checkpoint (see :mod:`otcclip.models.checkpoint`). The shipped JSON configs in
``model_configs/`` are registered with open_clip on first use, next to open_clip's own
standard names (``ViT-B-32`` and friends), which are equally usable offline.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False

#: Tokenizer: list of captions -> int64 tensor of shape (N, context_length).
Tokenizer = Callable[[list[str]], torch.Tensor]
#: Image transform: PIL image -> float tensor of shape (3, H, W).
Transform = Callable[[Image.Image], torch.Tensor]


def register_shipped_configs() -> None:
    """Register ``model_configs/*.json`` with open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def shipped_model_names() -> list[str]:
    """Names of the configs this package ships (the tiny CPU presets)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def available_model_names() -> list[str]:
    """Every name :func:`create_model` accepts: shipped presets and open_clip's own."""
    register_shipped_configs()
    return list(open_clip.list_models())


@dataclass(frozen=True)
class ClipBundle:
    """An open_clip model with everything needed to use it.

    Attributes
    ----------
    model : open_clip.CLIP
        The model (image tower must be a ViT for patch-level features).
    name : str
        Config name it was built from (e.g. ``"otc-tiny"``).
    model_cfg : dict
        The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``).
    preprocess_cfg : dict
        open_clip ``PreprocessCfg`` as a dict (size, mean, std, interpolation, ...).
    preprocess : Transform
        Eval transform, PIL image -> (3, H, W) float tensor.
    preprocess_train : Transform
        Training transform (random resized crop), same output shape.
    tokenizer : Tokenizer
        Captions -> (N, context_length) int64 tokens.
    """

    model: Any
    name: str
    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]
    preprocess: Transform
    preprocess_train: Transform
    tokenizer: Tokenizer
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    @property
    def image_size(self) -> int:
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return int(size if isinstance(size, int) else size[0])


def get_model_config(name: str) -> dict[str, Any]:
    """Return a copy of the registered config ``name``.

    Raises
    ------
    ValueError
        If no shipped or open_clip config has that name.
    """
    register_shipped_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(shipped_model_names())} "
            "or any open_clip config name"
        )
    return dict(cfg)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> cuda if available else cpu; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return dev


def create_model(
    name: str,
    *,
    device: str | torch.device | None = "cpu",
    seed: int | None = None,
    model_cfg: dict[str, Any] | None = None,
) -> ClipBundle:
    """Create a randomly initialised open_clip model (``pretrained=None``).

    Parameters
    ----------
    name : str
        Shipped preset (``otc-micro``, ``otc-tiny``, ``otc-small``) or open_clip config name.
    device : str or torch.device, optional
        Target device; ``"auto"`` picks CUDA when present.
    seed : int, optional
        Seeds ``torch`` before initialisation for reproducible weights.
    model_cfg : dict, optional
        Use this config instead of the registered one (checkpoint loading).
    """
    register_shipped_configs()
    cfg = dict(model_cfg) if model_cfg is not None else get_model_config(name)
    if seed is not None:
        torch.manual_seed(seed)
    dev = resolve_device(device)
    model = open_clip.CLIP(**cfg) if "multimodal_cfg" not in cfg else None
    if model is None:  # CoCa and other exotic configs: go through open_clip's factory
        model = open_clip.create_model(name, pretrained=None)
    pp = PreprocessCfg(size=_image_size(cfg))
    model.visual.preprocess_cfg = _pp_dict(pp)
    model = model.to(dev)
    return _bundle(model, name, cfg, _pp_dict(pp))


def _image_size(cfg: dict[str, Any]) -> int:
    size = cfg["vision_cfg"].get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])


def _pp_dict(pp: Any) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(pp)
    if isinstance(d.get("size"), tuple):
        d["size"] = list(d["size"])
    return d


def _bundle(model: Any, name: str, cfg: dict[str, Any], pp_cfg: dict[str, Any]) -> ClipBundle:
    pp = PreprocessCfg(**{**pp_cfg, "size": pp_cfg["size"]})
    preprocess = image_transform_v2(pp, is_train=False)
    preprocess_train = image_transform_v2(pp, is_train=True)
    ctx = int(cfg["text_cfg"].get("context_length", 77))
    tok = open_clip.SimpleTokenizer(context_length=ctx)

    def tokenizer(texts: list[str]) -> torch.Tensor:
        return tok(list(texts))

    return ClipBundle(
        model=model,
        name=name,
        model_cfg=cfg,
        preprocess_cfg=pp_cfg,
        preprocess=preprocess,
        preprocess_train=preprocess_train,
        tokenizer=tokenizer,
    )
