"""Provenance of a benchmark result: device, versions, git commit, environment (:func:`run_info`), and the
pieces bench/conftest.py stamps pytest-benchmark's machine_info with (:func:`git_info`, :func:`cuda_info`)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


def run_info(device: str | torch.device) -> dict[str, Any]:
    """Device, versions and git commit to stamp a benchmark result with."""
    import importlib.metadata

    import nbl_ext

    dev = torch.device(device)
    info: dict[str, Any] = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": {"type": dev.type},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "nbl_ext": nbl_ext.__version__,
        },
        "extension": nbl_ext.extension_info(),
        "git": git_info(),
        "env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES") if k in os.environ
        },
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for dist in ("transformers", "accelerate"):
        try:
            info["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info["versions"][dist] = None
    if dev.type == "cuda":
        info["device"].update(cuda_info(dev))
    else:
        info["device"].update(name=_cpu_name(), threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    return info


def cuda_info(device: str | torch.device = "cuda") -> dict[str, Any]:
    """Name, compute capability, total memory and SM count of a CUDA device."""
    props = torch.cuda.get_device_properties(torch.device(device))
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "total_memory_bytes": props.total_memory,
        "sm_count": props.multi_processor_count,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_info() -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the checkout nbl_ext runs from (None where git or the repository is missing;
    dirty ignores untracked files)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}
