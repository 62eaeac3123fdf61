#!/usr/bin/env bash
# The sanitization engine and a training step on one CUDA GPU, in one call (< 8 minutes).
#
#   bash bench/gpu.sh [PAIRS] [--python PY] [--wheels DIR] [--venv DIR] [--device DEV] [--model NAME]
#
# PAIRS defaults to 100000.
# 1. A Python whose torch reaches the device, the first of: --python PY; the venv DIR
#    (default .venv-gpu) if its torch reaches it; the machine's own `python3` (a GPU image
#    with PyTorch) if its torch does; else a new venv DIR built from a package registry with
#    requirements/lock-cpu.txt (PyPI's torch wheel carries CUDA), with faiss-gpu in place
#    of faiss-cpu when pip can install it.
# 2. What that Python lacks of bench/gpu_needs.txt (open_clip, POT, FAISS) is installed
#    into .gpu-site with `pip --target`, at the lock file's versions: from the wheels in
#    --wheels DIR, or in .whl when that folder is there (a machine that reaches no registry:
#    make it where pip works with `bash bench/gpu_wheels.sh` and copy it beside the
#    checkout; it is git-ignored), else from the registry.
# 3. bench/step_cost.py --device DEV: `otcclip`'s training step against plain CLIP's on
#    `otc-tiny` (the defence benchmark's model), and the host syncs torch reports for each
#    step. At most 90 s on a GPU.
# 4. bench/sanitize.py --gpu PAIRS: ViT-B-32 (--model) with random weights encodes PAIRS
#    synthetic images and captions in float16, OT on the device, the FAISS shortlist (on
#    the GPU with faiss-gpu, else on the CPU; the table's header says which), decisions;
#    pairs/s per stage and end to end. At most 360 s on a GPU.
# A benchmark that fails or runs out of time is reported and the script goes on; it exits
# non-zero if any did.
#
# A smoke test of the script on a machine without a GPU (no time limits), with the
# project's venv (`make venv`):
#   bash bench/gpu.sh 2000 --python .venv/bin/python --device cpu --model otc-tiny
set -euo pipefail
die() { echo "gpu.sh: $*" >&2; exit 2; }
abspath() {  # an existing path, absolute (resolved before the script changes directory)
  [ -e "$1" ] || die "$1: no such file or folder"
  if [ -d "$1" ]; then (cd "$1" && pwd); else echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; fi
}
pairs=100000
py=""
venv=""
wheels=""
device=cuda
model=ViT-B-32
while [ $# -gt 0 ]; do
  case "$1" in --python|--wheels|--venv|--device|--model)
    [ $# -ge 2 ] || die "$1 needs a value (see --help)" ;;
  esac
  case "$1" in
    --python) case "$2" in */*) py="$(abspath "$2")" ;; *) py="$2" ;; esac; shift 2 ;;
    --wheels) wheels="$(abspath "$2")"; shift 2 ;;
    --venv) mkdir -p "$(dirname "$2")"; venv="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    [0-9]*) pairs="$1"; shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${venv:-$PWD/.venv-gpu}"
site="$PWD/.gpu-site"
if [ -z "$wheels" ] && [ -d .whl ]; then wheels="$PWD/.whl"; fi
start=$(date +%s)
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi

reach='import sys, torch
d = sys.argv[1]
ok = d == "cpu" or torch.cuda.is_available()
if not ok:
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU", file=sys.stderr)
sys.exit(0 if ok else 1)'
sees_device() {  # does this Python's torch reach $device? (why not, on stderr, with --why)
  command -v "$1" >/dev/null 2>&1 || { [ "${2:-}" = --why ] && echo "$1: not found" >&2; return 1; }
  if [ "${2:-}" = --why ]; then "$1" -c "$reach" "$device"; else "$1" -c "$reach" "$device" 2>/dev/null; fi
}
pin() {  # NAME==VERSION of a package, from the lock file
  local p
  p="$(grep -i "^$1==" requirements/lock-cpu.txt | head -1 | tr -d '[:space:]')"
  [ -n "$p" ] || die "$1 is not in requirements/lock-cpu.txt"
  echo "$p"
}
registry=(-q --disable-pip-version-check)

if [ -n "$py" ]; then
  sees_device "$py" --why || die "$py: its torch does not reach device '$device'"
elif sees_device "$venv/bin/python"; then
  py="$venv/bin/python"
elif sees_device python3; then
  py="$(command -v python3)"
else
  echo "gpu.sh: neither $venv nor python3 has a torch that reaches '$device'; building $venv from the registry"
  [ ! -e "$venv" ] || [ -f "$venv/pyvenv.cfg" ] || die "$venv exists and is not a venv; name another with --venv"
  base="${OTCCLIP_PYTHON:-python3.11}"
  command -v "$base" >/dev/null || base=python3
  rm -rf "$venv"
  "$base" -m venv "$venv"
  "$venv/bin/pip" install "${registry[@]}" -r requirements/lock-cpu.txt \
    || die "pip could not install requirements/lock-cpu.txt (no registry here? give --python a Python with torch)"
  fv="$("$venv/bin/python" -c 'import faiss; print(faiss.__version__)')"
  if "$venv/bin/pip" install "${registry[@]}" "faiss-gpu==$fv"; then
    "$venv/bin/pip" uninstall -q -y faiss-cpu || true
    "$venv/bin/pip" install "${registry[@]}" --force-reinstall --no-deps "faiss-gpu==$fv" \
      || echo "gpu.sh: faiss-gpu reinstall failed; the shortlist may run on the CPU" >&2
  else
    echo "gpu.sh: faiss-gpu==$fv not installable here; the shortlist runs on the CPU" >&2
  fi
  py="$venv/bin/python"
  sees_device "$py" --why || die "$py: its torch does not reach device '$device'"
fi

# the engine's packages this Python lacks (bench/gpu_needs.txt), into .gpu-site
missing=()
while read -r module package; do
  if ! "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' "$module" 2>/dev/null; then
    missing+=("$(pin "$package")")
  fi
done < <(grep -v '^#' bench/gpu_needs.txt | awk 'NF')
path="$PWD"
if [ "${#missing[@]}" -gt 0 ]; then
  echo "gpu.sh: installing ${missing[*]} into $site from ${wheels:-the registry}"
  rm -rf "$site"
  from=("${registry[@]}")
  if [ -n "$wheels" ]; then from+=(--no-index --find-links "$wheels"); fi
  "$py" -m pip install "${from[@]}" --no-deps --no-compile --target "$site" "${missing[@]}" \
    || die "could not install ${missing[*]}${wheels:+ from $wheels (made by bench/gpu_wheels.sh for the version of this Python?)}"
  path="$PWD:$site"
fi
export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu.sh: $py ready after $(( $(date +%s) - start )) s"
"$py" -c 'import sys, torch, open_clip, ot, faiss
print("python", sys.version.split()[0], "| torch", torch.__version__, "| open_clip", open_clip.__version__,
      "| POT", ot.__version__, "| faiss", faiss.__version__,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'

failed=0
bench() {  # LIMIT_S NAME COMMAND...: run one benchmark; report a failure or timeout and go on
  local limit="$1" name="$2" rc=0
  shift 2
  if [ "$device" = cpu ]; then "$@" || rc=$?; else timeout "$limit" "$@" || rc=$?; fi
  if [ "$rc" = 124 ]; then echo "gpu.sh: $name ran out of its $limit s" >&2; failed=1
  elif [ "$rc" != 0 ]; then echo "gpu.sh: $name failed (exit $rc)" >&2; failed=1; fi
  echo
}
bench 90 "the training step" "$py" bench/step_cost.py --device "$device" --model otc-tiny --repeats 10
bench 360 "the sanitize run" "$py" bench/sanitize.py --gpu "$pairs" --gpu-device "$device" --gpu-model "$model"
echo "gpu.sh: $(( $(date +%s) - start )) s in all"
exit "$failed"
