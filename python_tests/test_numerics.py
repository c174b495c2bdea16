"""fit_linear, canonical_correlations, cca_bound and lmmse_nmse against scipy
float64 oracles, on well-posed and adversarial (rank-deficient) data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nbl_ext
from helpers import make_xy, np64, np_cca, np_lstsq, np_stats, rel_err


def _acc(x, y, device="cpu"):
    return nbl_ext.CovarianceAccumulator(x.shape[-1], y.shape[-1], device=device).update(x.to(device), y.to(device))


def _measured_nmse(x, y, w, b) -> float:
    xn, yn = np64(x), np64(y)
    resid = yn - xn @ np64(w).T - np64(b)
    return float((resid**2).sum() / ((yn - yn.mean(0)) ** 2).sum())


@pytest.mark.parametrize("dx,dy", [(20, 20), (20, 7), (7, 20)])
def test_fit_linear_matches_lstsq(device, gen, dx, dy):
    x, y = make_xy(1500, dx, dy, gen=gen, dtype=torch.float64)
    w, b = nbl_ext.fit_linear(_acc(x, y, device))
    assert w.shape == (dy, dx) and b.shape == (dy,) and w.dtype == b.dtype == torch.float64
    w_ref, b_ref = np_lstsq(x, y)
    assert rel_err(w, w_ref) < 1e-9
    assert rel_err(b, b_ref) < 1e-9


def test_fit_linear_massive_activations(gen):
    x, y = make_xy(6000, 24, 24, gen=gen, dtype=torch.float32, massive=5e3)
    w, b = nbl_ext.fit_linear(_acc(x, y))
    w_ref, b_ref = np_lstsq(x, y)
    # Prediction quality equals the float64 least-squares optimum.
    assert (
        abs(_measured_nmse(x, y, w, b) - _measured_nmse(x, y, torch.from_numpy(w_ref), torch.from_numpy(b_ref))) < 1e-6
    )
    assert rel_err(w, w_ref) < 1e-4


def test_canonical_correlations_match_scipy(device, gen):
    for dx, dy in [(10, 10), (12, 5), (5, 12)]:
        x, y = make_xy(2500, dx, dy, gen=gen, dtype=torch.float64, noise=1.0)
        acc = _acc(x, y, device)
        rho = nbl_ext.canonical_correlations(acc)
        s = np_stats(x, y)
        want = np_cca(s["cov_xx"], s["cov_yx"], s["cov_yy"])[: min(dx, dy)]
        assert rho.shape == (min(dx, dy),) and rho.dtype == torch.float64
        assert np.abs(np64(rho) - want).max() < 1e-10
        assert bool((rho[:-1] >= rho[1:]).all()) and float(rho.min()) >= 0 and float(rho.max()) <= 1
        bound = nbl_ext.cca_bound(acc)
        assert bound == pytest.approx(float((1 - want**2).sum()) + (dy - min(dx, dy)), abs=1e-9)


def test_correlations_of_exact_linear_map_are_one(gen):
    x, _ = make_xy(800, 9, 9, gen=gen, dtype=torch.float64)
    y = x @ torch.randn(9, 9, generator=gen, dtype=torch.float64) + 3.0
    acc = _acc(x, y)
    rho = nbl_ext.canonical_correlations(acc)
    assert np.abs(np64(rho) - 1.0).max() < 1e-9
    assert nbl_ext.cca_bound(acc) < 1e-8
    w, b = nbl_ext.fit_linear(acc)
    assert nbl_ext.lmmse_nmse(acc, w, b) < 1e-12  # float64 round-off of the closed form


def test_residual_correlations_equal_explicit_sum(gen):
    """residual=True correlates x with x + y: NBL's score on (X, A)."""
    x, a = make_xy(1200, 8, 8, gen=gen, dtype=torch.float64, noise=2.0)
    via_flag = nbl_ext.canonical_correlations(_acc(x, a), residual=True)
    explicit = nbl_ext.canonical_correlations(_acc(x, x + a))
    assert np.abs(np64(via_flag) - np64(explicit)).max() < 1e-12
    assert nbl_ext.cca_bound(_acc(x, a), residual=True) == pytest.approx(nbl_ext.cca_bound(_acc(x, x + a)), abs=1e-10)
    with pytest.raises(ValueError, match="dim_x == dim_y"):
        nbl_ext.canonical_correlations(_acc(x, a[:, :5]), residual=True)


def test_independent_variables_have_low_correlation(gen):
    x = torch.randn(20000, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(20000, 3, generator=gen, dtype=torch.float64)
    rho = nbl_ext.canonical_correlations(_acc(x, y))
    assert float(rho.max()) < 0.05


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nmse_closed_form_equals_measured(device, gen, dtype):
    x, y = make_xy(3000, 16, 10, gen=gen, dtype=dtype, noise=0.7)
    acc = _acc(x, y, device)
    w, b = nbl_ext.fit_linear(acc)
    assert nbl_ext.lmmse_nmse(acc, w, b) == pytest.approx(
        _measured_nmse(x, y, w, b), rel=1e-5 if dtype == torch.float32 else 1e-9
    )
    # Any affine map, not only the optimum.
    w2 = torch.randn(10, 16, generator=gen, dtype=torch.float64) * 0.1
    b2 = torch.randn(10, generator=gen, dtype=torch.float64)
    assert nbl_ext.lmmse_nmse(acc, w2, b2) == pytest.approx(
        _measured_nmse(x, y, w2, b2), rel=1e-5 if dtype == torch.float32 else 1e-9
    )
    # The LMMSE map is the optimum.
    assert nbl_ext.lmmse_nmse(acc, w, b) < nbl_ext.lmmse_nmse(acc, w2, b2)
    with pytest.raises(ValueError, match="expected W of shape"):
        nbl_ext.lmmse_nmse(acc, w.T, b)


def test_rank_deficient_x_warns_and_stays_optimal(gen):
    x, y = make_xy(1000, 10, 6, gen=gen, dtype=torch.float64)
    x = torch.cat([x, x[:, :3] * 2.0 - 1.0], dim=1)  # three linearly dependent channels
    acc = _acc(x, y)
    with pytest.warns(nbl_ext.SingularWarning, match="relative ridge"):
        w, b = nbl_ext.fit_linear(acc)
    assert torch.isfinite(w).all() and torch.isfinite(b).all()
    w_ref, b_ref = np_lstsq(x, y)  # minimum-norm solution
    best = _measured_nmse(x, y, torch.from_numpy(w_ref), torch.from_numpy(b_ref))
    assert _measured_nmse(x, y, w, b) == pytest.approx(best, rel=1e-6)
    rho = nbl_ext.canonical_correlations(acc)
    assert rho.shape == (6,) and bool(torch.isfinite(rho).all()) and float(rho.max()) <= 1.0


def test_constant_channels_get_zero_weight_without_warning(gen):
    x, y = make_xy(500, 6, 3, gen=gen, dtype=torch.float64)
    x[:, 2] = 1234.5  # constant: no variance, no information
    acc = _acc(x, y)
    w, b = nbl_ext.fit_linear(acc)  # no SingularWarning (it would be an error here)
    assert float(w[:, 2].abs().max()) == 0.0
    keep = [0, 1, 3, 4, 5]
    w_ref, _ = np_lstsq(x[:, keep], y)
    assert rel_err(w[:, keep], w_ref) < 1e-9


def test_fewer_samples_than_dimensions_warns(gen):
    x, y = make_xy(12, 30, 4, gen=gen, dtype=torch.float64)
    acc = _acc(x, y)
    with pytest.warns(nbl_ext.SingularWarning):
        w, b = nbl_ext.fit_linear(acc)
    assert torch.isfinite(w).all()
    # 12 samples in 30 dims: the map interpolates the data almost exactly.
    assert nbl_ext.lmmse_nmse(acc, w, b) < 1e-3


def test_ridge_is_relative_and_validated(gen):
    x, y = make_xy(400, 5, 3, gen=gen, dtype=torch.float64)
    acc = _acc(x, y)
    w0, _ = nbl_ext.fit_linear(acc)
    w1, _ = nbl_ext.fit_linear(acc, ridge=1e-2)
    assert float(w1.norm()) < float(w0.norm())  # shrinkage
    # Scale invariance: rescaling x rescales W inversely, for any ridge.
    acc_scaled = _acc(x * 1000.0, y)
    w1s, _ = nbl_ext.fit_linear(acc_scaled, ridge=1e-2)
    assert rel_err(w1s * 1000.0, np64(w1)) < 1e-9
    with pytest.raises(ValueError, match="ridge must be a finite number"):
        nbl_ext.fit_linear(acc, ridge=-1.0)


def test_moments_snapshot_and_numerics_read_it(device, gen):
    """acc.moments() is a float64 copy; every numerics function gives the same bits from it as from the accumulator."""
    x, y = make_xy(900, 12, 12, gen=gen, dtype=torch.float32, massive=2e3)
    acc = _acc(x, y, device)
    m = acc.moments()
    assert isinstance(m, nbl_ext.Moments) and (m.count, m.dim_x, m.dim_y) == (900, 12, 12)
    assert m.device == acc.device and m.m_xx.dtype == torch.float64
    for key in ("cov_xx", "cov_yx", "cov_yy"):
        assert torch.equal(getattr(m, key)(), getattr(acc, key))
    assert torch.equal(m.mean_x, acc.mean_x) and torch.equal(m.mean_y, acc.mean_y)
    for ridge in (0.0, 1e-3):
        for got, want in zip(nbl_ext.fit_linear(m, ridge), nbl_ext.fit_linear(acc, ridge)):
            assert torch.equal(got, want)
    w, b = nbl_ext.fit_linear(acc)
    assert nbl_ext.lmmse_nmse(m, w, b) == nbl_ext.lmmse_nmse(acc, w, b)
    assert nbl_ext.cca_bound(m, residual=True) == nbl_ext.cca_bound(acc, residual=True)
    assert torch.equal(nbl_ext.canonical_correlations(m), nbl_ext.canonical_correlations(acc))
    # A snapshot: later updates leave it alone.
    before = m.m_xx.clone()
    acc.update(x[:10].to(device), y[:10].to(device))
    assert torch.equal(m.m_xx, before) and m.count == 900


def test_moments_merge_and_from_moments(gen):
    x, y = make_xy(700, 6, 4, gen=gen, dtype=torch.float64, massive=1e3)
    a, b = _acc(x[:300], y[:300]), _acc(x[300:], y[300:])
    merged = a.moments().merge(b.moments())
    acc = nbl_ext.CovarianceAccumulator.from_moments(merged)
    assert acc.count == 700
    for key, ref in np_stats(x, y).items():
        assert rel_err(getattr(acc, key), ref) < 1e-11, key
    assert torch.equal(acc.moments().m_yx, a.merge(b).moments().m_yx)  # same merge as the accumulator's
    acc.update(x[:5], y[:5])  # a working accumulator, independent of `merged`
    assert acc.count == 705 and merged.count == 700


def test_moments_bad_inputs(gen):
    m = nbl_ext.CovarianceAccumulator(3, 2).moments()
    with pytest.raises(ValueError, match="has 0"):
        nbl_ext.fit_linear(m)
    with pytest.raises(ValueError, match="call update"):
        m.cov_xx()
    z = torch.zeros
    with pytest.raises(ValueError, match=r"m_yx must have shape \(2, 3\)"):
        nbl_ext.Moments(5, z(3), z(2), z(3, 3), z(3, 2), z(2, 2))
    with pytest.raises(ValueError, match="count must be an int >= 0"):
        nbl_ext.Moments(-1, z(3), z(2), z(3, 3), z(2, 3), z(2, 2))
    with pytest.raises(ValueError, match="dimensions differ"):
        m.merge(nbl_ext.CovarianceAccumulator(3, 3).moments())
    with pytest.raises(TypeError, match="expected a CovarianceAccumulator or nbl_ext.Moments"):
        nbl_ext.fit_linear({"m_xx": z(3, 3)})
    assert nbl_ext.Moments(1, z(3, dtype=torch.float32), z(2), z(3, 3), z(2, 3), z(2, 2)).mean_x.dtype == torch.float64


# --- next-token NLL in float64, chunked over positions ------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_next_token_nll_equals_a_float64_reference_at_any_chunk_size(chunk, dtype):
    from nbl_ext.numerics import next_token_nll

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 37, 101, generator=g) * 4).to(dtype)
    # adversarial rows: a huge common offset (float32 log-softmax would lose digits), one dominant logit
    logits[0, 0] += 3e4
    logits[1, 5, 17] = 80.0
    targets = torch.randint(0, 101, (3, 37), generator=g)
    targets[1, 5] = 3  # the target is far from the dominant logit
    x = logits.double().numpy()
    mx = x.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(x - mx).sum(-1, keepdims=True)))[..., 0]
    ref = lse - np.take_along_axis(x, targets.numpy()[..., None], -1)[..., 0]
    got = next_token_nll(logits, targets, chunk_tokens=chunk)
    assert got.dtype == torch.float64 and got.shape == targets.shape
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-9)
    # chunking never changes a value: the softmax is per position
    whole = -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]
    assert torch.equal(got, whole)


def test_next_token_nll_refuses_mismatched_shapes_and_bad_chunks():
    from nbl_ext.numerics import next_token_nll

    with pytest.raises(ValueError, match="targets' shape"):
        next_token_nll(torch.randn(2, 5, 11), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        next_token_nll(torch.randn(2, 5, 11), torch.zeros(2, 5, dtype=torch.long), chunk_tokens=0)
