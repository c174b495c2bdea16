"""CovarianceAccumulator: statistics against numpy float64, streaming invariances,
adversarial inputs and bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch

import nbl_ext
from helpers import make_xy, np_stats, rel_err

# Relative error allowed against the float64 oracle, by input dtype. Inputs in
# fp32/bf16/fp16 are upcast exactly; the Gram blocks of centered data are
# float32, so the error is float32 round-off over <= 2048-term sums.
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def _check(acc, x, y, dtype):
    want = np_stats(x, y)
    for key, ref in want.items():
        assert rel_err(getattr(acc, key), ref) < TOL[dtype], key


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_numpy(device, gen, dtype):
    x, y = make_xy(3000, 24, 17, gen=gen, dtype=dtype)
    acc = nbl_ext.CovarianceAccumulator(24, 17, device=device)
    acc.update(x.to(device), y.to(device))
    assert acc.count == 3000
    _check(acc, x, y, dtype)
    for key in ("mean_x", "mean_y", "cov_xx", "cov_yx", "cov_yy"):
        assert getattr(acc, key).dtype == torch.float64
    assert acc.cov_yx.shape == (17, 24)


def test_leading_dims_are_flattened(device, gen):
    x, y = make_xy(2 * 3 * 50, 8, 5, gen=gen)
    acc = nbl_ext.CovarianceAccumulator(8, 5, device=device)
    acc.update(x.view(2, 3, 50, 8).to(device), y.view(2, 3, 50, 5).to(device))
    _check(acc, x, y, torch.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunking_and_order_invariance(device, seed):
    g = torch.Generator().manual_seed(seed)
    n = 4500  # several internal Gram blocks of 2048 rows
    x, y = make_xy(n, 16, 11, gen=g, dtype=torch.float64)
    whole = nbl_ext.CovarianceAccumulator(16, 11, device=device).update(x.to(device), y.to(device))
    # Random chunk sizes including empty and single-sample chunks, in random order.
    cuts = sorted(set(torch.randint(0, n, (12,), generator=g).tolist()) | {0, 1, 2, n})
    chunks = [(a, b) for a, b in zip(cuts[:-1], cuts[1:])] + [(7, 7)]
    order = torch.randperm(len(chunks), generator=g).tolist()
    streamed = nbl_ext.CovarianceAccumulator(16, 11, device=device)
    for i in order:
        a, b = chunks[i]
        streamed.update(x[a:b].to(device), y[a:b].to(device))
    assert streamed.count == n
    for key in ("mean_x", "mean_y", "cov_xx", "cov_yx", "cov_yy"):
        assert rel_err(getattr(streamed, key), getattr(whole, key).cpu().numpy()) < 1e-11, key


def test_merge_equals_single_stream(device, gen):
    x, y = make_xy(2000, 12, 9, gen=gen, dtype=torch.float64)
    parts = [nbl_ext.CovarianceAccumulator(12, 9, device=device) for _ in range(3)]
    for acc, (a, b) in zip(parts, [(0, 1), (1, 1200), (1200, 2000)]):
        acc.update(x[a:b].to(device), y[a:b].to(device))
    empty = nbl_ext.CovarianceAccumulator(12, 9, device=device)
    merged = parts[0].merge(parts[1]).merge(empty).merge(parts[2])
    assert merged.count == 2000
    _check(merged, x, y, torch.float64)
    # Merging into an empty accumulator copies the other's statistics.
    fresh = nbl_ext.CovarianceAccumulator(12, 9, device=device).merge(merged)
    assert torch.equal(fresh.cov_xx, merged.cov_xx)


def test_massive_activations_keep_precision(gen):
    """Channels with means of 1e3-1e4 and unit variance (LLM residual streams)."""
    x, y = make_xy(4096, 32, 32, gen=gen, dtype=torch.float32, massive=1e4)
    assert float(x.mean(0).abs().max()) > 1e4
    acc = nbl_ext.CovarianceAccumulator(32, 32).update(x, y)
    _check(acc, x, y, torch.float32)
    # The same data through the raw-moment formula in float32 loses the
    # covariance of the massive channels entirely: the test data is adversarial.
    n = x.shape[0]
    raw = (x.T @ x - n * torch.outer(x.mean(0), x.mean(0))) / (n - 1)
    assert rel_err(raw, np_stats(x, y)["cov_xx"]) > 1e-2


def test_single_sample_and_empty_chunk(device, gen):
    x, y = make_xy(3, 4, 3, gen=gen, dtype=torch.float64)
    acc = nbl_ext.CovarianceAccumulator(4, 3, device=device)
    acc.update(x[:0].to(device), y[:0].to(device))
    assert acc.count == 0
    acc.update(x[:1].to(device), y[:1].to(device))
    assert acc.count == 1
    np.testing.assert_allclose(acc.mean_x.cpu().numpy(), x[0].numpy(), rtol=1e-15)
    with pytest.raises(ValueError, match="at least 2 accumulated sample"):
        _ = acc.cov_xx
    acc.update(x[1:].to(device), y[1:].to(device))
    _check(acc, x, y, torch.float64)


def test_state_dict_roundtrip_through_safetensors(tmp_path, gen):
    x, y = make_xy(500, 6, 4, gen=gen)
    acc = nbl_ext.CovarianceAccumulator(6, 4).update(x, y)
    path = tmp_path / "acc.safetensors"
    safetensors.torch.save_file(acc.state_dict(), str(path))
    back = nbl_ext.CovarianceAccumulator(6, 4).load_state_dict(safetensors.torch.load_file(str(path)))
    assert back.count == acc.count
    for key in ("mean_x", "mean_y", "cov_xx", "cov_yx", "cov_yy"):
        assert torch.equal(getattr(back, key), getattr(acc, key))
    # Continuing after a reload equals never having stopped.
    x2, y2 = make_xy(300, 6, 4, gen=gen)
    back.update(x2, y2)
    _check(back, torch.cat([x, x2]), torch.cat([y, y2]), torch.float32)


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["x", "y"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_is_rejected_and_state_kept(device, gen, which, bad):
    x, y = make_xy(100, 5, 4, gen=gen)
    acc = nbl_ext.CovarianceAccumulator(5, 4, device=device).update(x.to(device), y.to(device))
    before = {k: v.clone() for k, v in acc.state_dict().items()}
    x2, y2 = make_xy(50, 5, 4, gen=gen)
    target = x2 if which == "x" else y2
    target[3, 1] = bad
    target[40, 0] = bad
    with pytest.raises(ValueError, match=rf"{which} contains 2 non-finite value"):
        acc.update(x2.to(device), y2.to(device))
    after = acc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_shape_dtype_device_errors(gen):
    acc = nbl_ext.CovarianceAccumulator(5, 4)
    x, y = make_xy(10, 5, 4, gen=gen)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 5\)"):
        acc.update(x[:, :4], y)
    with pytest.raises(ValueError, match=r"y must have shape \(\.\.\., 4\)"):
        acc.update(x, x)
    with pytest.raises(ValueError, match="same leading shape"):
        acc.update(x, y[:9])
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64"):
        acc.update(x.to(torch.int64), y)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        acc.update(x.numpy(), y)
    with pytest.raises(ValueError, match="is on meta but the accumulator is on cpu"):
        acc.update(x.to("meta"), y)
    with pytest.raises(ValueError, match="dim_x must be a positive int"):
        nbl_ext.CovarianceAccumulator(0, 3)
    with pytest.raises(ValueError, match="dimensions differ"):
        acc.merge(nbl_ext.CovarianceAccumulator(4, 5))
    with pytest.raises(ValueError, match="state is for dims"):
        nbl_ext.CovarianceAccumulator(4, 4).load_state_dict(acc.state_dict())
    with pytest.raises(RuntimeError, match="not initialized"):
        acc.all_reduce()


def test_statistics_before_data_are_clear_errors():
    acc = nbl_ext.CovarianceAccumulator(3, 2)
    for what in ("mean_x", "cov_yy"):
        with pytest.raises(ValueError, match="call update"):
            getattr(acc, what)
    for fn in (nbl_ext.fit_linear, nbl_ext.canonical_correlations, nbl_ext.cca_bound):
        with pytest.raises(ValueError, match="has 0"):
            fn(acc)


# --- precision="bfloat16": the opt-in fast Gram mode and its accuracy cost ------------

COVS = ("cov_xx", "cov_yx", "cov_yy")


def _cov_err(acc, want) -> float:
    """max over the three covariances of max |cov - oracle| / max |oracle| (BF16_REL_ERR_BOUND's measure)."""
    return max(rel_err(getattr(acc, k), want[k]) for k in COVS)


@pytest.mark.parametrize("case", ["plain", "massive", "few_samples", "many_chunks", "bf16_inputs", "float64_inputs"])
def test_bfloat16_precision_error_is_bounded(device, gen, case):
    """bf16 Gram mode vs a float64 two-pass oracle: within the stated bound, and the
    float32 mode is much tighter on the same data."""
    n, dtype, massive, chunk = 3000, torch.float32, 0.0, 3000
    if case == "massive":
        massive = 1e3  # "massive activations": the chunk centering keeps them harmless
    elif case == "few_samples":
        n = 64  # little averaging of the rounding errors
    elif case == "many_chunks":
        n, chunk = 9000, 500
    elif case == "bf16_inputs":
        dtype = torch.bfloat16
    elif case == "float64_inputs":
        dtype = torch.float64
    x, y = make_xy(n, 48, 40, gen=gen, dtype=dtype, massive=massive)
    want = np_stats(x, y)
    errs = {}
    for precision in ("float32", "bfloat16"):
        acc = nbl_ext.CovarianceAccumulator(48, 40, device=device, precision=precision)
        for r0 in range(0, n, chunk):
            acc.update(x[r0 : r0 + chunk].to(device), y[r0 : r0 + chunk].to(device))
        errs[precision] = _cov_err(acc, want)
        # The means never depend on the Gram precision.
        assert rel_err(acc.mean_x, want["mean_x"]) < 1e-11 and rel_err(acc.mean_y, want["mean_y"]) < 1e-11
    assert errs["bfloat16"] <= nbl_ext.stats.BF16_REL_ERR_BOUND, errs
    assert errs["float32"] <= nbl_ext.stats.BF16_REL_ERR_BOUND / 100, errs
    assert errs["float32"] < errs["bfloat16"] / 10, errs  # bf16 is the less accurate mode, by far


def test_bfloat16_precision_fit_is_close(gen):
    """What the mode changes downstream: the fitted LMMSE map moves by about the covariance error."""
    x, y = make_xy(4000, 32, 32, gen=gen)
    fits = {}
    for precision in ("float32", "bfloat16"):
        acc = nbl_ext.CovarianceAccumulator(32, 32, precision=precision).update(x, y)
        fits[precision] = nbl_ext.fit_linear(acc)
    (w32, b32), (w16, b16) = fits["float32"], fits["bfloat16"]
    assert rel_err(w16, w32.numpy()) < 1e-2 and rel_err(b16, b32.numpy()) < 1e-2


def test_precision_argument_is_validated(gen):
    with pytest.raises(ValueError, match=r"precision must be one of 'float32', 'bfloat16'; got 'fp16'"):
        nbl_ext.CovarianceAccumulator(3, 2, precision="fp16")
    acc = nbl_ext.CovarianceAccumulator(3, 2, precision="bfloat16")
    assert acc.precision == "bfloat16" and "precision='bfloat16'" in repr(acc)
    assert nbl_ext.CovarianceAccumulator(3, 2).precision == "float32"


def test_invalid_precision_leaves_accumulator_unchanged(gen):
    """A precision that slipped past the constructor (set afterwards) is rejected by the op
    before any state changes; count and statistics stay as they were."""
    x, y = make_xy(50, 4, 3, gen=gen)
    acc = nbl_ext.CovarianceAccumulator(4, 3).update(x, y)
    before = {k: v.clone() for k, v in acc.state_dict().items()}
    acc.precision = "int8"
    with pytest.raises(ValueError, match="precision must be one of"):
        acc.update(x, y)
    after = acc.state_dict()
    assert acc.count == 50 and all(torch.equal(before[k], after[k]) for k in before)
