"""Which model names exist, answered without importing torch or open_clip.

An API process validates ``settings.model`` at submit time and must not pay for (or
depend on) a torch import to do it. open_clip describes each architecture it ships in a
JSON file in its package's ``model_configs`` directory; this module locates that directory
with :func:`importlib.util.find_spec`, which finds a package without executing it, and
reads the file names. The presets this project ships (``model_configs/`` beside this
module) are added, and ``hf-hub:org/repo`` names are accepted by form: whether such a
repository exists is only known when its weights are fetched.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
from functools import cache
from pathlib import Path

#: Directory of the configs this package ships (``otc-micro``, ``otc-tiny``, ``otc-small``).
SHIPPED_CONFIG_DIR = Path(__file__).parent / "model_configs"
HF_HUB_PREFIX = "hf-hub:"
_HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
#: Keys open_clip requires of a model config file before it registers it.
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


class UnknownModelError(ValueError):
    """A model name that neither open_clip nor this package has a config for."""


def open_clip_config_dir() -> Path | None:
    """The installed open_clip package's ``model_configs`` directory, or None without open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model_configs"
        if candidate.is_dir():
            return candidate
    return None


def _config_names(directory: Path | None) -> frozenset[str]:
    """Stems of the JSON files in ``directory`` that open_clip would register as models."""
    if directory is None:
        return frozenset()
    names = set()
    for path in directory.glob("*.json"):
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(cfg, dict) and all(k in cfg for k in _CONFIG_KEYS):
            names.add(path.stem)
    return frozenset(names)


def shipped_model_names() -> list[str]:
    """Names of the configs this package ships (the small CPU presets), sorted."""
    return sorted(_config_names(SHIPPED_CONFIG_DIR))


@cache
def known_model_names() -> frozenset[str]:
    """Every plain model name: open_clip's shipped configs and this package's presets."""
    return _config_names(open_clip_config_dir()) | _config_names(SHIPPED_CONFIG_DIR)


def _plain(name: str) -> str:
    """open_clip's own normalisation of a schema-less name (``ViT-B/32`` -> ``ViT-B-32``)."""
    return name.replace("/", "-")


def known_model(name: str) -> bool:
    """True when ``name`` is a config name open_clip or this package knows, or an ``hf-hub:org/repo`` name."""
    if name.startswith(HF_HUB_PREFIX):
        return bool(_HF_REPO.match(name[len(HF_HUB_PREFIX):]))
    return _plain(name) in known_model_names()


def validate_model_name(name: str) -> str:
    """Return ``name`` when :func:`known_model` accepts it.

    Raises
    ------
    UnknownModelError
        With the closest known names, so that a typo is easy to fix.
    """
    if known_model(name):
        return name
    if name.startswith(HF_HUB_PREFIX):
        raise UnknownModelError(f"model {name!r}: expected 'hf-hub:<org>/<repo>'")
    close = difflib.get_close_matches(_plain(name), sorted(known_model_names()), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}: not an open_clip config name, a shipped preset "
        f"({', '.join(shipped_model_names())}) or 'hf-hub:<org>/<repo>'{hint}"
    )
