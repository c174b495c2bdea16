"""Loading of the compiled extension ``nbl_ext._C`` (optional).

Importing ``_C`` registers its CPU (and, when built, CUDA) kernels for the
``nbl::*`` ops with the dispatcher. Without it the package still works: the
pure-PyTorch reference kernels registered in :mod:`nbl_ext.ops` take over, and
one warning says so.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import torch

_C: Any = None
_LOAD_ERROR: str | None = None

try:  # pragma: no branch - exercised by both CI configurations
    _C = importlib.import_module("nbl_ext._C")
except (ImportError, OSError) as exc:  # missing build, or built against another torch
    _C = None
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "nbl_ext: the compiled extension nbl_ext._C is not available "
        f"({_LOAD_ERROR}); using the pure-PyTorch reference kernels, which are correct but "
        "slower. Rebuild it against the installed torch with "
        "`pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_info() -> dict[str, Any]:
    """How the compiled extension was built and whether it is in use.

    Returns a dict with:
      ``compiled``: ``nbl_ext._C`` loaded (its kernels serve CPU tensors);
      ``cuda``: CUDA kernels were built into it (they serve CUDA tensors);
      ``cuda_runtime_version``: the CUDA runtime it was built with, or None;
      ``torch_version_built`` / ``torch_version``: torch at build time / now;
      ``load_error``: why ``_C`` did not load, or None.
    """
    info: dict[str, Any] = {
        "compiled": _C is not None,
        "cuda": False,
        "cuda_runtime_version": None,
        "torch_version_built": None,
        "torch_version": torch.__version__,
        "load_error": _LOAD_ERROR,
    }
    if _C is not None:
        info.update(_C.build_info())
    return info
