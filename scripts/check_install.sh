#!/usr/bin/env bash
# The README's Install commands, run as written: the first ```bash block of its "## Install" section,
# read from the README itself (so this check cannot drift from what users are told), in a copy of the
# tree as a clone has it (git's tracked and unignored files: no .venv, no build/, no built _C), with the
# system python3 (its own pip and setuptools), the real extension build, and nothing of the calling
# environment's venv. Then: nbl_ext imports from the copy with the compiled kernels, and `nbl` runs.
# Several minutes (pip from the local index, then the extension build); scripts/test.sh runs it in a
# full run. The copy is removed afterwards (NBL_INSTALL_CHECK_KEEP=1 keeps it and says where).
#   PYTHON    the interpreter the commands call python3 (default: the python3 on PATH)
#   MAX_JOBS  parallel compile jobs (default: 2)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)

CMDS=$(awk '/^## /{ins = ($0 ~ /^## Install/)} ins && /^```bash/{blk = 1; next} blk && /^```/{exit} blk' "$ROOT/README.md")
for must in "python3 -m venv .venv" "pip install --no-build-isolation -e ."; do
  grep -qF -- "$must" <<<"$CMDS" || { echo "check_install: the README's Install block has no '$must'"; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/nbl-install-check.XXXXXX")
if [ "${NBL_INSTALL_CHECK_KEEP:-0}" = 1 ]; then trap 'echo "check_install: kept $WORK"' EXIT
else trap 'rm -rf "$WORK"' EXIT; fi
mkdir "$WORK/nbl-ext"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
     | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$WORK/nbl-ext" -xf -
else
  tar -C "$ROOT" --exclude=.venv --exclude=build --exclude='build-*' --exclude='*.so' --exclude='*.egg-info' \
      --exclude=__pycache__ -cf - . | tar -C "$WORK/nbl-ext" -xf -
fi

# A clean environment for the commands: the calling venv (an activated one, scripts/test.sh's) off PATH,
# no PYTHONPATH (.ci/gpu sets it to the tree); with PYTHON set, that interpreter is their python3.
CLEAN_PATH=$(tr ':' '\n' <<<"$PATH" | grep -v -e '/\.venv/bin$' -e "^${VIRTUAL_ENV:-/nonexistent}/bin\$" | paste -sd:)
if [ -n "${PYTHON:-}" ]; then
  mkdir "$WORK/bin" && ln -s "$(command -v "$PYTHON")" "$WORK/bin/python3" && CLEAN_PATH=$WORK/bin:$CLEAN_PATH
fi
echo "check_install: in $WORK/nbl-ext, with $(cd "$WORK/nbl-ext" && PATH=$CLEAN_PATH python3 --version); the commands:"
sed 's/^/  /' <<<"$CMDS"
(cd "$WORK/nbl-ext" && env -u VIRTUAL_ENV -u PYTHONPATH -u PYTHONHOME PATH="$CLEAN_PATH" \
   MAX_JOBS=${MAX_JOBS:-2} bash -euxo pipefail -c "$CMDS")

# What the commands must have given: the package from the copy, with its compiled kernels, and the command.
# (-I and a neutral directory: the import must come from the install, not from the current directory.)
PY=$WORK/nbl-ext/.venv/bin/python
cd "$WORK"
"$PY" -I - "$WORK/nbl-ext" <<'EOF'
import sys
from pathlib import Path

import nbl_ext

info = nbl_ext.extension_info()
where = Path(nbl_ext.__file__).resolve()
assert where.is_relative_to(Path(sys.argv[1]).resolve()), f"nbl_ext imported from {where}, not from the copy"
assert info["compiled"], f"nbl_ext._C did not load: {info['load_error']}"
print(f"check_install: nbl_ext from {where.parent}, compiled kernels (torch {info['torch_version']})")
EOF
"$WORK/nbl-ext/.venv/bin/nbl" --help >/dev/null
echo "check_install: OK in $(( $(date +%s) - START )) s ($("$PY" -m pip --version | cut -d' ' -f1-2)," \
     "setuptools $("$PY" -c 'import importlib.metadata as m; print(m.version("setuptools"))'))"
