#!/usr/bin/env bash
# The sanitization engine on one CUDA GPU, from a clean checkout, in one call (< 8 minutes).
#
#   bash bench/gpu.sh [PAIRS]          # default 100000
#
# 1. A venv of its own (.venv-gpu, or $OTCCLIP_GPU_VENV) from requirements/lock-cpu.txt
#    (PyPI's torch wheel carries CUDA), with faiss-gpu in place of faiss-cpu when pip
#    can install it (else the shortlist stays on the CPU and the table says so). With
#    $OTCCLIP_WHEELS set, pip installs from that folder of wheels only (machines without
#    a registry). An existing venv whose torch sees a GPU is reused as it is.
# 2. bench/sanitize.py --gpu PAIRS: ViT-B-32 with random weights encodes PAIRS synthetic
#    images and captions in float16, OT on the device, FAISS shortlist on the GPU,
#    decisions; prints pairs/s per stage and end to end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pairs="${1:-100000}"
venv="${OTCCLIP_GPU_VENV:-.venv-gpu}"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

pip_args=(-q --disable-pip-version-check)
if [ -n "${OTCCLIP_WHEELS:-}" ]; then
  pip_args+=(--no-index --find-links "$OTCCLIP_WHEELS")
fi
if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  py="${OTCCLIP_PYTHON:-python3.11}"
  command -v "$py" >/dev/null || py=python3
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install "${pip_args[@]}" -r requirements/lock-cpu.txt
  fv="$("$venv/bin/python" -c 'import faiss; print(faiss.__version__)')"
  if "$venv/bin/pip" install "${pip_args[@]}" "faiss-gpu==$fv"; then
    "$venv/bin/pip" uninstall -q -y faiss-cpu || true
    "$venv/bin/pip" install "${pip_args[@]}" --force-reinstall --no-deps "faiss-gpu==$fv" \
      || echo "gpu.sh: faiss-gpu reinstall failed; the shortlist may run on the CPU" >&2
  else
    echo "gpu.sh: faiss-gpu==$fv not installable here; the shortlist runs on the CPU" >&2
  fi
fi
echo "gpu.sh: environment ready after $(( $(date +%s) - start )) s"
"$venv/bin/python" -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"; print(torch.cuda.get_device_name(0))'
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "${OTCCLIP_GPU_TIMEOUT:-420}" \
  "$venv/bin/python" bench/sanitize.py --gpu "$pairs"
echo "gpu.sh: $(( $(date +%s) - start )) s in all"
