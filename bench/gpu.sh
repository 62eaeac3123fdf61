#!/usr/bin/env bash
# The sanitization engine and a training step on one CUDA GPU, in one call (< 8 minutes).
#
#   bash bench/gpu.sh [PAIRS] [--python PY] [--wheels DIR] [--venv DIR] [--device DEV] [--model NAME]
#
# PAIRS defaults to 100000.
# 1. A Python whose torch sees the GPU, the first of: --python PY; the venv DIR (default
#    .venv-gpu) if one is there; the machine's own `python3` (a GPU image with PyTorch);
#    else a new venv DIR from requirements/lock-cpu.txt (PyPI's torch wheel carries CUDA),
#    with faiss-gpu in place of faiss-cpu when pip can install it.
# 2. What that Python lacks of the engine's packages (open_clip, POT, FAISS) is installed
#    into .gpu-site with `pip --target`, at the lock file's versions: from the wheels in
#    --wheels DIR, or in .whl when that folder is there (a machine that reaches no registry:
#    make it where pip works with `bash bench/gpu_wheels.sh` and copy it beside the
#    checkout), else from the registry.
# 3. bench/sanitize.py --gpu PAIRS: ViT-B-32 (--model) with random weights encodes PAIRS
#    synthetic images and captions in float16, OT on the device, the FAISS shortlist (on
#    the GPU with faiss-gpu, else on the CPU; the table's header says which), decisions;
#    pairs/s per stage and end to end. At most 360 s.
# 4. bench/step_cost.py --device cuda: `otcclip`'s training step against plain CLIP's on
#    `otc-tiny` (the defence benchmark's model), and the host syncs of each step. At most
#    90 s.
#
# A smoke test of the script on a machine without a GPU:
#   bash bench/gpu.sh 2000 --device cpu --model otc-tiny
set -euo pipefail
pairs=100000
py=""
venv=.venv-gpu
wheels=""
device=cuda
model=ViT-B-32
while [ $# -gt 0 ]; do
  case "$1" in --python|--wheels|--venv|--device|--model)
    [ $# -ge 2 ] || { echo "gpu.sh: $1 needs a value (see --help)" >&2; exit 2; } ;;
  esac
  case "$1" in
    --python) py="$2"; case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac; shift 2 ;;
    --wheels) wheels="$(cd "$2" && pwd)"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    [0-9]*) pairs="$1"; shift ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."
site="$PWD/.gpu-site"
if [ -z "$wheels" ] && [ -d .whl ]; then wheels="$PWD/.whl"; fi
start=$(date +%s)
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi

pip_args=(-q --disable-pip-version-check)
if [ -n "$wheels" ]; then pip_args+=(--no-index --find-links "$wheels"); fi

sees_device() {  # does this Python's torch reach $device?
  [ -x "$(command -v "$1" || true)" ] || return 1
  "$1" -c 'import sys, torch; d = sys.argv[1]; sys.exit(0 if d == "cpu" or torch.cuda.is_available() else 1)' \
    "$device" 2>/dev/null
}
pin() {  # NAME==VERSION of a package, from the lock file
  grep -i "^$1==" requirements/lock-cpu.txt | head -1 | tr -d '[:space:]'
}

if [ -n "$py" ]; then
  :
elif sees_device "$venv/bin/python"; then
  py="$venv/bin/python"
elif sees_device python3; then
  py="$(command -v python3)"
else
  base="${OTCCLIP_PYTHON:-python3.11}"
  command -v "$base" >/dev/null || base=python3
  rm -rf "$venv"
  "$base" -m venv "$venv"
  "$venv/bin/pip" install "${pip_args[@]}" -r requirements/lock-cpu.txt
  fv="$("$venv/bin/python" -c 'import faiss; print(faiss.__version__)')"
  if "$venv/bin/pip" install "${pip_args[@]}" "faiss-gpu==$fv"; then
    "$venv/bin/pip" uninstall -q -y faiss-cpu || true
    "$venv/bin/pip" install "${pip_args[@]}" --force-reinstall --no-deps "faiss-gpu==$fv" \
      || echo "gpu.sh: faiss-gpu reinstall failed; the shortlist may run on the CPU" >&2
  else
    echo "gpu.sh: faiss-gpu==$fv not installable here; the shortlist runs on the CPU" >&2
  fi
  py="$venv/bin/python"
fi
sees_device "$py" || { echo "gpu.sh: $py: torch does not reach device '$device'" >&2; exit 1; }

# the engine's packages this Python lacks (module:package), into .gpu-site
missing=()
for mp in open_clip:open_clip_torch ftfy:ftfy wcwidth:wcwidth ot:POT faiss:faiss-cpu; do
  "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "${mp%%:*}" \
    2>/dev/null || missing+=("$(pin "${mp#*:}")")
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${#missing[@]}" -gt 0 ]; then
  echo "gpu.sh: installing ${missing[*]} into $site${wheels:+ from $wheels}"
  rm -rf "$site"
  "$py" -m pip install "${pip_args[@]}" --no-deps --no-compile --target "$site" "${missing[@]}"
  export PYTHONPATH="$PWD:$site"
fi
echo "gpu.sh: $py ready after $(( $(date +%s) - start )) s"
"$py" -c 'import sys, torch, open_clip, ot, faiss
print("python", sys.version.split()[0], "| torch", torch.__version__, "| open_clip", open_clip.__version__,
      "| POT", ot.__version__, "| faiss", faiss.__version__,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'

timeout 360 "$py" bench/sanitize.py --gpu "$pairs" --gpu-device "$device" --gpu-model "$model"
echo
timeout 90 "$py" bench/step_cost.py --device "$device" --model otc-tiny --repeats 10
echo "gpu.sh: $(( $(date +%s) - start )) s in all"
