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
) -> None:
    """Reference for ``nbl::cov_update_``: merge the chunk (x, y) into the state.

    State (float64, in place): means and centered co-moments of ``count``
    samples. The chunk is centered on its own float64 mean, its Gram products
    are formed in float32 (float64 if an input is float64) per block of
    ``GRAM_ROW_BLOCK`` rows and summed in float64, then merged with Chan et
    al.'s pairwise update.
    """
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"nbl::cov_update_: x and y must be 2-D (samples, features); got {x.dim()}-D and {y.dim()}-D")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"nbl::cov_update_: x and y must hold the same number of samples; got {x.shape[0]} and {y.shape[0]}")
    if count < 0:
        raise ValueError(f"nbl::cov_update_: count must be >= 0, got {count}")
    n = x.shape[0]
    if n == 0:
        return
    mu_x = _checked_column_sum(x, "x") / n
    mu_y = _checked_column_sum(y, "y") / n
    d_x = mu_x - mean_x
    d_y = mu_y - mean_y
    gram = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    for r0 in range(0, n, GRAM_ROW_BLOCK):
        xb = (x[r0 : r0 + GRAM_ROW_BLOCK].to(torch.float64) - mu_x).to(gram)
        yb = (y[r0 : r0 + GRAM_ROW_BLOCK].to(torch.float64) - mu_y).to(gram)
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
