"""``bench/gpu.sh`` and its wheel list: what can be checked without a GPU.

The script runs on a lent GPU machine in one call, so a mistake found there costs the
whole call: the package list must match the lock file, and bad arguments must fail at
once with a message.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_SH = REPO / "bench" / "gpu.sh"


def _needs() -> list[tuple[str, str]]:
    lines = (REPO / "bench" / "gpu_needs.txt").read_text().splitlines()
    return [(ln.split()[0], ln.split()[1]) for ln in lines if ln.strip() and not ln.startswith("#")]


def _lock() -> dict[str, str]:
    pins = {}
    for ln in (REPO / "requirements" / "lock-cpu.txt").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", ln):
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_gpu_needs_are_pinned_installed_and_importable():
    needs = _needs()
    assert {m for m, _ in needs} >= {"open_clip", "ot", "faiss"}
    pins = _lock()
    for module, package in needs:
        assert package.lower() in pins, f"{package} (bench/gpu_needs.txt) is not pinned in requirements/lock-cpu.txt"
        assert importlib.util.find_spec(module) is not None, f"{package} does not provide module {module}"
        assert importlib.metadata.version(package) == pins[package.lower()]


def _gpu_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True, timeout=60, cwd="/")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown argument --bogus"),
        (["--model"], "--model needs a value"),
        (["--python", "/nonexistent/bin/python"], "/nonexistent/bin/python: no such file"),
        (["--wheels", "/nonexistent/wheels"], "/nonexistent/wheels: no such file"),
    ],
)
def test_gpu_sh_refuses_bad_arguments_at_once(args, message):
    r = _gpu_sh(*args)
    assert r.returncode == 2
    assert message in r.stderr


def test_gpu_sh_refuses_a_python_whose_torch_misses_the_device():
    # the interpreter the test venv was made from has no torch
    base = Path(sys.base_prefix) / "bin" / "python3"
    if subprocess.run([str(base), "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip(f"{base} has torch")
    r = _gpu_sh("--python", str(base), "--device", "cpu")
    assert r.returncode == 2
    assert "its torch does not reach device 'cpu'" in r.stderr


def test_gpu_sh_help_is_its_header():
    r = _gpu_sh("--help")
    assert r.returncode == 0
    assert "bash bench/gpu.sh [PAIRS]" in r.stdout and "set -euo" not in r.stdout
