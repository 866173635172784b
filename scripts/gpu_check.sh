#!/usr/bin/env bash
# Check bmc's CUDA artifacts on a lent GPU machine (Python 3.12, torch, cupy, nvcc; no TVM, no network).
#
#   scripts/gpu_check.sh                 # all models in .gpu/, 50 timed runs each
#   scripts/gpu_check.sh --repeat 200 --models block
#   scripts/gpu_check.sh --dry-run       # no GPU needed (with a stub libcuda.so.1 on LD_LIBRARY_PATH)
#
# Needs the carried folder .gpu/ written by `python scripts/prepare_gpu_check.py` on the build machine
# (device run tool: carry=[".gpu"]). Installs nothing system-wide: the tvm-ffi wheel is unpacked into a temp dir.
# Exit status: 0 all PASS, 1 a model failed, 2 setup problem.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gpu=${BMC_GPU_DIR:-$repo/.gpu}
py=${PYTHON:-python3}
ffi_version=0.1.14.post1

[ -f "$gpu/MANIFEST.json" ] || { echo "no $gpu/MANIFEST.json: run scripts/prepare_gpu_check.py first" >&2; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader || true

deps=$(mktemp -d "${TMPDIR:-/tmp}/bmc-gpu-deps.XXXXXX")
trap 'rm -rf "$deps"' EXIT
tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheel=$(ls "$gpu"/wheels/apache_tvm_ffi-"$ffi_version"-"$tag"-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ]; then
  # a wheel is a zip: unpacking it onto sys.path is an install (works without pip)
  "$py" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$wheel" "$deps"
elif "$py" -c "import importlib.metadata as m, sys; sys.exit(m.version('apache-tvm-ffi') != '$ffi_version')" 2>/dev/null; then
  echo "no $tag wheel in $gpu/wheels; using the installed apache-tvm-ffi $ffi_version"
else
  echo "no apache-tvm-ffi $ffi_version wheel for $tag in $gpu/wheels (prepare_gpu_check.py fetches cp312)" >&2
  exit 2
fi
path="$deps:$gpu/site:$gpu/src"
"$py" -c 'import typing_extensions' 2>/dev/null || path="$path:$gpu/fallback"
"$py" -c 'import numpy' || { echo "numpy is missing" >&2; exit 2; }

export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
export TVM_USE_RUNTIME_LIB=1
rc=0
"$py" "$repo/scripts/gpu_check.py" --root "$gpu" "$@" || rc=$?
exit "$rc"
