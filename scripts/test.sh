#!/usr/bin/env bash
# The project's test command: services up, venv ready, lint (ruff, mypy, import contracts),
# then pytest (slow tests included).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
scripts/ensure-venv.sh
scripts/ensure-services.sh
.venv/bin/ruff check otcclip tests bench
.venv/bin/mypy otcclip
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
