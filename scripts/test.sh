#!/usr/bin/env bash
# The test command (README, .ci/run): set up, build, and run every check.
#   1. scripts/setup_env.sh: .venv with torch==2.13.0 (CPU) + tested deps, build nbl_ext._C
#      (each step skipped while its inputs are unchanged: seconds on a set-up tree)
#   2. ruff check + ruff format --check on nbl_ext/ bench/ scripts/ python_tests/ (settings: pyproject.toml);
#      a failure is reported at the end, after the tests have run
#   3. C++ tests of the CPU kernels (CMake + ctest)
#   4. the pytest suite (python_tests/)
#   5. a compile-only build of the CUDA kernels with torch 2.14.1+cu130 and nvcc
#      (scripts/cuda_compile_check.sh; required when CI=true or NBL_CUDA_CHECK=1,
#      skipped with a notice on machines without nvcc otherwise)
#   6. the README's Install commands on a fresh venv (scripts/check_install.sh, several minutes):
#      in a full run (no pytest arguments) unless NBL_INSTALL_CHECK=0; NBL_INSTALL_CHECK=1 forces it
# Extra arguments are passed to pytest (e.g. scripts/test.sh -k accumulator).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source scripts/setup_env.sh
JOBS=${MAX_JOBS:-2}
LINT_DIRS=(nbl_ext bench scripts python_tests)

_step "lint: ruff check, ruff format --check"
LINT_FAILED=()
"$VENV/bin/ruff" check "${LINT_DIRS[@]}" || LINT_FAILED+=("ruff check")
"$VENV/bin/ruff" format --check "${LINT_DIRS[@]}" || LINT_FAILED+=("ruff format --check")

_step "C++ tests (ctest)"
TORCH_CMAKE=$("$PYBIN" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
# Configured once per torch (a reconfigure finds Torch again, which takes a while); ninja re-runs CMake
# by itself when CMakeLists.txt changes.
if ! grep -qsF "CMAKE_PREFIX_PATH:UNINITIALIZED=$TORCH_CMAKE" build/cmake/CMakeCache.txt \
   || [ ! -f build/cmake/build.ninja ]; then
  cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" \
        -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" -DNBL_WITH_CUDA=OFF >/dev/null
fi
cmake --build build/cmake -j "$JOBS"
ctest --test-dir build/cmake --output-on-failure

_step "pytest"
"$PYBIN" -m pytest python_tests -ra "$@"

_step "CUDA kernels: compile-only check"
bash scripts/cuda_compile_check.sh

_step "install: the README's Install commands on a fresh venv"
if [ "${NBL_INSTALL_CHECK:-}" = 1 ] || { [ $# -eq 0 ] && [ "${NBL_INSTALL_CHECK:-}" != 0 ]; }; then
  bash scripts/check_install.sh
elif [ "${NBL_INSTALL_CHECK:-}" = 0 ]; then echo "skipped (NBL_INSTALL_CHECK=0)"
else echo "skipped (pytest arguments given; a full run or NBL_INSTALL_CHECK=1 runs it)"; fi

if [ ${#LINT_FAILED[@]} -gt 0 ]; then
  printf '\nFAILED: %s (see the lint step above; `ruff format` and `ruff check --fix` fix most of it)\n' \
    "$(IFS=/; echo "${LINT_FAILED[*]}")"
  exit 1
fi
