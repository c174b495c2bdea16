"""The ``nbl`` op library: every op schema, fake kernel and default kernel.

One place for op schemas (torchao's layout). Kernels per backend:
  * CPU and CUDA: C++/CUDA kernels in ``nbl_ext._C`` (csrc/), registered with
    ``TORCH_LIBRARY_IMPL(nbl, CPU|CUDA, m)`` when ``_C`` is imported;
  * default (``CompositeExplicitAutograd``): the pure-PyTorch references in
    :mod:`nbl_ext.reference`, used wherever no compiled kernel exists and as
    the tests' oracle (bitsandbytes' layout);
  * fake (meta) kernels for torch.compile / FakeTensor tracing.

The reference switch: :func:`use_reference_kernels` (or ``NBL_REFERENCE=1`` in
the environment, read once when ``nbl_ext`` is imported) registers the
references over the compiled kernels on the CPU and CUDA dispatch keys, so
every call of an ``nbl`` op, eager or from a torch.compile'd graph, autograd
included, runs the pure-PyTorch reference until it is switched off again (the
compiled kernels are then back). It is the fallback when a compiled kernel
fails on your hardware.

Every op passes ``torch.library.opcheck`` (python_tests/test_ops.py).
"""

from __future__ import annotations

import os
import warnings

import torch

from nbl_ext import (
    _extension,  # noqa: F401  (loads _C: registers the compiled kernels)
    reference,
)

_lib = torch.library.Library("nbl", "DEF")

# --- nbl::cov_update_ ---------------------------------------------------------
# Merge a chunk (x: (n, dx), y: (n, dy), any float dtype) into a float64
# streaming state of means and centered co-moments of `count` samples.
# precision: how the centered Gram products are formed, "float32" (default;
# float64 for float64 inputs) or "bfloat16" (centered values rounded to bf16,
# float32 accumulation: tensor-core speed on GPUs, measured accuracy cost in
# nbl_ext.stats.CovarianceAccumulator). See reference.GRAM_PRECISIONS.
_lib.define(
    "cov_update_(Tensor(a!) mean_x, Tensor(b!) mean_y, Tensor(c!) m_xx, Tensor(d!) m_yx, "
    'Tensor(e!) m_yy, Tensor x, Tensor y, int count, str precision="float32") -> ()'
)
torch.library.register_kernel("nbl::cov_update_", None, reference.cov_update_reference, lib=_lib)


@torch.library.register_fake("nbl::cov_update_", lib=_lib)
def _cov_update_fake(mean_x, mean_y, m_xx, m_yx, m_yy, x, y, count, precision="float32") -> None:
    reference.check_gram_precision(precision)
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
    precision: str = "float32",
) -> None:
    """Dispatch ``nbl::cov_update_`` (compiled kernel for the device if any, else reference).

    ``precision`` is ``"float32"`` (default) or ``"bfloat16"``; see
    :data:`nbl_ext.reference.GRAM_PRECISIONS`.
    """
    torch.ops.nbl.cov_update_(mean_x, mean_y, m_xx, m_yx, m_yy, x, y, count, precision)


def has_compiled_kernel(op: str, device_type: str) -> bool:
    """True when a C++/CUDA kernel (not the reference) serves ``nbl::op`` on ``device_type``.

    False while :func:`use_reference_kernels` is on.
    """
    if _reference_lib is not None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"nbl::{op}", key)


# --- nbl::affine_residual -----------------------------------------------------
# A linearized attention branch: out = h + h @ weight.T + bias, h (..., d),
# weight (d, d), bias (d,), all of h's dtype and device; out is a new
# contiguous tensor of h's shape and dtype. The op itself takes any leading
# shape (kernels flatten it to rows), so no reshape is needed around it.
_lib.define("affine_residual(Tensor h, Tensor weight, Tensor bias) -> Tensor")
torch.library.register_kernel("nbl::affine_residual", None, reference.affine_residual_reference, lib=_lib)


@torch.library.register_fake("nbl::affine_residual", lib=_lib)
def _affine_residual_fake(h, weight, bias):
    reference.check_affine_residual_args(h, weight, bias)
    return h.new_empty(h.shape)


def _affine_residual_setup_context(ctx, inputs, output) -> None:
    h, weight, _ = inputs
    # grad_h needs weight, grad_weight needs h; keep only what is needed.
    ctx.save_for_backward(
        weight if ctx.needs_input_grad[0] else None,
        h if ctx.needs_input_grad[1] else None,
    )


def _affine_residual_backward(ctx, grad):
    # out = h + h W^T + b  =>  dh = g + g W,  dW = g^T h (summed over rows),  db = sum_rows g.
    weight, h = ctx.saved_tensors
    g2 = grad.flatten(0, -2) if grad.dim() > 1 else grad.unsqueeze(0)
    grad_h = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_h = grad + (g2 @ weight).view(grad.shape)
    if ctx.needs_input_grad[1]:
        h2 = h.flatten(0, -2) if h.dim() > 1 else h.unsqueeze(0)
        grad_weight = g2.t() @ h2
    if ctx.needs_input_grad[2]:
        grad_bias = g2.sum(0)
    return grad_h, grad_weight, grad_bias


torch.library.register_autograd(
    "nbl::affine_residual",
    _affine_residual_backward,
    setup_context=_affine_residual_setup_context,
    lib=_lib,
)


def affine_residual(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``h + h @ weight.T + bias``: a linearized attention branch, fused.

    Args:
        h: (..., d), float32, bfloat16, float16 (or float64); any leading shape
            and any strides.
        weight: (d, d), bias: (d,), h's dtype and device.

    Returns:
        A new contiguous tensor of h's shape and dtype.

    Dispatches ``nbl::affine_residual``: the C++ (CPU) or CUDA kernel when
    ``nbl_ext._C`` provides one for h's device, else the pure-PyTorch
    reference. Low-precision inputs accumulate in float32 and are rounded to
    h's dtype. Differentiable (h, weight and bias), and traceable by
    torch.compile (fullgraph). Invalid arguments raise ValueError.
    """
    return torch.ops.nbl.affine_residual(h, weight, bias)


# --- the reference switch -------------------------------------------------------
#: Environment variable read when nbl_ext is imported: 1/true/yes/on starts with the references on.
REFERENCE_ENV = "NBL_REFERENCE"
_ENV_ON, _ENV_OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
#: Dispatch keys that the compiled extension registers kernels for (csrc/: TORCH_LIBRARY_IMPL(nbl, CPU|CUDA, m)).
_COMPILED_KEYS = ("CPU", "CUDA")
# The references, looked up at call time (a test can wrap them).
_REFERENCE_KERNELS = {
    "cov_update_": lambda *args: reference.cov_update_reference(*args),
    "affine_residual": lambda *args: reference.affine_residual_reference(*args),
}
_reference_lib: torch.library.Library | None = None


def reference_kernels_enabled() -> bool:
    """True while every ``nbl`` op runs its pure-PyTorch reference (see :func:`use_reference_kernels`)."""
    return _reference_lib is not None


def _set_reference_kernels(enabled: bool) -> None:
    global _reference_lib
    if enabled == (_reference_lib is not None):
        return
    if enabled:
        lib = torch.library.Library("nbl", "IMPL")
        with warnings.catch_warnings():
            # The dispatcher warns (once) that a kernel is overridden: that is the point here.
            warnings.simplefilter("ignore", UserWarning)
            for op, fn in _REFERENCE_KERNELS.items():
                for key in _COMPILED_KEYS:
                    lib.impl(op, fn, key)
        _reference_lib = lib
    else:
        _reference_lib._destroy()  # deregisters: the compiled kernels serve the ops again
        _reference_lib = None


class use_reference_kernels:
    """Send every ``nbl`` op to its pure-PyTorch reference (:mod:`nbl_ext.reference`), on every device.

    Takes effect at once and stays until switched off; as a context manager
    it restores the previous setting on exit::

        nbl_ext.use_reference_kernels(True)    # from here on: references only
        with nbl_ext.use_reference_kernels():  # references inside the block only
            ...

    Covers eager calls, autograd and torch.compile'd graphs (their custom-op
    calls go through the dispatcher at run time, so no recompilation is
    needed). The references are the specification of the ops: same results
    up to float rounding, slower. ``NBL_REFERENCE=1`` in the environment turns
    it on when ``nbl_ext`` is imported (read once, at import).
    """

    def __init__(self, enabled: bool = True) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"use_reference_kernels: enabled must be True or False, got {enabled!r}")
        self._previous = reference_kernels_enabled()
        _set_reference_kernels(enabled)

    def __enter__(self) -> use_reference_kernels:
        return self

    def __exit__(self, *exc) -> None:
        _set_reference_kernels(self._previous)


def _reference_from_environment() -> None:
    value = os.environ.get(REFERENCE_ENV, "").strip().lower()
    if value in _ENV_ON:
        _set_reference_kernels(True)
    elif value not in _ENV_OFF:
        raise ValueError(
            f"{REFERENCE_ENV}={os.environ[REFERENCE_ENV]!r} is not understood; set it to 1 to run every nbl op "
            "with its pure-PyTorch reference kernel, or to 0 (or unset it) for the compiled kernels"
        )


_reference_from_environment()
