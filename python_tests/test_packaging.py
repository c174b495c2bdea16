"""Packaging settings in one place: pyproject.toml holds the metadata and the tool settings, its dependency
ranges hold the versions that are tested (requirements-dev.txt's, installed here), and no other file
takes over pytest's or ruff's settings."""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML (tomllib)")
packaging_requirements = pytest.importorskip("packaging.requirements")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _dev_requirements() -> dict[str, packaging_requirements.Requirement]:
    reqs = {}
    for line in (ROOT / "requirements-dev.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = packaging_requirements.Requirement(line)
            reqs[_norm(req.name)] = req
    return reqs


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _runtime_and_test_requirements() -> list[packaging_requirements.Requirement]:
    project = PYPROJECT["project"]
    names = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
    return [packaging_requirements.Requirement(r) for r in names]


def test_every_dependency_is_in_requirements_dev_and_its_range_holds_the_tested_version():
    dev = _dev_requirements()
    for req in _runtime_and_test_requirements():
        assert _norm(req.name) in dev, f"{req.name} is a dependency in pyproject.toml but not in requirements-dev.txt"
        installed = md.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), (
            f"pyproject.toml requires {req}, but the tested (installed) version is {req.name} {installed}"
        )


def test_build_requirements_are_installed_by_requirements_dev():
    # The build runs without isolation (README, Install), so requirements-dev.txt installs what it needs.
    dev = _dev_requirements()
    for line in PYPROJECT["build-system"]["requires"]:
        req = packaging_requirements.Requirement(line)
        assert _norm(req.name) in dev, f"build requirement {req.name} is not in requirements-dev.txt"
        assert req.specifier.contains(md.version(req.name), prereleases=True), (req, md.version(req.name))


def test_tool_settings_live_in_pyproject_only():
    # pytest reads pytest.ini (or tox.ini, setup.cfg) before pyproject.toml: such a file would silently win.
    for name in ("pytest.ini", "tox.ini", "setup.cfg", "ruff.toml", ".ruff.toml"):
        assert not (ROOT / name).exists(), f"{name} would override the settings in pyproject.toml"
    assert PYPROJECT["tool"]["pytest"]["ini_options"]["testpaths"] == ["python_tests"]
    assert PYPROJECT["tool"]["ruff"]["line-length"] == 120


def test_installed_metadata_is_the_current_pyproject():
    # The editable install (scripts/setup_env.sh re-runs it when pyproject.toml changes) gives the `nbl` command.
    try:
        installed = md.version("nbl-ext")
    except md.PackageNotFoundError:
        pytest.skip("nbl-ext is not installed in this environment (scripts/setup_env.sh installs it)")
    assert installed == PYPROJECT["project"]["version"]
    (nbl,) = md.entry_points(group="console_scripts", name="nbl")
    assert nbl.value == PYPROJECT["project"]["scripts"]["nbl"] == "nbl_ext.cli:main"
