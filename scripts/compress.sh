#!/usr/bin/env bash
# The main job (README): set up (.venv, torch, build; see scripts/setup_env.sh),
# then `nbl compress` with the given arguments. With none, it compresses the
# bundled SmolLM2-135M-Instruct, calibrating on text the model samples itself.
#   bash scripts/compress.sh --help
#   bash scripts/compress.sh --layers 8 --calib ../shared/data/calib/c4_demo.json --samples 32 --seq-len 512
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NBL_SKIP_GEMMA=${NBL_SKIP_GEMMA:-1} source "$ROOT/scripts/setup_env.sh" >&2   # Gemma 3 is only for the tests
printf '\n=== nbl compress %s ===\n' "$*" >&2
exec "$VENV/bin/nbl" compress "$@"
