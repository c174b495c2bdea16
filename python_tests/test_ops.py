"""The nbl:: op library: registration, opcheck, torch.compile, compiled kernel
vs pure-PyTorch reference, and the package working without _C."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nbl_ext
from helpers import make_xy
from nbl_ext import ops, reference

ROOT = Path(__file__).resolve().parents[1]


def _state(dx, dy, device="cpu"):
    z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
    return [z(dx), z(dy), z(dx, dx), z(dy, dx), z(dy, dy)]


def _seeded_state(gen, dx, dy, device="cpu"):
    """A state that already holds 300 samples (so the merge term is exercised)."""
    st = _state(dx, dy, device)
    x, y = make_xy(300, dx, dy, gen=gen, dtype=torch.float64)
    reference.cov_update_reference(*st, x.to(device), y.to(device), 0)
    return st


def test_extension_info_reports_the_build():
    info = nbl_ext.extension_info()
    assert {"compiled", "cuda", "torch_version"} <= set(info)
    assert isinstance(info["compiled"], bool) and isinstance(info["cuda"], bool)
    assert ops.has_compiled_kernel("cov_update_", "cpu") == info["compiled"]
    if info["cuda"]:
        assert ops.has_compiled_kernel("cov_update_", "cuda")


PRECISIONS = list(reference.GRAM_PRECISIONS)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_opcheck(device, gen, dtype, precision):
    x, y = make_xy(2100, 12, 7, gen=gen, dtype=dtype)  # > one Gram block
    st = _seeded_state(gen, 12, 7, device)
    torch.library.opcheck(
        torch.ops.nbl.cov_update_.default, (*st, x.to(device), y.to(device), 300), {"precision": precision}
    )


def test_opcheck_default_precision(gen):
    """Callers that pass no precision (the schema default) keep working."""
    x, y = make_xy(300, 6, 4, gen=gen)
    st = _seeded_state(gen, 6, 4)
    torch.library.opcheck(torch.ops.nbl.cov_update_.default, (*st, x, y, 300))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compiled_kernel_matches_reference(device, gen, dtype, precision):
    if not ops.has_compiled_kernel("cov_update_", device):
        pytest.skip(f"no compiled nbl::cov_update_ kernel for {device} in this build")
    x, y = make_xy(4500, 33, 21, gen=gen, dtype=dtype, massive=1e3)
    a = _seeded_state(gen, 33, 21, device)
    b = [t.clone() for t in a]
    ops.cov_update_(*a, x.to(device), y.to(device), 300, precision)  # dispatches to the C++/CUDA kernel
    reference.cov_update_reference(*b, x.to(device), y.to(device), 300, precision)
    # Same roundings of the centered values in kernel and reference; only the
    # float32 (float64) summation order of the GEMMs may differ.
    tol = 1e-12 if dtype == torch.float64 and precision == "float32" else 2e-6
    for got, want in zip(a, b):
        assert float((got - want).abs().max()) <= tol * float(want.abs().max()), (got - want).abs().max()


def test_bfloat16_precision_rounds_the_centered_values(gen):
    """The bf16 mode is its own numerics (not float32's): it differs from the
    float32 mode by about bf16's rounding, far more than float32 round-off."""
    x, y = make_xy(3000, 16, 8, gen=gen)
    a, b = _state(16, 8), _state(16, 8)
    ops.cov_update_(*a, x, y, 0, "float32")
    ops.cov_update_(*b, x, y, 0, "bfloat16")
    rel = float((a[2] - b[2]).abs().max() / a[2].abs().max())
    assert 1e-6 < rel < 1e-2, rel
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the float64 means do not depend on it


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("precision", ["fp8", "float16", "tf32", "", "Float32"])
def test_unknown_precision_raises_before_mutating(device, gen, impl, precision):
    x, y = make_xy(64, 5, 3, gen=gen)
    st = _seeded_state(gen, 5, 3, device)
    before = [t.clone() for t in st]
    fn = ops.cov_update_ if impl == "op" else reference.cov_update_reference
    with pytest.raises(ValueError, match=r"precision must be one of 'float32', 'bfloat16'; got '" + precision + "'"):
        fn(*st, x.to(device), y.to(device), 300, precision)
    assert all(torch.equal(a, b) for a, b in zip(st, before))


def test_op_rejects_non_finite_before_mutating(device, gen):
    x, y = make_xy(64, 5, 3, gen=gen)
    x[0, 0] = float("nan")
    st = _seeded_state(gen, 5, 3, device)
    before = [t.clone() for t in st]
    with pytest.raises(ValueError, match="x contains 1 non-finite"):
        ops.cov_update_(*st, x.to(device), y.to(device), 300)
    assert all(torch.equal(a, b) for a, b in zip(st, before))


def test_op_argument_errors(gen):
    st = _state(5, 3)
    x, y = make_xy(10, 5, 3, gen=gen)
    with pytest.raises(ValueError, match="same number of samples"):
        ops.cov_update_(*st, x, y[:9], 0)
    with pytest.raises(ValueError, match="2-D"):
        ops.cov_update_(*st, x[None], y[None], 0)


def test_torch_compile_fullgraph(gen):
    x, y = make_xy(700, 9, 6, gen=gen)

    def step(mx, my, mxx, myx, myy, xs, ys):
        torch.ops.nbl.cov_update_(mx, my, mxx, myx, myy, xs * 2.0, ys, 0)
        return mxx.trace() + myy.trace()

    eager = _state(9, 6)
    compiled = _state(9, 6)
    want = step(*eager, x, y)
    got = torch.compile(step, fullgraph=True, backend="inductor")(*compiled, x, y)
    assert torch.allclose(got, want, rtol=1e-12)
    for a, b in zip(compiled, eager):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_accumulator_update_under_compile(gen):
    x, y = make_xy(500, 7, 4, gen=gen)
    acc_e = nbl_ext.CovarianceAccumulator(7, 4)
    acc_c = nbl_ext.CovarianceAccumulator(7, 4)
    acc_e.update(x, y)
    torch.compile(lambda a, b: acc_c.update(a, b))(x, y)
    assert acc_c.count == 500 and torch.equal(acc_c.cov_yx, acc_e.cov_yx)


def test_package_works_without_compiled_extension(tmp_path):
    """No _C: one warning, the reference kernels serve the ops, same results."""
    script = r"""
import json, sys, warnings
sys.modules["nbl_ext._C"] = None          # make `import nbl_ext._C` fail
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, nbl_ext
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 6, generator=gen) + 50.0
    y = x[:, :4] * 0.5 + torch.randn(3000, 4, generator=gen)
    acc = nbl_ext.CovarianceAccumulator(6, 4).update(x, y)
    w, b = nbl_ext.fit_linear(acc)
ours = [str(w.message) for w in caught if "nbl_ext" in str(w.message)]
print(json.dumps({"info": nbl_ext.extension_info(), "warnings": ours,
                  "cpu_kernel": nbl_ext.ops.has_compiled_kernel("cov_update_", "cpu"),
                  "cov": acc.cov_yx.flatten().tolist(), "w": w.flatten().tolist()}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["info"]["compiled"] is False and res["info"]["cuda"] is False
    assert res["info"]["load_error"]
    assert len(res["warnings"]) == 1 and "pure-PyTorch reference" in res["warnings"][0]
    assert res["cpu_kernel"] is False
    # Same statistics as this (possibly compiled) process computes.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 6, generator=gen) + 50.0
    y = x[:, :4] * 0.5 + torch.randn(3000, 4, generator=gen)
    acc = nbl_ext.CovarianceAccumulator(6, 4).update(x, y)
    w, _ = nbl_ext.fit_linear(acc)
    assert torch.allclose(torch.tensor(res["cov"], dtype=torch.float64), acc.cov_yx.flatten(), rtol=1e-6)
    assert torch.allclose(torch.tensor(res["w"], dtype=torch.float64), w.flatten(), rtol=1e-5, atol=1e-7)


COMPILED = nbl_ext.extension_info()["compiled"]


def _spy(monkeypatch, name):
    """Count the calls of reference.<name> (the switch looks the reference up at call time)."""
    calls = []
    real = getattr(reference, name)
    monkeypatch.setattr(reference, name, lambda *a: (calls.append(1), real(*a))[1])
    return calls


def _bf16_affine_args():
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(4, 33, 96, generator=gen).to(torch.bfloat16)
    w = (torch.randn(96, 96, generator=gen) * 0.1).to(torch.bfloat16)
    b = torch.randn(96, generator=gen).to(torch.bfloat16)
    return h, w, b


@pytest.mark.skipif(not COMPILED, reason="nbl_ext._C not built")
def test_reference_switch_sends_every_op_to_the_reference(monkeypatch, gen):
    h, w, b = _bf16_affine_args()
    want = reference.affine_residual_reference(h, w, b)
    kernel = ops.affine_residual(h, w, b)
    assert not torch.equal(kernel, want)  # the C++ kernel rounds once: other bits, so the test can tell them apart
    x, y = make_xy(2500, 9, 5, gen=gen, dtype=torch.float32, massive=1e3)
    st_ref = _seeded_state(torch.Generator().manual_seed(1), 9, 5)
    reference.cov_update_reference(*st_ref, x, y, 300, "bfloat16")
    st = _seeded_state(torch.Generator().manual_seed(1), 9, 5)
    affine_calls, cov_calls = _spy(monkeypatch, "affine_residual_reference"), _spy(monkeypatch, "cov_update_reference")
    assert not nbl_ext.reference_kernels_enabled()
    with nbl_ext.use_reference_kernels():
        assert nbl_ext.reference_kernels_enabled()
        assert not ops.has_compiled_kernel("affine_residual", "cpu")
        assert torch.equal(ops.affine_residual(h, w, b), want)
        ops.cov_update_(*st, x, y, 300, "bfloat16")
        assert all(torch.equal(a, r) for a, r in zip(st, st_ref))
        with nbl_ext.use_reference_kernels(False):  # nested: off inside, back on after
            assert torch.equal(ops.affine_residual(h, w, b), kernel)
        assert torch.equal(torch.ops.nbl.affine_residual(h, w, b), want)
    assert (len(affine_calls), len(cov_calls)) == (2, 1)
    assert not nbl_ext.reference_kernels_enabled() and ops.has_compiled_kernel("affine_residual", "cpu")
    assert torch.equal(ops.affine_residual(h, w, b), kernel)  # compiled kernel back
    assert len(affine_calls) == 2
    # A plain call switches until switched back.
    nbl_ext.use_reference_kernels(True)
    try:
        assert torch.equal(ops.affine_residual(h, w, b), want)
    finally:
        nbl_ext.use_reference_kernels(False)
    assert torch.equal(ops.affine_residual(h, w, b), kernel)
    with pytest.raises(TypeError, match="True or False"):
        nbl_ext.use_reference_kernels("yes")


@pytest.mark.skipif(not COMPILED, reason="nbl_ext._C not built")
def test_reference_switch_under_torch_compile_and_autograd(monkeypatch):
    h, w, b = _bf16_affine_args()
    want = reference.affine_residual_reference(h, w, b)
    kernel = ops.affine_residual(h, w, b)
    fn = torch.compile(ops.affine_residual, fullgraph=True)
    assert torch.equal(fn(h, w, b), kernel)
    calls = _spy(monkeypatch, "affine_residual_reference")
    with nbl_ext.use_reference_kernels():
        assert torch.equal(fn(h, w, b), want)  # the same compiled graph, now calling the reference
        assert len(calls) == 1
        hf, wf, bf = (t.float().requires_grad_() for t in (h, w, b))
        out = fn(hf, wf, bf)
        assert torch.equal(out, reference.affine_residual_reference(hf, wf, bf))
        out.square().sum().backward()
    assert len(calls) == 3  # compiled forward + the oracle above
    assert torch.equal(fn(h, w, b), kernel)
    # The gradients are the op's registered backward (same for every kernel): compare with plain autograd.
    hr, wr, br = (t.detach().float().requires_grad_() for t in (h, w, b))
    (hr + hr @ wr.T + br).square().sum().backward()
    assert torch.allclose(hf.grad, hr.grad, rtol=1e-5, atol=1e-4)
    assert torch.allclose(wf.grad, wr.grad, rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(not COMPILED, reason="nbl_ext._C not built")
def test_reference_switch_from_the_environment():
    """NBL_REFERENCE is read once, when nbl_ext is imported."""
    script = r"""
import json, torch, nbl_ext
from nbl_ext import ops, reference
gen = torch.Generator().manual_seed(7)
h = torch.randn(4, 33, 96, generator=gen).to(torch.bfloat16)
w = (torch.randn(96, 96, generator=gen) * 0.1).to(torch.bfloat16)
b = torch.randn(96, generator=gen).to(torch.bfloat16)
on = nbl_ext.reference_kernels_enabled()
same = torch.equal(ops.affine_residual(h, w, b), reference.affine_residual_reference(h, w, b))
nbl_ext.use_reference_kernels(False)
after = torch.equal(ops.affine_residual(h, w, b), reference.affine_residual_reference(h, w, b))
print(json.dumps({"on": on, "same": same, "compiled": ops.has_compiled_kernel("affine_residual", "cpu"),
                  "same_after_off": after}))
"""
    import os

    def run(value):
        env = {**os.environ, "NBL_REFERENCE": value}
        return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)

    res = json.loads(run("1").stdout.strip().splitlines()[-1])
    assert res == {"on": True, "same": True, "compiled": True, "same_after_off": False}
    bad = run("maybe")
    assert bad.returncode != 0 and "NBL_REFERENCE='maybe' is not understood" in bad.stderr
