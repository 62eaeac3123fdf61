"""The checkpoint format: a directory plain open_clip can load without this project.

Layout (DESIGN section 3)::

    CKPT_DIR/open_clip_config.json      {"model_cfg": {...}, "preprocess_cfg": {...}, "otcclip": {...}}
    CKPT_DIR/open_clip_model.safetensors

Plain open_clip loads it with ``open_clip.create_model_and_transforms("local-dir:CKPT_DIR")``,
and :func:`load_checkpoint` loads through that same path, so a folder in open_clip's own
Hugging Face layout (``open_clip_config.json`` with ``open_clip_pytorch_model.bin`` or
``open_clip_model.safetensors``, a ``preprocess_cfg`` holding only some keys) loads too.
Writes are atomic: the directory appears complete or not at all.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch
from open_clip.transform import PreprocessCfg

from otcclip.models.atomic import replace_dir
from otcclip.models.factory import ClipBundle, _bundle, _pp_dict, resolve_device

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
#: Weight files open_clip's ``local-dir:`` loader looks for, in its order of preference.
WEIGHTS_NAMES = (
    WEIGHTS_NAME, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
)


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


def weights_file(path: str | Path) -> Path | None:
    """The weights file of checkpoint directory ``path`` that open_clip would load, if any."""
    path = Path(path)
    return next((path / n for n in WEIGHTS_NAMES if (path / n).is_file()), None)


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """Return the parsed ``open_clip_config.json`` of a checkpoint directory."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file() or weights_file(path) is None:
        raise CheckpointError(f"{path}: not a checkpoint (needs {CONFIG_NAME} and {WEIGHTS_NAME} "
                              "or another open_clip weights file)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON: {e}") from e
    if "model_cfg" not in cfg:
        raise CheckpointError(f"{cfg_file}: missing 'model_cfg'")
    return dict(cfg)


def load_checkpoint(path: str | Path, *, device: str | torch.device | None = "cpu") -> ClipBundle:
    """Load a checkpoint directory written by :func:`save_checkpoint` or by open_clip.

    open_clip's ``local-dir:`` loader builds the model and fills in the preprocess config:
    its defaults, updated by the keys the file's ``preprocess_cfg`` holds, with the size
    taken from the image tower.

    Raises
    ------
    CheckpointError
        If files are missing or the weights do not fit the config.
    """
    path = Path(path)
    cfg = read_checkpoint_config(path)
    name = cfg.get("otcclip", {}).get("model_name", path.name)
    dev = resolve_device(device)
    local = f"local-dir:{path.resolve()}"
    try:
        model = open_clip.create_model(local, device=dev, require_pretrained=True)
    except (RuntimeError, AssertionError) as e:  # open_clip asserts on embedding shapes
        raise CheckpointError(f"{path}: weights do not match config: {e}") from e
    except Exception as e:  # config errors, unreadable weights (pickle, safetensors)
        raise CheckpointError(f"{path}: cannot load the model: {e}") from e
    pp_cfg = _pp_dict(PreprocessCfg(**model.visual.preprocess_cfg))
    out = _bundle(model.eval(), name, dict(cfg["model_cfg"]), pp_cfg, tok=open_clip.get_tokenizer(local))
    out.extra.update(cfg.get("otcclip", {}))
    return out
