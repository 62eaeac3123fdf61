#!/usr/bin/env bash
# Wheels for bench/gpu.sh on a GPU machine that reaches no package registry.
#
#   bash bench/gpu_wheels.sh [PYTHON_VERSION] [DEST]     # defaults: 3.12, the checkout's .whl
#
# Run it where pip reaches PyPI. It downloads, for CPython PYTHON_VERSION on x86-64
# Linux, the wheels of the packages the engine needs beyond what a GPU image with
# PyTorch already holds (numpy, scipy, pillow, pyarrow, scikit-learn, safetensors,
# huggingface_hub, timm, regex, tqdm): those of bench/gpu_needs.txt (open_clip and its
# ftfy/wcwidth, POT and FAISS), at the lock file's versions (requirements/lock-cpu.txt). bench/gpu.sh installs the
# folder's wheels with `pip --no-index --no-deps --target`, so nothing there is fetched:
# copy DEST to the machine beside the checkout (the folder is git-ignored).
set -euo pipefail
pyver="${1:-3.12}"
dest="${2:-}"
if [ -n "$dest" ]; then mkdir -p "$dest" && dest="$(cd "$dest" && pwd)"; fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dest="${dest:-$PWD/.whl}"
mapfile -t needs < <(grep -v '^#' bench/gpu_needs.txt | awk 'NF {print $2}')

pins=()
for name in "${needs[@]}"; do
  pin="$(grep -i "^${name}==" requirements/lock-cpu.txt | head -1 | tr -d '[:space:]')"
  [ -n "$pin" ] || { echo "gpu_wheels.sh: $name is not in requirements/lock-cpu.txt" >&2; exit 2; }
  pins+=("$pin")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p "$dest"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$pyver" --implementation cp "${platforms[@]}" -d "$dest" "${pins[@]}"
ls -l "$dest"
du -sh "$dest"
