#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (no GPU needed): builds nbl_ext._C
# with NBL_FORCE_CUDA=1 against torch 2.14.1+cu130 and the local nvcc, in a
# scratch directory. The cu130 venv (~5.5 GB) is cached outside the clone.
# Required when CI=true or NBL_CUDA_CHECK=1; otherwise skipped without nvcc.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${NBL_CACHE_DIR:-$HOME/.cache/nbl-ext}
CUVENV=$CACHE/venv-cu130
REQUIRED=0
if [ "${CI:-}" = "true" ] || [ "${NBL_CUDA_CHECK:-0}" = "1" ]; then REQUIRED=1; fi

# A toolkit: $CUDA_HOME, else /usr/local/cuda, else the one nvcc on PATH lives in.
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then CUDA_HOME=$(cd "$(dirname "$(readlink -f "$(command -v nvcc)")")/.." && pwd)
  fi
fi
NVCC=${CUDA_HOME:+$CUDA_HOME/bin/nvcc}
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  if [ "$REQUIRED" = 1 ]; then echo "CUDA compile check: no CUDA toolkit (nvcc) found (required on CI)"; exit 1; fi
  echo "CUDA compile check: SKIPPED (no nvcc on this machine; set NBL_CUDA_CHECK=1 to require it)"
  exit 0
fi
"$NVCC" --version | tail -n 1

if ! "$CUVENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__ == '2.14.1+cu130' else 1)" 2>/dev/null; then
  echo "creating $CUVENV (torch 2.14.1+cu130)"
  mkdir -p "$CACHE"
  python3 -m venv --clear "$CUVENV"
  "$CUVENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 numpy pybind11 ninja setuptools wheel
fi
"$CUVENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Build from a copy of the sources in a cache dir (not the clone, whose CPU
# build must stay untouched); tar keeps mtimes, so ninja rebuilds only what changed.
WORK=$CACHE/cuda-check
mkdir -p "$WORK/src"
rm -rf "$WORK/src/csrc" "$WORK/src/nbl_ext"
tar -C "$ROOT" --exclude=.venv --exclude=build --exclude=.git --exclude='*.so' --exclude=bench --exclude=python_tests -cf - . | tar -C "$WORK/src" -xf -
cd "$WORK/src"
rm -rf "$WORK/out"
CUDA_HOME=$CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" NBL_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" \
  MAX_JOBS=${MAX_JOBS:-2} "$CUVENV/bin/python" setup.py -q build_ext --build-lib "$WORK/out" --build-temp "$WORK/tmp"
SO=$(ls "$WORK"/out/nbl_ext/_C*.so)
# The CUDA kernels must be in the binary: the CUDA entry points among its
# symbols, and device code for every requested architecture. (Outputs are
# captured first: `nm | grep -q` fails under pipefail when grep exits early.)
SYMS=$(nm -C "$SO")
# cuobjdump: the toolkit's, else the copy triton ships in the cu130 venv.
CUOBJDUMP=$CUDA_HOME/bin/cuobjdump
[ -x "$CUOBJDUMP" ] || CUOBJDUMP=$(ls "$CUVENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -n 1)
[ -x "$CUOBJDUMP" ] || { echo "CUDA compile check: no cuobjdump to inspect the device code"; exit 1; }
ELFS=$("$CUOBJDUMP" --list-elf "$SO")
for sym in nbl::cov_update_cuda nbl::affine_residual_cuda; do
  grep -q "$sym" <<<"$SYMS" || { echo "CUDA compile check: $sym missing from $SO"; exit 1; }
done
for arch in sm_80 sm_90; do
  grep -q "$arch" <<<"$ELFS" || { echo "CUDA compile check: no $arch device code in $SO"; exit 1; }
done
echo "CUDA compile check: OK ($(basename "$SO"); device code: $(grep -o 'sm_[0-9]*' <<<"$ELFS" | sort -u | tr '\n' ' '))"
