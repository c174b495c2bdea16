"""scripts/setup_env.sh is idempotent: on a set-up tree a run reinstalls and rebuilds nothing, in seconds.

The set-up runs on the venv that runs these tests (sys.prefix) and on this tree's nbl_ext/_C. Nothing is
changed unless it is needed: first the script's check mode (NBL_SETUP_CHECK=1) must say "nothing to do"
(in CI, where scripts/test.sh set the tree up just before, anything else fails; on a developer's tree
with, say, an edited csrc/ the test skips and says what the set-up would do, instead of rebuilding the
extension that this very process has loaded). Then two real runs: both fast, neither touches pip, the
extension, the stamps or the installed packages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

import nbl_ext

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "setup_env.sh"
SECONDS = 60  # a first set-up takes minutes (pip, then the build); a checking run, a few seconds

pytestmark = pytest.mark.slow


def _setup(**env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**os.environ, "NBL_VENV": sys.prefix, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, time.monotonic() - start


def _state() -> dict:
    """What an install or a rebuild would change: the built extension, the stamps, the venv's packages."""
    site = Path(sysconfig.get_paths()["purelib"])
    return {
        "so": [(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(ROOT.glob("nbl_ext/_C*.so"))],
        "stamps": {p.name: p.read_text() for p in sorted(Path(sys.prefix).glob(".nbl-stamp-*"))},
        "site-packages": (site.stat().st_mtime_ns, sorted(p.name for p in site.iterdir())),
    }


def test_setup_on_a_set_up_tree_changes_nothing_and_takes_seconds():
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests do not run in a virtual environment, so there is no set-up to check")
    check, _ = _setup(NBL_SETUP_CHECK="1")
    if check.returncode != 0:
        message = f"scripts/setup_env.sh would change this tree or {sys.prefix}:\n{check.stdout}{check.stderr}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}\n(CI runs the set-up just before the tests: the stamps do not hold)")
        pytest.skip(message)
    assert "set-up check: nothing to do" in check.stdout
    assert "would run" not in check.stdout
    assert _state()["so"], "no nbl_ext/_C*.so although the set-up check passed"
    info = nbl_ext.extension_info()
    assert info["compiled"], f"the set-up says nothing to do, but nbl_ext._C does not load: {info['load_error']}"

    before = _state()
    for _ in range(2):
        proc, seconds = _setup()
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert seconds < SECONDS, f"a set-up with nothing to do took {seconds:.0f} s:\n{out}"
        assert out.count("up to date") >= 3, out  # dependencies, package, extension
        for sign in ("Collecting", "Successfully installed", "installing", "compiling", "compile csrc/"):
            assert sign not in out, f"{sign!r} in the output of a set-up with nothing to do:\n{out}"
    assert _state() == before
