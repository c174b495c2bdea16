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
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

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


def require_count(count: int, n: int, what: str) -> None:
    """ValueError unless ``count >= n`` samples were accumulated (one message for statistics and numerics)."""
    if count < n:
        raise ValueError(
            f"{what} needs at least {n} accumulated sample(s), but this accumulator has "
            f"{count}; call update(x, y) with data first"
        )


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


@dataclass(frozen=True)
class Moments:
    """Streaming statistics of a pair of variables (x, y): what every numerics function reads.

    ``count`` samples; float64 means ``mean_x`` (dim_x,), ``mean_y`` (dim_y,)
    and centered co-moments (sums of outer products of the deviations from
    the means) ``m_xx`` (dim_x, dim_x), ``m_yx`` (dim_y, dim_x), ``m_yy``
    (dim_y, dim_y), all on one device. :meth:`nbl_ext.CovarianceAccumulator.moments`
    returns a copy of its state as this; :meth:`merge` combines two disjoint
    sets of samples exactly (Chan et al.), so per-fold moments merge to the
    full statistics. The tensors are converted to float64 and checked for
    shape; treat them as read-only.
    """

    count: int
    mean_x: torch.Tensor
    mean_y: torch.Tensor
    m_xx: torch.Tensor
    m_yx: torch.Tensor
    m_yy: torch.Tensor

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"Moments: count must be an int >= 0, got {self.count!r}")
        names = ("mean_x", "mean_y", "m_xx", "m_yx", "m_yy")
        for name in names:
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Moments: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != _F64:
                object.__setattr__(self, name, t.to(_F64))
        if self.mean_x.dim() != 1 or self.mean_y.dim() != 1:
            raise ValueError(
                f"Moments: mean_x and mean_y must be 1-D, got shapes {tuple(self.mean_x.shape)} and "
                f"{tuple(self.mean_y.shape)}"
            )
        dx, dy = self.mean_x.shape[0], self.mean_y.shape[0]
        want = {"m_xx": (dx, dx), "m_yx": (dy, dx), "m_yy": (dy, dy)}
        for name, shape in want.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"Moments: {name} must have shape {shape} for dim_x={dx}, dim_y={dy}; "
                    f"got {tuple(getattr(self, name).shape)}"
                )
        devices = {getattr(self, name).device for name in names}
        if len(devices) != 1:
            raise ValueError(f"Moments: all tensors must be on one device, got {sorted(map(str, devices))}")

    @property
    def dim_x(self) -> int:
        return self.mean_x.shape[0]

    @property
    def dim_y(self) -> int:
        return self.mean_y.shape[0]

    @property
    def device(self) -> torch.device:
        return self.mean_x.device

    def moments(self) -> Moments:
        """Itself: a Moments is accepted wherever an accumulator is."""
        return self

    def require(self, n: int, what: str) -> None:
        """ValueError unless at least ``n`` samples were accumulated."""
        require_count(self.count, n, what)

    def _cov(self, m: torch.Tensor, what: str) -> torch.Tensor:
        self.require(2, what)
        return m / (self.count - 1)

    def cov_xx(self) -> torch.Tensor:
        """Unbiased covariance of x (divided by count - 1)."""
        return self._cov(self.m_xx, "cov_xx")

    def cov_yx(self) -> torch.Tensor:
        """Unbiased cross-covariance of y (rows) and x (columns)."""
        return self._cov(self.m_yx, "cov_yx")

    def cov_yy(self) -> torch.Tensor:
        """Unbiased covariance of y."""
        return self._cov(self.m_yy, "cov_yy")

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of samples together (a new object, on this one's device)."""
        if not isinstance(other, Moments):
            raise TypeError(f"Moments.merge: expected Moments, got {type(other).__name__}")
        if (other.dim_x, other.dim_y) != (self.dim_x, self.dim_y):
            raise ValueError(
                f"Moments.merge: dimensions differ: these moments are ({self.dim_x}, {self.dim_y}), "
                f"the other ({other.dim_x}, {other.dim_y})"
            )
        mv = lambda t: t.to(self.device)  # noqa: E731
        n, (mean_x, mean_y), (m_xx, m_yx, m_yy) = merge_moments(
            self.count,
            (self.mean_x, self.mean_y),
            (self.m_xx, self.m_yx, self.m_yy),
            other.count,
            (mv(other.mean_x), mv(other.mean_y)),
            (mv(other.m_xx), mv(other.m_yx), mv(other.m_yy)),
            MOMENT_PAIRS,
        )
        return Moments(n, mean_x, mean_y, m_xx, m_yx, m_yy)


#: Which variables each co-moment of :class:`Moments` pairs, as (row, column) with x = 0, y = 1:
#: (m_xx, m_yx, m_yy); the ``pairs`` argument of :func:`merge_moments`.
MOMENT_PAIRS = ((0, 0), (1, 0), (1, 1))


@runtime_checkable
class SupportsMoments(Protocol):
    """Anything with a ``moments()`` method returning :class:`Moments` (a CovarianceAccumulator, a Moments)."""

    def moments(self) -> Moments: ...


MomentsLike = Moments | SupportsMoments


def as_moments(obj: MomentsLike, what: str) -> Moments:
    """The :class:`Moments` of ``obj`` (a Moments, or anything with a ``moments()`` method)."""
    if isinstance(obj, Moments):
        return obj
    get = getattr(obj, "moments", None)
    if not callable(get):
        raise TypeError(f"{what}: expected a CovarianceAccumulator or nbl_ext.Moments, got {type(obj).__name__}")
    m = get()
    if not isinstance(m, Moments):
        raise TypeError(f"{what}: {type(obj).__name__}.moments() returned {type(m).__name__}, not Moments")
    return m


# --- solves -----------------------------------------------------------------


def nonconstant_channels(var: torch.Tensor) -> torch.Tensor:
    """Mask of the channels whose variance ``var`` is above ``CONST_RTOL`` x the largest (the rest are constant)."""
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
    keep = nonconstant_channels(var)
    out = torch.zeros_like(rhs)
    if not bool(keep.any()):
        warnings.warn(
            f"{what}: every input channel is constant; the fit is the mean alone", SingularWarning, stacklevel=3
        )
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


def fit_linear(acc: MomentsLike, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LMMSE affine map from x to y: ``y ~ W x + b``.

    ``W = C_yx C_xx^-1`` and ``b = E[y] - W E[x]``, float64, W of shape
    (dim_y, dim_x), b of shape (dim_y,), on the accumulator's device. ``acc``
    is a CovarianceAccumulator or its :class:`Moments` (the same for all the
    functions below).

    ``ridge`` is relative: it adds ``ridge * Var(x_i)`` to each diagonal entry
    of C_xx (a scale-free Tikhonov term). It grows automatically, with a
    :class:`SingularWarning`, only when C_xx is numerically singular (fewer
    samples than dimensions, duplicated or constant channels). Constant
    channels of x get zero weight.
    """
    m = as_moments(acc, "fit_linear")
    m.require(2, "fit_linear")
    w_t = solve_psd(m.m_xx, m.m_yx.T, ridge=ridge, what="fit_linear")
    w = w_t.T.contiguous()
    b = m.mean_y - w @ m.mean_x
    return w, b


def _whitener(c: torch.Tensor) -> torch.Tensor:
    """Matrix V with V^T C V = I on the non-null subspace of PSD C (clamped eigh)."""
    var = c.diagonal()
    keep = nonconstant_channels(var)
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


def _cca_moments(m: Moments, residual: bool):
    m_xx, m_yx, m_yy = m.m_xx, m.m_yx, m.m_yy
    if residual:
        if m.dim_x != m.dim_y:
            raise ValueError(
                f"residual=True correlates x with x + y, which needs dim_x == dim_y; got {m.dim_x} and {m.dim_y}"
            )
        # y' = x + y:  M_y'x = M_xx + M_yx,  M_y'y' = M_xx + M_yx + M_yx^T + M_yy
        m_yy = m_xx + m_yx + m_yx.T + m_yy
        m_yx = m_xx + m_yx
    return m_xx, m_yx, m_yy


def canonical_correlations(acc: MomentsLike, *, residual: bool = False) -> torch.Tensor:
    """Canonical correlations between x and y, float64, descending, in [0, 1].

    Returns ``min(dim_x, dim_y)`` values: the singular values of
    ``C_xx^-1/2 C_xy C_yy^-1/2`` computed by clamped-eigh whitening; directions
    of zero variance contribute correlation 0. With ``residual=True`` the
    correlations are between x and ``x + y`` (NBL's score: y is the attention
    branch output, x + y the residual stream after the block).
    """
    m = as_moments(acc, "canonical_correlations")
    m.require(2, "canonical_correlations")
    m_xx, m_yx, m_yy = _cca_moments(m, residual)
    vx, vy = _whitener(m_xx), _whitener(m_yy)
    r = min(m.dim_x, m.dim_y)
    rho = torch.zeros(r, dtype=_F64, device=m_xx.device)
    if vx.shape[1] and vy.shape[1]:
        sv = torch.linalg.svdvals(vy.T @ m_yx @ vx).clamp_(0.0, 1.0)
        rho[: sv.numel()] = sv[:r]
    return rho.sort(descending=True).values


def cca_bound(acc: MomentsLike, *, residual: bool = False) -> float:
    """NBL's CCA error bound: ``sum_i (1 - rho_i^2) + (dim_y - r)``, r = min(dim_x, dim_y).

    Lower means y is better explained by an affine function of x. With
    ``residual=True`` the correlations are between x and x + y (see
    :func:`canonical_correlations`).
    """
    m = as_moments(acc, "cca_bound")
    rho = canonical_correlations(m, residual=residual)
    r = min(m.dim_x, m.dim_y)
    return float((1.0 - rho * rho).sum()) + float(m.dim_y - r)


def lmmse_nmse(acc: MomentsLike, w: torch.Tensor, b: torch.Tensor) -> float:
    """Closed-form normalized MSE of ``y_hat = W x + b`` on the accumulated data.

    ``sum_n ||y_n - W x_n - b||^2 / sum_n ||y_n - mean(y)||^2``, computed from
    the moments alone; it equals the error measured by applying (W, b) to the
    same samples. 0 is a perfect fit, 1 is no better than predicting the mean.
    Pass another set's moments for the held-out error of a map fitted on one set.
    """
    acc = as_moments(acc, "lmmse_nmse")
    acc.require(1, "lmmse_nmse")
    if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("lmmse_nmse: W and b must be tensors (as returned by fit_linear)")
    if tuple(w.shape) != (acc.dim_y, acc.dim_x) or tuple(b.shape) != (acc.dim_y,):
        raise ValueError(
            f"lmmse_nmse: expected W of shape {(acc.dim_y, acc.dim_x)} and b of shape {(acc.dim_y,)}, "
            f"got {tuple(w.shape)} and {tuple(b.shape)}"
        )
    w = w.to(device=acc.device, dtype=_F64)
    b = b.to(device=acc.device, dtype=_F64)
    total = float(acc.m_yy.trace())
    if total <= 0.0:
        raise ValueError("lmmse_nmse: y has zero variance on the accumulated data; the NMSE is undefined")
    bias = acc.mean_y - w @ acc.mean_x - b
    err = total - 2.0 * float((w * acc.m_yx).sum()) + float(((w @ acc.m_xx) * w).sum()) + acc.count * float(bias @ bias)
    return max(err, 0.0) / total


#: Positions per float64 log-softmax in :func:`next_token_nll` (64 x a 262k vocabulary: 134 MB).
NLL_CHUNK_TOKENS = 64


def next_token_nll(
    logits: torch.Tensor, targets: torch.Tensor, *, chunk_tokens: int = NLL_CHUNK_TOKENS
) -> torch.Tensor:
    """Float64 negative log-likelihood of ``targets`` under ``logits`` (``targets.shape + (vocab,)``).

    The log-softmax is taken in float64, ``chunk_tokens`` positions at a time, so the float64 copy
    of the logits never exceeds ``chunk_tokens x vocab`` (the whole batch in float64 is 2 x 8 bytes
    per logit: 4.3 GB for 4 x 512 tokens of a 262k vocabulary). Each position's value is the same
    as a log-softmax over the whole batch at once (the softmax is per position). Returns a float64
    tensor of ``targets``' shape.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"next_token_nll: logits {tuple(logits.shape)} must have targets' shape {tuple(targets.shape)} "
            "plus a vocabulary dimension"
        )
    if chunk_tokens < 1:
        raise ValueError(f"next_token_nll: chunk_tokens must be >= 1, got {chunk_tokens}")
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1, 1)
    out = torch.empty(tgt.shape[0], dtype=_F64, device=logits.device)
    for s in range(0, tgt.shape[0], chunk_tokens):
        logp = torch.log_softmax(flat[s : s + chunk_tokens].to(_F64), dim=-1)
        out[s : s + chunk_tokens] = -logp.gather(-1, tgt[s : s + chunk_tokens])[:, 0]
    return out.reshape(targets.shape)
