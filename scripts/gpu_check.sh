#!/usr/bin/env bash
# Check bmc's CUDA artifacts on a lent GPU machine (Python 3.12, torch, cupy, nvcc; no TVM, no network).
#
#   scripts/gpu_check.sh                 # all models in .gpu/, 50 timed runs each
#   scripts/gpu_check.sh --repeat 200 --models block
#   scripts/gpu_check.sh --dry-run       # no GPU needed (with a stub libcuda.so.1 on LD_LIBRARY_PATH)
#
# Needs the carried folder .gpu/ written by `python scripts/prepare_gpu_check.py` on the build machine
# (device run tool: carry=[".gpu"]): its bundle.tar.xz is unpacked into a temp dir first (an unpacked folder, e.g.
# BMC_GPU_DIR=.gpu-build, is used as it is). Installs nothing system-wide: the carried wheels (tvm-ffi, mpich,
# mpi4py) are unpacked into the temp dir too. Results: a table on stdout, JSON in $OUT (or .gpu/out):
# gpu_check.json, gpu.json.
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
if [ -f "$gpu/bundle.tar.xz" ]; then  # packed (prepare_gpu_check.py: xz halves what is carried)
  "$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    "$gpu/bundle.tar.xz" "$deps/gpu" || { echo "cannot unpack $gpu/bundle.tar.xz" >&2; exit 2; }
  ln -s "$gpu/MANIFEST.json" "$gpu/wheels" "$deps/gpu/"
  gpu=$deps/gpu
fi
tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
[ "$tag" = cp312 ] || echo "warning: the carried wheels are cp312; this python is $tag" >&2
# a wheel is a zip: unpacking it onto sys.path is an install (works without pip); mpich's programs and libmpi sit
# in its .data folder, which the launcher and mpi4py find through PATH and LD_LIBRARY_PATH
for w in "$gpu"/wheels/*.whl; do
  "$py" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$deps"
done
mpich=$(ls -d "$deps"/mpich-*.data/data 2>/dev/null | head -n1 || true)
if [ -n "$mpich" ]; then
  chmod +x "$mpich"/bin/*
  export PATH="$mpich/bin:$PATH" LD_LIBRARY_PATH="$mpich/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export BMC_CUDA_KERNELS_LIB="$gpu/lib/libbmc_cuda_kernels.so"
# the carried libcudart.so.13 (what libtvm_runtime_cuda.so links), after the system's, also for the MPI ranks
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$gpu/lib"
path="$deps:$gpu/site:$gpu/src"
"$py" -c 'import typing_extensions' 2>/dev/null || path="$path:$gpu/fallback"
"$py" -c 'import numpy' || { echo "numpy is missing" >&2; exit 2; }

export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
export TVM_USE_RUNTIME_LIB=1
"$py" -c 'import tvm_ffi, mpi4py' || { echo "the carried wheels do not import (tvm-ffi $ffi_version, mpi4py)" >&2; exit 2; }
out=${OUT:-$repo/.gpu/out}
mkdir -p "$out"
rc=0
"$py" "$repo/scripts/gpu_check.py" --root "$gpu" --json "$out/gpu_check.json" "$@" || rc=$?
if [ -d "$gpu/bench" ] && [[ " $* " != *" --dry-run "* ]]; then
  "$py" "$repo/benchmarks/gpu.py" run --root "$gpu/bench" --json "$out/gpu.json" --profile || rc=$((rc ? rc : 1))
fi
exit "$rc"
