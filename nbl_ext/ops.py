"""The ``nbl`` op library: every op schema, fake kernel and default kernel.

One place for op schemas (torchao's layout). Kernels per backend:
  * CPU and CUDA: C++/CUDA kernels in ``nbl_ext._C`` (csrc/), registered with
    ``TORCH_LIBRARY_IMPL(nbl, CPU|CUDA, m)`` when ``_C`` is imported;
  * default (``CompositeExplicitAutograd``): the pure-PyTorch references in
    :mod:`nbl_ext.reference`, used wherever no compiled kernel exists and as
    the tests' oracle (bitsandbytes' layout);
  * fake (meta) kernels for torch.compile / FakeTensor tracing.

Every op passes ``torch.library.opcheck`` (python_tests/test_ops.py).
"""
from __future__ import annotations

import torch

from nbl_ext import _extension  # noqa: F401  (loads _C: registers the compiled kernels)
from nbl_ext import reference

_lib = torch.library.Library("nbl", "DEF")

# --- nbl::cov_update_ ---------------------------------------------------------
# Merge a chunk (x: (n, dx), y: (n, dy), any float dtype) into a float64
# streaming state of means and centered co-moments of `count` samples.
_lib.define(
    "cov_update_(Tensor(a!) mean_x, Tensor(b!) mean_y, Tensor(c!) m_xx, Tensor(d!) m_yx, "
    "Tensor(e!) m_yy, Tensor x, Tensor y, int count) -> ()"
)
torch.library.register_kernel("nbl::cov_update_", None, reference.cov_update_reference, lib=_lib)


@torch.library.register_fake("nbl::cov_update_", lib=_lib)
def _cov_update_fake(mean_x, mean_y, m_xx, m_yx, m_yy, x, y, count) -> None:
    torch._check(x.dim() == 2 and y.dim() == 2, lambda: "nbl::cov_update_: x and y must be 2-D")
    torch._check(x.shape[0] == y.shape[0], lambda: "nbl::cov_update_: x and y sample counts differ")
    return None


def cov_update_(
    mean_x: torch.Tensor,
    mean_y: torch.Tensor,
    m_xx: torch.Tensor,
    m_yx: torch.Tensor,
    m_yy: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    count: int,
) -> None:
    """Dispatch ``nbl::cov_update_`` (compiled kernel for the device if any, else reference)."""
    torch.ops.nbl.cov_update_(mean_x, mean_y, m_xx, m_yx, m_yy, x, y, count)


def has_compiled_kernel(op: str, device_type: str) -> bool:
    """True when a C++/CUDA kernel (not the reference) serves ``nbl::op`` on ``device_type``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"nbl::{op}", key)


# placeholder until the fused op lands
def affine_residual(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``h + h @ weight.T + bias`` (pure PyTorch)."""
    return torch.nn.functional.linear(h, weight, bias) + h
