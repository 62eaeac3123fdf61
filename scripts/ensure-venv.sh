#!/usr/bin/env bash
# Make ./.venv ready on a fresh clone, reusing a dependency venv cached by the lock's hash.
#
# The heavy dependencies (torch, open_clip, faiss, ...) live in a venv under
# ${OTCCLIP_VENV_CACHE:-~/.cache/otcclip/venvs}/<sha256 of the lock + python version>;
# it is built once (about 80 s, ~6 GB) and shared by every clone with the same lock.
# ./.venv is a thin venv that sees that cache through a .pth file and holds this
# checkout on its path, with the console script `otcclip`, so `./.venv/bin/otcclip` runs this clone's code.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
PY="${OTCCLIP_PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
lock="requirements/lock-cpu.txt"
key="$( (cat "$lock"; "$PY" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)"
cache_root="${OTCCLIP_VENV_CACHE:-$HOME/.cache/otcclip/venvs}"
deps="$cache_root/$key"
if [ ! -f "$deps/.complete" ]; then
  echo "otcclip: building dependency venv $deps (first run only; ~80 s)" >&2
  mkdir -p "$cache_root"
  tmp="$(mktemp -d "$cache_root/.build.XXXXXX")"
  "$PY" -m venv "$tmp"
  "$tmp/bin/pip" install -q --disable-pip-version-check -r "$lock" 2> >(grep -v "is ignored: it is neither a file" >&2)
  touch "$tmp/.complete"
  rm -rf "$deps"
  # venvs embed their own path in scripts; we only use its site-packages, so a rename is safe.
  mv "$tmp" "$deps"
fi
site_rel="lib/python$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages"
stamp=".venv/.otcclip-deps"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$deps" ] || [ ! -x .venv/bin/otcclip ] || [ ! -x .venv/bin/ruff ] || [ ! -x .venv/bin/lint-imports ]; then
  rm -rf .venv
  "$PY" -m venv --without-pip .venv
  echo "$deps/$site_rel" > ".venv/$site_rel/_otcclip_deps.pth"
  # This checkout on the path (like an editable install, without needing a build backend).
  echo "$here" > ".venv/$site_rel/_otcclip_src.pth"
  cat > .venv/bin/otcclip <<SH
#!$here/.venv/bin/python
import sys
from otcclip.cli import main
sys.exit(main())
SH
  chmod +x .venv/bin/otcclip
  # ruff is a native binary (its `python -m ruff` would find this shim again): link it.
  ln -sf "$deps/bin/ruff" .venv/bin/ruff
  for tool in pytest mypy alembic celery uvicorn; do
    printf '#!/bin/sh\nexec "%s/.venv/bin/python" -m %s "$@"\n' "$here" "$tool" > ".venv/bin/$tool"
    chmod +x ".venv/bin/$tool"
  done
  # console scripts of the cache venv carry its build path in their shebang: wrap them
  printf '#!/bin/sh\nexec "%s/.venv/bin/python" -c "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())" "$@"\n' "$here" > .venv/bin/lint-imports
  chmod +x .venv/bin/lint-imports
  echo "$deps" > "$stamp"
fi
