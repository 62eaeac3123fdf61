"""Build open_clip models: randomly initialised presets, or open_clip's pretrained weights.

:func:`create_model` builds a model with ``pretrained=None`` (training starts there).
:func:`load_pretrained` hands a model name and a ``pretrained`` tag, ``hf-hub:`` name or
weights file to open_clip's own loader (``create_model_and_transforms``), which downloads
into, or reads from, its cache. This module never forces offline mode: whether the hub
may be contacted is the caller's environment (``HF_HUB_OFFLINE``). Checkpoint directories
are loaded by :mod:`otcclip.models.checkpoint`. The shipped JSON configs in
``model_configs/`` are registered with open_clip on first use, next to open_clip's own
standard names (``ViT-B-32`` and friends).
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

from otcclip.models.model_names import HF_HUB_PREFIX, SHIPPED_CONFIG_DIR
from otcclip.models.model_names import shipped_model_names as shipped_model_names

CONFIG_DIR = SHIPPED_CONFIG_DIR
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


def _bundle(model: Any, name: str, cfg: dict[str, Any], pp_cfg: dict[str, Any], *, tok: Any = None) -> ClipBundle:
    """Wrap ``model`` with transforms built from ``pp_cfg`` and a tokenizer.

    ``tok`` is an open_clip tokenizer; by default the simple BPE tokenizer at the text
    tower's context length (what every shipped preset uses).
    """
    pp = PreprocessCfg(**pp_cfg)
    preprocess = image_transform_v2(pp, is_train=False)
    preprocess_train = image_transform_v2(pp, is_train=True)
    if tok is None:
        tok = open_clip.SimpleTokenizer(context_length=int(cfg["text_cfg"].get("context_length", 77)))

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


class ModelLoadError(ValueError):
    """A model name with pretrained weights that cannot be loaded (unknown, unreachable, unfit)."""


#: Suffixes of weight files ``pretrained`` may name (open_clip reads all of them).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_cache_dir(name: str, pretrained: str | None, *, cache_dir: str | Path | None = None) -> Path:
    """Where open_clip looks for (and downloads) the weights of ``name`` + ``pretrained``.

    ``hf-hub:`` names and tags hosted on the Hugging Face Hub live in the hub cache
    (``cache_dir`` or ``HF_HUB_CACHE``) under ``models--<org>--<repo>``; tags with a plain
    download URL in ``cache_dir`` or ``~/.cache/clip``.
    """
    import huggingface_hub.constants

    hub_root = Path(cache_dir) if cache_dir else Path(huggingface_hub.constants.HF_HUB_CACHE)
    if name.startswith(HF_HUB_PREFIX):
        repo = name[len(HF_HUB_PREFIX):]
    else:
        cfg = open_clip.get_pretrained_cfg(name.replace("/", "-"), pretrained or "") or {}
        if cfg.get("hf_hub"):
            repo = os.path.split(cfg["hf_hub"])[0]
        else:
            return Path(cache_dir) if cache_dir else Path(os.path.expanduser("~/.cache/clip"))
    return hub_root / ("models--" + repo.replace("/", "--"))


def _model_cfg(name: str, *, cache_dir: str | Path | None) -> dict[str, Any]:
    """The open_clip model config of a plain or ``hf-hub:`` name (read from the cache for the latter)."""
    if name.startswith(HF_HUB_PREFIX):
        import json

        from open_clip.pretrained import download_pretrained_from_hf

        path = download_pretrained_from_hf(name[len(HF_HUB_PREFIX):], filename="open_clip_config.json",
                                           cache_dir=str(cache_dir) if cache_dir else None)
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
        return dict(cfg.get("model_cfg", cfg))
    return get_model_config(name.replace("/", "-"))


def load_pretrained(
    name: str,
    pretrained: str | Path | None = None,
    *,
    device: str | torch.device | None = "cpu",
    cache_dir: str | Path | None = None,
) -> ClipBundle:
    """Load an open_clip model with pretrained weights through open_clip's own loader.

    Parameters
    ----------
    name : str
        An open_clip config name (``ViT-B-32``), a shipped preset (``otc-micro``) or
        ``hf-hub:org/repo`` (config and weights from that repository).
    pretrained : str or Path, optional
        A pretrained tag of ``name`` (``laion2b_s34b_b79k``, ``openai``) or a local weights
        file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``: a state dict, optionally under
        ``"state_dict"``). Required unless ``name`` is an ``hf-hub:`` name, which ignores it.
    device : str or torch.device, optional
        Target device; ``"auto"`` picks CUDA when present.
    cache_dir : str or Path, optional
        open_clip's download cache (default: the Hugging Face Hub cache, or ``~/.cache/clip``
        for URL-hosted tags).

    Returns
    -------
    ClipBundle
        The model in eval mode, open_clip's merged preprocess config and its tokenizer;
        ``extra`` holds ``model_name`` and ``pretrained``.

    Raises
    ------
    ModelLoadError
        Unknown name or tag, a weights file that does not fit the architecture, or weights
        that are neither cached nor downloadable; the message names the model, the tag and
        the directory where the weights are expected.
    """
    register_shipped_configs()
    hub = name.startswith(HF_HUB_PREFIX)
    tag = None if hub or pretrained is None else str(pretrained)
    if not hub:
        try:
            get_model_config(name.replace("/", "-"))
        except ValueError as e:
            raise ModelLoadError(str(e)) from e
        if not tag:
            raise ModelLoadError(
                f"model {name!r}: pretrained weights are required (a tag such as "
                f"{_tags_hint(name)}, or a weights file)"
            )
    is_file = tag is not None and not open_clip.get_pretrained_cfg(name.replace("/", "-"), tag)
    if is_file and tag is not None:
        if not Path(tag).is_file():
            raise ModelLoadError(
                f"model {name!r}: pretrained {tag!r} is neither a known tag ({_tags_hint(name)}) "
                "nor an existing weights file"
            )
        if not tag.endswith(WEIGHT_SUFFIXES):
            raise ModelLoadError(f"model {name!r}: weights file {tag!r} must end in {', '.join(WEIGHT_SUFFIXES)}")
    dev = resolve_device(device)
    cache = str(cache_dir) if cache_dir else None
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            name, pretrained=tag, cache_dir=cache, device=dev, require_pretrained=True
        )
        model_cfg = _model_cfg(name, cache_dir=cache)
        tok = open_clip.get_tokenizer(name, cache_dir=cache)
    except Exception as e:  # open_clip, torch.load, safetensors and the hub client raise many types
        if is_file:
            raise ModelLoadError(f"model {name!r}: weights file {tag!r} does not fit this architecture: {e}") from e
        where = weights_cache_dir(name, tag, cache_dir=cache_dir)
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        raise ModelLoadError(
            f"cannot load model {name!r} with pretrained {tag or '(from the hub repository)'!r}: the weights "
            f"are not cached in {where} and could not be downloaded"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ' (is the Hugging Face Hub reachable?)'}. "
            "Fetch them on a machine with network access into that directory, or pass a local "
            f"weights file as pretrained. Cause: {e}"
        ) from e
    pp_cfg = _pp_dict(PreprocessCfg(**model.visual.preprocess_cfg))
    model.eval()
    out = _bundle(model, name, model_cfg, pp_cfg, tok=tok)
    out.extra.update({"model_name": name, "pretrained": tag})
    return out


def _tags_hint(name: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
    return ", ".join(repr(t) for t in tags[:6]) if tags else "none are published for this name"
