"""The checkpoint format: a directory plain open_clip can load without this project.

Layout (DESIGN section 3)::

    CKPT_DIR/open_clip_config.json      {"model_cfg": {...}, "preprocess_cfg": {...}, "otcclip": {...}}
    CKPT_DIR/open_clip_model.safetensors

Plain open_clip loads it with ``open_clip.create_model_and_transforms("local-dir:CKPT_DIR")``.
Writes are atomic: the directory appears complete or not at all.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from otcclip.models.atomic import replace_dir
from otcclip.models.factory import ClipBundle, _bundle, create_model, resolve_device

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or does not match its config."""


def save_checkpoint(bundle: ClipBundle, path: str | Path, *, meta: dict[str, Any] | None = None) -> Path:
    """Write ``bundle`` to ``path`` atomically (replacing an existing checkpoint there).

    Parameters
    ----------
    bundle : ClipBundle
        The model and its configs.
    path : str or Path
        Target directory.
    meta : dict, optional
        Extra JSON-able information stored under the ``"otcclip"`` key (epoch, defence...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in bundle.model.state_dict().items()}
        safetensors.torch.save_file(state, str(tmp / WEIGHTS_NAME))
        cfg = {
            "model_cfg": bundle.model_cfg,
            "preprocess_cfg": bundle.preprocess_cfg,
            "otcclip": {"model_name": bundle.name, **(meta or {})},
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """Return the parsed ``open_clip_config.json`` of a checkpoint directory."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file() or not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{path}: not a checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON: {e}") from e
    if "model_cfg" not in cfg:
        raise CheckpointError(f"{cfg_file}: missing 'model_cfg'")
    return dict(cfg)


def load_checkpoint(path: str | Path, *, device: str | torch.device | None = "cpu") -> ClipBundle:
    """Load a checkpoint directory written by :func:`save_checkpoint` (or by open_clip).

    Raises
    ------
    CheckpointError
        If files are missing or the weights do not fit the config.
    """
    path = Path(path)
    cfg = read_checkpoint_config(path)
    name = cfg.get("otcclip", {}).get("model_name", path.name)
    bundle = create_model(name, device="cpu", model_cfg=cfg["model_cfg"])
    state = safetensors.torch.load_file(str(path / WEIGHTS_NAME))
    try:
        bundle.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match config: {e}") from e
    pp_cfg = cfg.get("preprocess_cfg") or bundle.preprocess_cfg
    bundle.model.visual.preprocess_cfg = pp_cfg
    model = bundle.model.to(resolve_device(device)).eval()
    out = _bundle(model, name, cfg["model_cfg"], pp_cfg)
    out.extra.update(cfg.get("otcclip", {}))
    return out
