#!/usr/bin/env bash
# The test command (README, .ci/run): set up, build, and run every check.
#   1. scripts/setup_env.sh: .venv with torch==2.13.0 (CPU) + tested deps, build nbl_ext._C
#   2. C++ tests of the CPU kernels (CMake + ctest)
#   3. the pytest suite (python_tests/)
#   4. a compile-only build of the CUDA kernels with torch 2.14.1+cu130 and nvcc
#      (scripts/cuda_compile_check.sh; required when CI=true or NBL_CUDA_CHECK=1,
#      skipped with a notice on machines without nvcc otherwise)
# Extra arguments are passed to pytest (e.g. scripts/test.sh -k accumulator).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source scripts/setup_env.sh
JOBS=${MAX_JOBS:-2}

_step "C++ tests (ctest)"
TORCH_CMAKE=$("$PYBIN" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" \
      -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" -DNBL_WITH_CUDA=OFF >/dev/null
cmake --build build/cmake -j "$JOBS"
ctest --test-dir build/cmake --output-on-failure

_step "pytest"
"$PYBIN" -m pytest python_tests -ra "$@"

_step "CUDA kernels: compile-only check"
bash scripts/cuda_compile_check.sh
