"""Cross-validated LMMSE fits from per-fold moments (nbl_ext.crossval): the closed form against the error
measured on the held-out tokens, the eigendecomposition path against per-ridge solves, ridge choice, bad inputs."""

from __future__ import annotations

import pytest
import torch

import nbl_ext
from helpers import make_xy, np_stats, rel_err
from nbl_ext.crossval import choose_ridge, cross_validate, cross_validated_nmse, merge_folds

RIDGES = [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]


def _folds(x, y, k, device="cpu"):
    """Fold j = samples j, j + k, j + 2k, ... (deterministic, by sample)."""
    out = []
    for j in range(k):
        acc = nbl_ext.CovarianceAccumulator(x.shape[-1], y.shape[-1], device=device)
        out.append(acc.update(x[j::k].to(device), y[j::k].to(device)))
    return out


def _data(gen, n=1200, d=16, dy=None, noise=1.0):
    # Few samples per parameter (it overfits) and massive-activation channels (means ~3e3, unit variance).
    return make_xy(n, d, dy or d, gen=gen, dtype=torch.float64, massive=3e3, noise=noise)


def test_closed_form_equals_error_measured_on_heldout_tokens(device, gen):
    x, y = _data(gen)
    k = 4
    cv = cross_validate(_folds(x, y, k, device), RIDGES)
    err = torch.zeros(len(RIDGES), dtype=torch.float64)
    tgt = 0.0
    stream = float(((x + y) ** 2).sum())
    for j in range(k):
        train = torch.ones(x.shape[0], dtype=torch.bool)
        train[j::k] = False
        acc = nbl_ext.CovarianceAccumulator(16, 16).update(x[train], y[train])
        xt, yt = x[j::k], y[j::k]
        tgt += float(((yt - yt.mean(0)) ** 2).sum())
        for i, r in enumerate(RIDGES):
            w, b = nbl_ext.fit_linear(acc, r)
            err[i] += float(((yt - xt @ w.T - b) ** 2).sum())  # the map applied to the held-out tokens
    assert rel_err(cv.fold_error.sum(0).cpu(), err) < 1e-8
    assert rel_err(cv.nmse.cpu(), err / tgt) < 1e-8
    assert rel_err(cv.residual_ratio.cpu(), err / stream) < 1e-8
    assert float(cv.residual_ratio.max()) < 1e-3  # the stream is dominated by the massive channels
    # Held out is worse than in sample (the map overfits), and some ridge helps here.
    full = nbl_ext.CovarianceAccumulator(16, 16).update(x, y)
    w, b = nbl_ext.fit_linear(full)
    assert float(cv.nmse[0]) > nbl_ext.lmmse_nmse(full, w, b)
    assert cv.best_index > 0


def test_eigendecomposition_equals_per_ridge_solves(gen):
    """Moments only: fit_linear on the merge of the other folds, lmmse_nmse on the held-out fold."""
    x, y = _data(gen, n=900, d=12, dy=7)
    folds = [a.moments() for a in _folds(x, y, 5)]
    cv = cross_validate(folds, RIDGES)
    for j in range(5):
        train = None
        for i, m in enumerate(folds):
            if i != j:
                train = m if train is None else train.merge(m)
        for i, r in enumerate(RIDGES):
            w, b = nbl_ext.fit_linear(train, r)
            want = nbl_ext.lmmse_nmse(folds[j], w, b) * float(folds[j].m_yy.trace())
            assert float(cv.fold_error[j, i]) == pytest.approx(want, rel=1e-9)
    assert cv.fold_stream is None
    with pytest.raises(ValueError, match="dim_x == dim_y"):
        _ = cv.residual_ratio
    assert torch.equal(cv.effective_ridges, torch.tensor(RIDGES, dtype=torch.float64).expand(5, -1))


def test_fold_merge_equals_full_statistics(gen):
    x, y = _data(gen, n=701, d=9)
    folds = [a.moments() for a in _folds(x, y, 3)]
    merged = merge_folds(folds)
    assert merged.count == 701
    assert torch.equal(merged.m_yx, folds[0].merge(folds[1]).merge(folds[2]).m_yx)
    acc = nbl_ext.CovarianceAccumulator.from_moments(merged)
    for key, ref in np_stats(x, y).items():
        assert rel_err(getattr(acc, key), ref) < 1e-10, key


def test_choose_ridge_is_the_minimum_of_the_curve(gen):
    x, y = _data(gen, n=600, d=20, noise=2.0)
    folds = _folds(x, y, 3)
    ridges = [10.0**e for e in range(-8, 1)]
    best, curve = choose_ridge(folds, ridges)
    assert curve.shape == (len(ridges),) and torch.equal(curve, cross_validated_nmse(folds, ridges))
    assert best == ridges[int(curve.argmin())]
    assert float(curve.min()) < float(curve[0])  # regularization pays at 600 samples for 20 x 21 parameters
    # A sub-grid's choice is the minimum of that sub-grid.
    best2, curve2 = choose_ridge(folds, ridges[:2])
    assert best2 == ridges[int(curve2.argmin())] and rel_err(curve2, curve[:2]) < 1e-12


def test_singular_training_covariance_grows_the_ridge_like_fit_linear(gen):
    x, y = make_xy(60, 10, 4, gen=gen, dtype=torch.float64)
    x = torch.cat([x, x[:, :3] * 2.0 - 1.0], dim=1)  # dependent channels: C_xx singular
    folds = [a.moments() for a in _folds(x, y, 3)]
    with pytest.warns(nbl_ext.SingularWarning, match="raised as fit_linear raises them"):
        cv = cross_validate(folds, [0.0, 1e-2])
    assert float(cv.effective_ridges[:, 0].min()) > 0 and bool((cv.effective_ridges[:, 1] == 1e-2).all())
    assert bool(torch.isfinite(cv.nmse).all())


def test_bad_inputs_are_clear_errors(gen):
    x, y = _data(gen, n=100, d=4)
    folds = _folds(x, y, 2)
    with pytest.raises(ValueError, match="at least 2 folds"):
        cross_validate(folds[:1], RIDGES)
    with pytest.raises(ValueError, match=r"fold\(s\) \[1\] hold no samples"):
        cross_validate([folds[0], nbl_ext.CovarianceAccumulator(4, 4)], RIDGES)
    with pytest.raises(ValueError, match="same \\(dim_x, dim_y\\)"):
        cross_validate([folds[0], nbl_ext.CovarianceAccumulator(4, 3).update(x[:5], y[:5, :3])], RIDGES)
    for bad in ([], [1e-3, -1e-3], [float("nan")], [1e-2, 1e-3], [1e-3, 1e-3]):
        with pytest.raises(ValueError, match="ridge"):
            cross_validate(folds, bad)
    with pytest.raises(TypeError, match="list of per-fold"):
        cross_validate(folds[0], RIDGES)
    with pytest.raises(ValueError, match="non-empty list"):
        merge_folds([])
    with pytest.raises(ValueError, match="y is constant"):
        cross_validate(_folds(x, torch.ones_like(y), 2), RIDGES)
