"""Atomic file writes: a file appears complete under its name or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The process umask at import: files get ``0o666 & ~umask`` (0644 usually), directories ``0o777 & ~umask``.
UMASK = _umask()


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then rename it to ``path``.

    The temp file is removed if ``write`` raises; the parent directory is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_dir(staged: str | Path, path: str | Path) -> Path:
    """Move the fully written directory ``staged`` to ``path``, replacing any old one.

    ``staged`` must be on the same filesystem (create it beside ``path``). Readers see the
    old directory or the new one, never a half-written mix; the old one is removed after.
    """
    staged, path = Path(staged), Path(path)
    os.chmod(staged, 0o777 & ~UMASK)  # mkdtemp makes 0700
    if path.exists():
        graveyard = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
        os.replace(path, graveyard / "old")
        os.replace(staged, path)
        shutil.rmtree(graveyard, ignore_errors=True)
    else:
        os.replace(staged, path)
    return path
