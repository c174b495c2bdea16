#!/usr/bin/env bash
# Run the benchmark suite (bench/) and keep its results.
#   bash bench/run.sh [extra pytest args]      e.g.  bash bench/run.sh -k "d2048"
# Writes bench/results/<device>_<UTC date>_<short commit>[-dirty].json (pytest-benchmark
# JSON: machine_info, commit_info, per-benchmark stats and extra_info) and a markdown
# summary next to it (.md), and prints that summary.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=${PYTHON:-python}; fi
# OpenMP threads sleep instead of spinning at barriers: on a shared (oversubscribed)
# machine spinning made small cases up to 7x slower and the variant ranking random.
# Set OMP_WAIT_POLICY=ACTIVE for a dedicated machine; OMP_NUM_THREADS picks the threads.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

DEVICE=$("$PY" bench/device_slug.py)  # cuda-<gpu> or cpu-<model>-<threads>t
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
if [ "$COMMIT" != nogit ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT-dirty"
fi
mkdir -p bench/results
OUT="bench/results/${DEVICE}_$(date -u +%Y%m%dT%H%M%SZ)_${COMMIT}.json"

echo "bench: $PY, device $DEVICE, OMP_WAIT_POLICY=$OMP_WAIT_POLICY -> $OUT"
START=$(date +%s)
RC=0
"$PY" -m pytest bench -p no:cacheprovider -q -rs \
  --benchmark-only --benchmark-json "$OUT" \
  --benchmark-group-by=group --benchmark-sort=name \
  --benchmark-columns=median,iqr,min,rounds "$@" || RC=$?
echo "bench: $(( $(date +%s) - START )) s, pytest exit status $RC"

# Failed benchmarks are left out of the JSON; summarize what passed.
if [ -s "$OUT" ]; then "$PY" bench/summarize.py "$OUT" | tee "${OUT%.json}.md"; fi
exit "$RC"
