"""Pure-PyTorch reference kernels.

Each function here is the specification of one ``nbl::*`` op (schemas in
:mod:`nbl_ext.ops`). They are registered as the ops' default kernels, so they
run wherever no compiled kernel exists (no ``_C``, or a device without a
compiled kernel), and the tests use them as the oracle for the C++/CUDA
kernels. Same math, same error messages, same numerics contract.
"""

from __future__ import annotations

import torch

#: Rows per Gram block; must match ``kGramRowBlock`` in csrc/nbl_kernels.h.
GRAM_ROW_BLOCK = 2048

#: Valid ``precision`` values of ``nbl::cov_update_`` (GramPrecision in csrc/nbl_kernels.h):
#:   "float32":  centered values rounded to float32, float32 Gram products
#:               (float64 values and products when an input is float64);
#:   "bfloat16": centered values rounded float64 -> float32 -> bfloat16 (round
#:               to nearest even), Gram products accumulated in float32 (a
#:               bf16 tensor-core GEMM on CUDA; bf16 x bf16 products are exact
#:               in float32, so a float32 GEMM of the rounded values is the same
#:               computation up to summation order).
GRAM_PRECISIONS = ("float32", "bfloat16")


def check_gram_precision(precision: str) -> None:
    """ValueError unless ``precision`` is one of :data:`GRAM_PRECISIONS` (same message as the C++ kernels)."""
    if precision not in GRAM_PRECISIONS:
        raise ValueError(
            f"nbl::cov_update_: precision must be one of 'float32', 'bfloat16'; got '{precision}'. Use "
            "'float32' (the default, float32-grade Gram products) or 'bfloat16' (faster on tensor cores, "
            "less accurate); the accumulator was not updated"
        )


def _checked_column_sum(t: torch.Tensor, name: str) -> torch.Tensor:
    s = t.sum(dim=0, dtype=torch.float64)
    if not bool(torch.isfinite(s).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"nbl::cov_update_: {name} contains {bad} non-finite value(s) (NaN or inf) in a chunk "
            f"of {t.shape[0]} samples x {t.shape[1]} features; the accumulator was not updated"
        )
    return s


def cov_update_reference(
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
    """Reference for ``nbl::cov_update_``: merge the chunk (x, y) into the state.

    State (float64, in place): means and centered co-moments of ``count``
    samples. The chunk is centered on its own float64 mean, its Gram products
    are formed per block of ``GRAM_ROW_BLOCK`` rows at ``precision`` (see
    :data:`GRAM_PRECISIONS`: float32, or float64 if an input is float64, by
    default) and summed in float64, then merged with Chan et al.'s pairwise
    update.
    """
    check_gram_precision(precision)
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"nbl::cov_update_: x and y must be 2-D (samples, features); got {x.dim()}-D and {y.dim()}-D")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"nbl::cov_update_: x and y must hold the same number of samples; got {x.shape[0]} and {y.shape[0]}"
        )
    if count < 0:
        raise ValueError(f"nbl::cov_update_: count must be >= 0, got {count}")
    n = x.shape[0]
    if n == 0:
        return
    mu_x = _checked_column_sum(x, "x") / n
    mu_y = _checked_column_sum(y, "y") / n
    d_x = mu_x - mean_x
    d_y = mu_y - mean_y
    bf16 = precision == "bfloat16"
    gram = torch.float32 if bf16 or torch.float64 not in (x.dtype, y.dtype) else torch.float64

    def centered(t: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        c = (t.to(torch.float64) - mu).to(gram)
        # bf16 rounding of the float32 value; held in float32 (exactly) for the GEMM.
        return c.to(torch.bfloat16).to(torch.float32) if bf16 else c

    for r0 in range(0, n, GRAM_ROW_BLOCK):
        xb = centered(x[r0 : r0 + GRAM_ROW_BLOCK], mu_x)
        yb = centered(y[r0 : r0 + GRAM_ROW_BLOCK], mu_y)
        m_xx += xb.T @ xb
        m_yx += yb.T @ xb
        m_yy += yb.T @ yb
    total = count + n
    coef = count * n / total
    m_xx += coef * torch.outer(d_x, d_x)
    m_yx += coef * torch.outer(d_y, d_x)
    m_yy += coef * torch.outer(d_y, d_y)
    mean_x += d_x * (n / total)
    mean_y += d_y * (n / total)


#: dtypes of nbl::affine_residual (model dtypes, plus float64 for checks).
AFFINE_RESIDUAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_affine_residual_args(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Argument checks of ``nbl::affine_residual`` (ValueError), shared by the
    reference and the fake kernel; the C++ kernels raise the same messages.

    Shape conditions go through ``torch._check_value`` so that they also hold
    for symbolic shapes under torch.compile.
    """
    torch._check_value(
        h.dim() >= 1,
        lambda: "nbl::affine_residual: h must be (..., d) with at least 1 dimension; got a 0-D tensor",
    )
    if h.dtype not in AFFINE_RESIDUAL_DTYPES:
        raise ValueError(
            f"nbl::affine_residual: h must be float32, bfloat16, float16 or float64; got {h.dtype}. "
            "Cast h to the model's floating-point dtype"
        )
    if weight.dtype != h.dtype or bias.dtype != h.dtype:
        raise ValueError(
            f"nbl::affine_residual: h, weight and bias must have one dtype; got h {h.dtype}, weight "
            f"{weight.dtype}, bias {bias.dtype}. Cast the weight and bias to h's dtype: "
            "weight.to(h.dtype), bias.to(h.dtype)"
        )
    if weight.device != h.device or bias.device != h.device:
        raise ValueError(
            f"nbl::affine_residual: h, weight and bias must be on one device; got h on {h.device}, "
            f"weight on {weight.device}, bias on {bias.device}. Move the weight and bias to h's "
            "device: weight.to(h.device), bias.to(h.device)"
        )
    d = h.shape[-1]
    torch._check_value(
        weight.dim() == 2 and weight.shape[0] == d and weight.shape[1] == d,
        lambda: (
            f"nbl::affine_residual: weight must be square (d, d) with d = h.shape[-1] = {d}; got weight "
            f"of shape {list(weight.shape)}. The affine map is out = h + h @ weight.T + bias"
        ),
    )
    torch._check_value(
        bias.dim() == 1 and bias.shape[0] == d,
        lambda: f"nbl::affine_residual: bias must have shape [d] = [{d}]; got {list(bias.shape)}",
    )


def affine_residual_reference(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Reference for ``nbl::affine_residual``: ``out = h + h @ weight.T + bias``.

    h is (..., d); weight (d, d) and bias (d,) have h's dtype and device. The
    result is a new contiguous tensor of h's shape and dtype.

    Numerics: exactly PyTorch's own ``F.linear(h, weight, bias) + h`` in h's
    dtype (``F.linear`` on a 2-D input is this ``addmm``). For bfloat16 and
    float16 PyTorch's GEMM accumulates in float32 on CPU and CUDA and rounds
    the linear output (bias included) to the dtype; the residual add then
    rounds once more. The compiled kernels (CPU and CUDA, every path)
    accumulate in float32 too and round the sum h + h W^T + b once, so they
    are at least as accurate; the contract the tests hold every kernel to is
    the error against a float64 evaluation, at most ~2x this reference's.
    """
    check_affine_residual_args(h, weight, bias)
    h2 = h.flatten(0, -2) if h.dim() > 1 else h.unsqueeze(0)  # (rows, d); d may be 0
    out = torch.addmm(bias, h2, weight.t())
    out.add_(h2)
    return out.view(h.shape)
