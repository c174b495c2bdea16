"""Cross-validated LMMSE fits in closed form, from per-fold moments.

Given K folds' :class:`~nbl_ext.numerics.Moments` (disjoint sets of samples,
e.g. calibration sequences assigned to folds by index), for each fold j the
map is fitted on the merge of the other folds, exactly as
:func:`nbl_ext.fit_linear` fits it with a relative ridge r, and its squared
error on fold j is evaluated from fold j's moments (the formula of
:func:`nbl_ext.lmmse_nmse`, exact for any W, b). Nothing touches the tokens.

Cost: one symmetric eigendecomposition of each training fold's standardized
covariance serves every ridge of the grid (the ridge only shifts its
eigenvalues), so a grid of R ridges costs K eighs plus a few d x d products
per fold, and O(R d^2) after that: not K x R solves.

Aggregation (what :attr:`CrossValidation.nmse` is): the held-out squared error
summed over all folds' samples, divided by the target energy summed over the
folds, each fold's target centered on that fold's own mean::

    nmse(r) = sum_j sum_{n in j} ||y_n - W_{-j}(r) x_n - b_{-j}(r)||^2
              / sum_j sum_{n in j} ||y_n - mean_j(y)||^2

so every sample weighs the same (a pooled held-out NMSE, comparable to the
in-sample :func:`nbl_ext.lmmse_nmse`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nbl_ext.numerics import (
    MAX_RIDGE,
    PIVOT_RTOL,
    Moments,
    MomentsLike,
    SingularWarning,
    as_moments,
    nonconstant_channels,
)

_F64 = torch.float64

#: The recommended number of folds (``calibrate(..., folds=DEFAULT_FOLDS)``, the default of ``nbl compress``).
DEFAULT_FOLDS = 5
#: The recommended grid of relative ridges (0, then log-spaced 1e-6 .. 10, half decades from 1e-4): the ridge is
#: relative to the standardized covariance, whose eigenvalues average 1, so 1 shrinks the map by about half.
DEFAULT_RIDGES = (0.0, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class CrossValidation:
    """Held-out errors of the LMMSE map for a grid of relative ridges (see the module docstring).

    ``ridges`` (R,): the grid as given. ``fold_error`` (K, R): squared error of
    the map fitted without fold j, summed over fold j's samples.
    ``fold_target`` (K,): fold j's target energy about its own mean.
    ``fold_stream`` (K,) or None: fold j's energy of ``x + y`` (uncentered:
    the residual stream after the block, ``X + A``, as the following layers
    see it), None when dim_x != dim_y. ``effective_ridges`` (K, R): the
    relative ridge actually used per fold (larger than asked only where the
    training covariance is numerically singular, as :func:`nbl_ext.fit_linear`
    grows it; a :class:`SingularWarning` says so).
    """

    ridges: torch.Tensor
    fold_error: torch.Tensor
    fold_target: torch.Tensor
    fold_stream: torch.Tensor | None
    effective_ridges: torch.Tensor

    @property
    def nmse(self) -> torch.Tensor:
        """(R,) cross-validated NMSE: error summed over folds / target energy summed over folds."""
        return self.fold_error.sum(0) / self.fold_target.sum()

    @property
    def residual_ratio(self) -> torch.Tensor:
        """(R,) held-out error energy divided by the energy of ``x + y`` (the hidden state after the block).

        ``sum_j sum_{n in j} ||y_n - W_{-j} x_n - b_{-j}||^2 / sum_n ||x_n + y_n||^2``: the size of
        the perturbation the linearized block adds to what the following layers read (uncentered,
        as they read it: an RMSNorm does not subtract the mean). Needs dim_x == dim_y.
        """
        if self.fold_stream is None:
            raise ValueError("residual_ratio: the residual stream x + y needs dim_x == dim_y; these folds differ")
        total = float(self.fold_stream.sum())
        if total <= 0.0:
            raise ValueError("residual_ratio: x + y is zero on every sample; the ratio is undefined")
        return self.fold_error.sum(0) / total

    @property
    def best_index(self) -> int:
        """Index of the ridge with the lowest cross-validated NMSE (ties: the larger ridge)."""
        nmse = self.nmse
        return int((nmse == nmse.min()).nonzero().max())

    @property
    def best_ridge(self) -> float:
        return float(self.ridges[self.best_index])


def check_ridges(ridges: Sequence[float] | torch.Tensor, what: str = "cross_validate") -> torch.Tensor:
    """A grid of relative ridges as a float64 CPU tensor; ValueError unless non-empty, finite, >= 0, increasing."""
    if isinstance(ridges, (str, bytes)):
        raise ValueError(f"{what}: ridges must be a sequence of numbers, got {ridges!r}")
    try:
        r = torch.as_tensor(ridges, dtype=_F64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{what}: ridges must be a sequence of numbers, got {ridges!r} ({exc})") from None
    if r.dim() != 1 or r.numel() == 0:
        raise ValueError(f"{what}: ridges must be a non-empty 1-D sequence, got shape {tuple(r.shape)}")
    if not bool(torch.isfinite(r).all()) or float(r.min()) < 0:
        raise ValueError(f"{what}: every ridge must be a finite number >= 0, got {r.tolist()}")
    if r.numel() > 1 and not bool((r[1:] > r[:-1]).all()):
        raise ValueError(f"{what}: ridges must be strictly increasing (sorted, no duplicates), got {r.tolist()}")
    return r


def _check_folds(folds: Sequence[MomentsLike]) -> list[Moments]:
    if isinstance(folds, (Moments, torch.Tensor)) or not isinstance(folds, Sequence):
        raise TypeError(
            f"cross_validate: folds must be a list of per-fold Moments or CovarianceAccumulators, got "
            f"{type(folds).__name__}"
        )
    if len(folds) < 2:
        raise ValueError(
            f"cross_validate: needs at least 2 folds (fit on the others, evaluate on each), got {len(folds)}"
        )
    ms = [as_moments(f, "cross_validate") for f in folds]
    dims = {(m.dim_x, m.dim_y) for m in ms}
    if len(dims) != 1:
        raise ValueError(f"cross_validate: every fold must have the same (dim_x, dim_y), got {sorted(dims)}")
    empty = [j for j, m in enumerate(ms) if m.count == 0]
    if empty:
        raise ValueError(
            f"cross_validate: fold(s) {empty} hold no samples; each fold needs samples to be evaluated on "
            "(use fewer folds than calibration samples)"
        )
    dev = ms[0].device
    return [
        m if m.device == dev else Moments(m.count, *(t.to(dev) for t in (m.mean_x, m.mean_y, m.m_xx, m.m_yx, m.m_yy)))
        for m in ms
    ]


def check_fold_settings(
    folds: Any, ridges: Any, ridge: Any, num_samples: int, what: str
) -> tuple[int, list[float] | None]:
    """Validated (folds, ridge grid or None) of a calibration over ``num_samples`` samples (see nbl_ext.calibrate)."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise ValueError(f"{what}: folds must be a positive int (1: no cross-validation), got {folds!r}")
    if folds > num_samples:
        raise ValueError(
            f"{what}: folds={folds} is more than the {num_samples} calibration samples (folds are "
            "made of whole samples); use folds <= num_samples or more samples"
        )
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0 or ridge == float("inf"):
        raise ValueError(f"{what}: ridge must be a finite number >= 0, got {ridge!r}")
    if ridges is None:
        return folds, None
    if folds < 2:
        raise ValueError(
            f"{what}: choosing the ridge from a grid needs cross-validation folds; pass folds >= 2 "
            f"(e.g. {DEFAULT_FOLDS}) with ridges="
        )
    if ridge != 0:
        raise ValueError(
            f"{what}: pass either ridge={ridge!r} (one fixed ridge) or a ridges= grid to choose from, not both"
        )
    return folds, [float(v) for v in check_ridges(ridges, what).tolist()]


def merge_folds(folds: Sequence[MomentsLike]) -> Moments:
    """The moments of all folds together (the full statistics), e.g. for the final fit with the chosen ridge."""
    if isinstance(folds, (Moments, torch.Tensor)) or not isinstance(folds, Sequence):
        raise TypeError(
            f"merge_folds: expected a list of per-fold Moments or CovarianceAccumulators, got {type(folds).__name__}"
        )
    if not folds:
        raise ValueError("merge_folds: expected a non-empty list of per-fold Moments or CovarianceAccumulators")
    ms = [as_moments(f, "merge_folds") for f in folds]
    out = ms[0]
    for m in ms[1:]:
        out = out.merge(m)
    return out


def _training_sets(ms: list[Moments]) -> list[Moments]:
    """For each j the merge of all folds but j (prefix and suffix merges: 3K merges, not K^2)."""
    k = len(ms)
    prefix = [ms[0]]
    for m in ms[1:-1]:
        prefix.append(prefix[-1].merge(m))
    suffix = [ms[-1]]
    for m in reversed(ms[1:-1]):
        suffix.append(suffix[-1].merge(m))
    suffix.reverse()  # suffix[i] = merge(ms[i + 1:])
    return [suffix[0]] + [prefix[j - 1].merge(suffix[j]) for j in range(1, k - 1)] + [prefix[-1]]


def _grown_ridge(lam_min: float, ridge: float) -> float:
    """fit_linear's ridge growth (numerics._cholesky_standardized), decided on the smallest eigenvalue."""
    lam = ridge
    while not lam_min + lam > PIVOT_RTOL * (1.0 + lam):
        if lam >= MAX_RIDGE:
            raise FloatingPointError(
                f"cross_validate: the covariance stays singular even with a relative ridge of {lam:g}; "
                "the statistics are degenerate (check the inputs for constant or duplicated data)"
            )
        lam = max(lam * 10.0, 1e-10)
    return lam


def _fold_errors(train: Moments, test: Moments, ridges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) squared error on ``test`` of the map fitted on ``train`` per ridge, and the ridges used."""
    dev = train.device
    ridges = ridges.to(dev)
    d_y = test.mean_y - train.mean_y
    base = float(test.m_yy.trace()) + test.count * float(d_y @ d_y)  # error of W = 0, b = mean_y(train)
    var = train.m_xx.diagonal()
    keep = nonconstant_channels(var)
    if not bool(keep.any()):
        return torch.full_like(ridges, base), ridges.clone()
    idx = keep.nonzero().squeeze(1)
    s = var[idx].sqrt()
    r = train.m_xx[idx][:, idx] / torch.outer(s, s)
    evals, q = torch.linalg.eigh(0.5 * (r + r.T))
    eff = torch.tensor([_grown_ridge(float(evals.min()), float(v)) for v in ridges.tolist()], dtype=_F64, device=dev)
    # W[:, idx] = P^T diag(f) Q^T S with S = diag(1/s), P = Q^T S M_yx(train)^T, f = 1 / (evals + ridge).
    p = q.T @ (train.m_yx[:, idx] / s).T  # (k, dim_y)
    h = q.T @ (test.m_yx[:, idx] / s).T  # (k, dim_y)
    a = q.T @ (test.m_xx[idx][:, idx] / torch.outer(s, s)) @ q  # (k, k)
    c = a * (p @ p.T)
    t_cross = (p * h).sum(1)  # <W, M_yx(test)> = f . t_cross
    u = q.T @ ((test.mean_x - train.mean_x)[idx] / s)  # W d_x = P^T (f * u)
    f = 1.0 / (evals[None, :] + eff[:, None])  # (R, k)
    cross = f @ t_cross
    quad = ((f @ c) * f).sum(1)  # tr(W M_xx(test) W^T) = f^T (A o P P^T) f
    w_dx = (f * u) @ p  # (R, dim_y)
    bias = ((d_y - w_dx) ** 2).sum(1)  # test mean residual: mean_y(test) - W mean_x(test) - b
    err = float(test.m_yy.trace()) - 2.0 * cross + quad + test.count * bias
    return err.clamp_min(0.0), eff


def cross_validate(folds: Sequence[MomentsLike], ridges: Sequence[float] | torch.Tensor) -> CrossValidation:
    """Held-out errors of the LMMSE map of y on x for every relative ridge of the grid.

    ``folds``: K >= 2 per-fold :class:`Moments` (or CovarianceAccumulators),
    disjoint, non-empty, one (dim_x, dim_y). ``ridges``: non-empty, finite,
    >= 0, strictly increasing relative ridges (as :func:`nbl_ext.fit_linear`
    defines them). Float64 on the first fold's device. Raises ValueError on
    bad inputs, and when y is constant within every fold (the NMSE is then
    undefined).
    """
    grid = check_ridges(ridges)
    ms = _check_folds(folds)
    dev = ms[0].device
    target = torch.tensor([float(m.m_yy.trace()) for m in ms], dtype=_F64, device=dev)
    if float(target.sum()) <= 0.0:
        raise ValueError("cross_validate: y is constant within every fold; the held-out NMSE is undefined")
    errors, effs = [], []
    for j, (train, test) in enumerate(zip(_training_sets(ms), ms)):
        train.require(2, f"cross_validate (training set without fold {j})")
        err, eff = _fold_errors(train, test, grid)
        errors.append(err)
        effs.append(eff)
    eff = torch.stack(effs)
    grown = eff > grid.to(dev)[None, :]
    if bool(grown.any()):
        folds_grown = sorted({int(j) for j in grown.nonzero()[:, 0]})
        warnings.warn(
            f"cross_validate: the training covariance without fold(s) {folds_grown} is singular or "
            "ill-conditioned; ridges below "
            f"{float(eff[grown].max()):g} were raised as fit_linear raises them. Calibrate on more tokens "
            "or use larger ridges",
            SingularWarning,
            stacklevel=2,
        )
    stream = None
    if ms[0].dim_x == ms[0].dim_y:
        # sum_n ||x_n + y_n||^2 = tr(M_hh) + n ||mean_h||^2 with h = x + y.
        stream = torch.tensor(
            [
                float((m.m_xx + m.m_yx + m.m_yx.T + m.m_yy).trace())
                + m.count * float((m.mean_x + m.mean_y).square().sum())
                for m in ms
            ],
            dtype=_F64,
            device=dev,
        )
    return CrossValidation(
        ridges=grid.to(dev),
        fold_error=torch.stack(errors),
        fold_target=target,
        fold_stream=stream,
        effective_ridges=eff,
    )


def cross_validated_nmse(folds: Sequence[MomentsLike], ridges: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """(R,) cross-validated NMSE per ridge (see :func:`cross_validate` and the module docstring)."""
    return cross_validate(folds, ridges).nmse


def choose_ridge(folds: Sequence[MomentsLike], ridges: Sequence[float] | torch.Tensor) -> tuple[float, torch.Tensor]:
    """(ridge with the lowest cross-validated NMSE, the (R,) NMSE curve); ties go to the larger ridge."""
    cv = cross_validate(folds, ridges)
    return cv.best_ridge, cv.nmse


__all__ = [
    "DEFAULT_FOLDS",
    "DEFAULT_RIDGES",
    "CrossValidation",
    "check_fold_settings",
    "check_ridges",
    "choose_ridge",
    "cross_validate",
    "cross_validated_nmse",
    "merge_folds",
]
