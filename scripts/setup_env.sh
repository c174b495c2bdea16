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
"$PYBIN" -c "import torch; print('torch', torch.__version__)"

_step "build nbl_ext._C (CPU kernels)"
(cd "$ROOT" && MAX_JOBS=${MAX_JOBS:-2} NBL_SKIP_CUDA=1 "$PYBIN" -m pip install -q --disable-pip-version-check \
   --no-build-isolation --use-pep517 --no-deps -e .)
"$PYBIN" -c "import nbl_ext, json; i = nbl_ext.extension_info(); print(json.dumps(i)); assert i['compiled'], i['load_error']"
