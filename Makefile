# The two commands of this project (see README.md). Each sets itself up on a fresh clone.
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test lint bench-sanitize bench-defence

venv:
	@scripts/ensure-venv.sh

demo: venv
	.venv/bin/otcclip demo

test: venv
	scripts/test.sh

lint: venv
	.venv/bin/ruff check otcclip tests bench
	.venv/bin/mypy otcclip
	.venv/bin/lint-imports

bench-sanitize: venv
	.venv/bin/python bench/sanitize.py

bench-defence: venv
	.venv/bin/python bench/defence.py --quick
