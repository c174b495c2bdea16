"""NBL numerics, all in float64: the pairwise merge of streaming moments, the
LMMSE fit, canonical correlations, the CCA error bound and the closed-form
NMSE of a fitted map.

Rules kept here and nowhere else:
  * no raw inverse: positive semi-definite systems are solved by Cholesky on
    the *standardized* matrix (unit diagonal, so a ridge is relative to each
    channel's variance), with a ridge that starts at the caller's value and
    grows, with one warning, only when the matrix is numerically singular;
  * eigenvalues are clamped: directions with (relative) variance below
    ``EIG_RTOL`` are treated as null, never divided by;
  * constant channels (zero variance) take no part in a solve: their weight is
    zero and their value is absorbed by the bias.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from nbl_ext.stats import CovarianceAccumulator

_F64 = torch.float64
#: Relative eigenvalue floor: whitening ignores directions below this fraction
#: of the largest eigenvalue (float64 round-off of a rank-deficient matrix).
EIG_RTOL = 1e-12
#: A channel whose variance is below this fraction of the largest channel
#: variance is constant at float64 precision.
CONST_RTOL = 1e-24
#: Cholesky is accepted when its smallest pivot^2 exceeds this (the matrix is
#: standardized, so its diagonal is 1): below it the solve loses all digits.
PIVOT_RTOL = 1e-12
#: Largest relative ridge tried before giving up.
MAX_RIDGE = 1.0


class SingularWarning(UserWarning):
    """The regularization of a solve had to grow beyond what the caller asked."""


def merge_moments(
    count_a: int,
    mean_a: tuple[torch.Tensor, ...],
    m_a: tuple[torch.Tensor, ...],
    count_b: int,
    mean_b: tuple[torch.Tensor, ...],
    m_b: tuple[torch.Tensor, ...],
    pairs: tuple[tuple[int, int], ...],
) -> tuple[int, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Chan, Golub & LeVeque pairwise merge of two sets of centered moments.

    ``mean_*`` are the means of each variable, ``m_*`` the centered co-moment
    matrices; ``pairs[k] = (i, j)`` says ``m[k]`` is the co-moment of
    variables i (rows) and j (columns). Returns (count, means, co-moments).
    """
    n = count_a + count_b
    if count_b == 0:
        return count_a, tuple(t.clone() for t in mean_a), tuple(t.clone() for t in m_a)
    if count_a == 0:
        return count_b, tuple(t.clone() for t in mean_b), tuple(t.clone() for t in m_b)
    deltas = [mb - ma for ma, mb in zip(mean_a, mean_b)]
    coef = count_a * count_b / n
    means = tuple(ma + d * (count_b / n) for ma, d in zip(mean_a, deltas))
    ms = tuple(ma + mb + coef * torch.outer(deltas[i], deltas[j]) for (i, j), ma, mb in zip(pairs, m_a, m_b))
    return n, means, ms


# --- solves -----------------------------------------------------------------


def _nonconstant(var: torch.Tensor) -> torch.Tensor:
    top = var.max() if var.numel() else var.new_zeros(())
    return var > CONST_RTOL * top if float(top) > 0 else torch.zeros_like(var, dtype=torch.bool)


def _cholesky_standardized(r: torch.Tensor, ridge: float, what: str) -> torch.Tensor:
    """Cholesky factor of r + lam I (r has unit diagonal), lam >= ridge growing as needed."""
    eye = torch.eye(r.shape[0], dtype=_F64, device=r.device)
    lam = float(ridge)
    while True:
        factor, info = torch.linalg.cholesky_ex(r + lam * eye if lam > 0 else r)
        if int(info) == 0 and float(factor.diagonal().min()) ** 2 > PIVOT_RTOL * (1.0 + lam):
            break
        if lam >= MAX_RIDGE:
            raise FloatingPointError(
                f"{what}: the covariance stays singular even with a relative ridge of {lam:g}; "
                "the statistics are degenerate (check the inputs for constant or duplicated data)"
            )
        lam = max(lam * 10.0, 1e-10)
    if lam > ridge:
        warnings.warn(
            f"{what}: the input covariance is singular or ill-conditioned (fewer samples than "
            f"dimensions, or linearly dependent channels); solved with a relative ridge of {lam:g} "
            f"instead of {ridge:g}. Calibrate on more tokens, or pass a larger ridge to silence this.",
            SingularWarning,
            stacklevel=3,
        )
    return factor


def solve_psd(c: torch.Tensor, rhs: torch.Tensor, ridge: float = 0.0, what: str = "solve") -> torch.Tensor:
    """Solve (C + ridge * diag(C)) Z = rhs for symmetric PSD C, safely.

    Standardizes C to unit diagonal, drops constant channels (their rows of Z
    are zero), factors with Cholesky and grows the relative ridge only if the
    factorization is numerically singular (warns when it does).
    """
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"{what}: ridge must be a finite number >= 0, got {ridge}")
    c = c.to(_F64)
    rhs = rhs.to(_F64)
    var = c.diagonal()
    keep = _nonconstant(var)
    out = torch.zeros_like(rhs)
    if not bool(keep.any()):
        warnings.warn(f"{what}: every input channel is constant; the fit is the mean alone",
                      SingularWarning, stacklevel=3)
        return out
    idx = keep.nonzero().squeeze(1)
    s = var[idx].sqrt()
    r = c[idx][:, idx] / torch.outer(s, s)
    r = 0.5 * (r + r.T)
    factor = _cholesky_standardized(r, ridge, what)
    z = torch.cholesky_solve(rhs[idx] / s[:, None], factor)
    out[idx] = z / s[:, None]
    return out


# --- public numerics ----------------------------------------------------------


def fit_linear(acc: "CovarianceAccumulator", ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LMMSE affine map from x to y: ``y ~ W x + b``.

    ``W = C_yx C_xx^-1`` and ``b = E[y] - W E[x]``, float64, W of shape
    (dim_y, dim_x), b of shape (dim_y,), on the accumulator's device.

    ``ridge`` is relative: it adds ``ridge * Var(x_i)`` to each diagonal entry
    of C_xx (a scale-free Tikhonov term). It grows automatically, with a
    :class:`SingularWarning`, only when C_xx is numerically singular (fewer
    samples than dimensions, duplicated or constant channels). Constant
    channels of x get zero weight.
    """
    acc._require(2, "fit_linear")
    w_t = solve_psd(acc._m_xx, acc._m_yx.T, ridge=ridge, what="fit_linear")
    w = w_t.T.contiguous()
    b = acc._mean_y - w @ acc._mean_x
    return w, b


def _whitener(c: torch.Tensor) -> torch.Tensor:
    """Matrix V with V^T C V = I on the non-null subspace of PSD C (clamped eigh)."""
    var = c.diagonal()
    keep = _nonconstant(var)
    d = c.shape[0]
    if not bool(keep.any()):
        return c.new_zeros((d, 0))
    idx = keep.nonzero().squeeze(1)
    s = var[idx].sqrt()
    r = c[idx][:, idx] / torch.outer(s, s)
    evals, evecs = torch.linalg.eigh(0.5 * (r + r.T))
    good = evals > EIG_RTOL * evals.max().clamp_min(0)
    v_std = evecs[:, good] / evals[good].sqrt()
    v = c.new_zeros((d, v_std.shape[1]))
    v[idx] = v_std / s[:, None]
    return v


def _cca_moments(acc: "CovarianceAccumulator", residual: bool):
    m_xx, m_yx, m_yy = acc._m_xx, acc._m_yx, acc._m_yy
    if residual:
        if acc.dim_x != acc.dim_y:
            raise ValueError(
                f"residual=True correlates x with x + y, which needs dim_x == dim_y; got {acc.dim_x} and {acc.dim_y}"
            )
        # y' = x + y:  M_y'x = M_xx + M_yx,  M_y'y' = M_xx + M_yx + M_yx^T + M_yy
        m_yy = m_xx + m_yx + m_yx.T + m_yy
        m_yx = m_xx + m_yx
    return m_xx, m_yx, m_yy


def canonical_correlations(acc: "CovarianceAccumulator", *, residual: bool = False) -> torch.Tensor:
    """Canonical correlations between x and y, float64, descending, in [0, 1].

    Returns ``min(dim_x, dim_y)`` values: the singular values of
    ``C_xx^-1/2 C_xy C_yy^-1/2`` computed by clamped-eigh whitening; directions
    of zero variance contribute correlation 0. With ``residual=True`` the
    correlations are between x and ``x + y`` (NBL's score: y is the attention
    branch output, x + y the residual stream after the block).
    """
    acc._require(2, "canonical_correlations")
    m_xx, m_yx, m_yy = _cca_moments(acc, residual)
    vx, vy = _whitener(m_xx), _whitener(m_yy)
    r = min(acc.dim_x, acc.dim_y)
    rho = torch.zeros(r, dtype=_F64, device=m_xx.device)
    if vx.shape[1] and vy.shape[1]:
        sv = torch.linalg.svdvals(vy.T @ m_yx @ vx).clamp_(0.0, 1.0)
        rho[: sv.numel()] = sv[:r]
    return rho.sort(descending=True).values


def cca_bound(acc: "CovarianceAccumulator", *, residual: bool = False) -> float:
    """NBL's CCA error bound: ``sum_i (1 - rho_i^2) + (dim_y - r)``, r = min(dim_x, dim_y).

    Lower means y is better explained by an affine function of x. With
    ``residual=True`` the correlations are between x and x + y (see
    :func:`canonical_correlations`).
    """
    rho = canonical_correlations(acc, residual=residual)
    r = min(acc.dim_x, acc.dim_y)
    return float((1.0 - rho * rho).sum()) + float(acc.dim_y - r)


def lmmse_nmse(acc: "CovarianceAccumulator", w: torch.Tensor, b: torch.Tensor) -> float:
    """Closed-form normalized MSE of ``y_hat = W x + b`` on the accumulated data.

    ``sum_n ||y_n - W x_n - b||^2 / sum_n ||y_n - mean(y)||^2``, computed from
    the moments alone; it equals the error measured by applying (W, b) to the
    same samples. 0 is a perfect fit, 1 is no better than predicting the mean.
    """
    acc._require(1, "lmmse_nmse")
    if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("lmmse_nmse: W and b must be tensors (as returned by fit_linear)")
    if tuple(w.shape) != (acc.dim_y, acc.dim_x) or tuple(b.shape) != (acc.dim_y,):
        raise ValueError(
            f"lmmse_nmse: expected W of shape {(acc.dim_y, acc.dim_x)} and b of shape {(acc.dim_y,)}, "
            f"got {tuple(w.shape)} and {tuple(b.shape)}"
        )
    w = w.to(device=acc.device, dtype=_F64)
    b = b.to(device=acc.device, dtype=_F64)
    total = float(acc._m_yy.trace())
    if total <= 0.0:
        raise ValueError("lmmse_nmse: y has zero variance on the accumulated data; the NMSE is undefined")
    bias = acc._mean_y - w @ acc._mean_x - b
    err = (
        total
        - 2.0 * float((w * acc._m_yx).sum())
        + float(((w @ acc._m_xx) * w).sum())
        + acc.count * float(bias @ bias)
    )
    return max(err, 0.0) / total
