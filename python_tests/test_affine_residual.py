"""nbl::affine_residual: out = h + h @ W.T + b.

Every kernel (the pure-PyTorch reference, the compiled CPU kernel through the
dispatcher and each of its code paths, the CUDA kernel when a GPU is present)
is compared with a float64 evaluation of the same inputs:
  * float32: max error <= 1e-5 of max |out|; float64: 1e-12;
  * bfloat16 / float16 (flash-attention's rule): max error at most 2x the max
    error of PyTorch's own ``F.linear(h, W, b) + h`` in that dtype, on the
    same inputs and device.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import nbl_ext
from nbl_ext import ops, reference
from nbl_ext._extension import _C

COMPILED = nbl_ext.extension_info()["compiled"]
HAS_CUDA = torch.cuda.is_available()
CUDA_KERNEL = HAS_CUDA and nbl_ext.extension_info()["cuda"]

LOW = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CPU_PATHS = ("auto", "blas", "gemv_portable", "gemv_avx2", "onednn")


def _id(x):
    return str(x).replace("torch.", "")


# --- data and oracles --------------------------------------------------------


def make_inputs(shape, dtype, device="cpu", seed=0, big_channels=False):
    """Random, never-zero h (with an offset), W ~ N(0, 1/d), b ~ N(0.1, 1)."""
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    h = torch.randn(shape, generator=g, dtype=torch.float64) + 0.25
    if big_channels and d > 0:
        # "Massive activations": a few channels in the hundreds to thousands.
        ch = torch.randperm(d, generator=g)[: max(1, d // 16)]
        h[..., ch] = h[..., ch] * 50.0 + 1000.0
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / max(d, 1) ** 0.5
    b = torch.randn(d, generator=g, dtype=torch.float64) + 0.1
    return tuple(t.to(dtype=dtype, device=device) for t in (h, w, b))


def exact(h, w, b):
    h64, w64, b64 = h.double(), w.double(), b.double()
    return h64 + h64 @ w64.T + b64


def natural(h, w, b):
    """PyTorch's own result in the inputs' dtype."""
    return F.linear(h, w, b) + h


def assert_accurate(out, h, w, b):
    """The module docstring's contract, for one output."""
    assert out.shape == h.shape and out.dtype == h.dtype and out.device == h.device
    if out.numel() == 0:
        return
    want = exact(h, w, b)
    err = (out.double() - want).abs().max().item()
    if h.dtype == torch.float32:
        assert err <= 1e-5 * want.abs().max().item(), err
    elif h.dtype == torch.float64:
        assert err <= 1e-12 * want.abs().max().item(), err
    else:
        err_pt = (natural(h, w, b).double() - want).abs().max().item()
        assert err <= 2 * err_pt, f"kernel error {err:.4g} > 2 x PyTorch's {err_pt:.4g}"


# --- implementations under test -------------------------------------------------


def _cpu_path(path):
    def run(h, w, b):
        return _C._affine_residual_cpu_path(h, w, b, path)

    return run


IMPLS = {
    "reference": reference.affine_residual_reference,
    "op": torch.ops.nbl.affine_residual,
    "wrapper": ops.affine_residual,
}
if COMPILED:
    IMPLS.update({f"cpu_{p}": _cpu_path(p) for p in CPU_PATHS})


def _impl_applies(name, dtype):
    # The GEMV paths of the CPU kernel take float32 / bfloat16 / float16.
    return not (name.startswith("cpu_gemv") and dtype == torch.float64)


#: (impl, dtype) pairs to test.
IMPL_DTYPES = pytest.mark.parametrize(
    "impl,dtype",
    [pytest.param(i, t, id=f"{i}-{_id(t)}") for i in IMPLS for t in DTYPES if _impl_applies(i, t)],
)


SHAPES = [(1,), (7,), (2, 33)]  # leading dims; d is appended


@IMPL_DTYPES
@pytest.mark.parametrize("d", [8, 64, 576])
@pytest.mark.parametrize("lead", SHAPES, ids=str)
def test_accuracy_vs_float64(impl, dtype, d, lead):
    h, w, b = make_inputs((*lead, d), dtype, seed=d + len(lead))
    out = IMPLS[impl](h, w, b)
    assert out.is_contiguous()
    assert_accurate(out, h, w, b)


@IMPL_DTYPES
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (40, 576), (3, 13)], ids=str)
def test_massive_activations(impl, dtype, shape):
    h, w, b = make_inputs(shape, dtype, seed=7, big_channels=True)
    assert h.abs().max() > 900
    assert_accurate(IMPLS[impl](h, w, b), h, w, b)


def _views(dtype, device="cpu"):
    """Non-contiguous h: transposed, strided slice, narrowed last dim, expanded."""
    g = torch.Generator().manual_seed(3)
    big = (torch.randn(24, 40, generator=g, dtype=torch.float64) + 0.3).to(dtype=dtype, device=device)
    return {
        "transposed": big.t()[:, :24],  # (40, 24) strides (1, 40)
        "row_step": big[::3, :],  # (8, 40)
        "col_narrow": big[:5, 3:19],  # (5, 16), row stride 40
        "col_step": big[:, ::2],  # (24, 20)
        "3d_permuted": big[:, :36].reshape(4, 6, 6, 6)[..., 0].permute(1, 0, 2),  # (6, 4, 6)
        "expanded": big[0, :12].expand(3, 12),  # stride 0 rows
        "offset_1d": big.flatten()[1:18],  # (17,), storage offset 1
    }


@IMPL_DTYPES
@pytest.mark.parametrize("view", list(_views(torch.float32)))
def test_non_contiguous_h(impl, dtype, view):
    h = _views(dtype)[view]
    _, w, b = make_inputs((h.shape[-1],), dtype, seed=11)
    before = h.clone()
    out = IMPLS[impl](h, w, b)
    assert out.is_contiguous()
    assert torch.equal(h, before)  # input untouched
    assert_accurate(out, h, w, b)
    # Same values as on a contiguous copy (BLAS may order a strided GEMM differently).
    eps = torch.finfo(dtype).eps
    scale = exact(h, w, b).abs().max().item()
    torch.testing.assert_close(out, IMPLS[impl](h.contiguous(), w, b), rtol=2 * eps, atol=2 * eps * scale)


@IMPL_DTYPES
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (3, 0), (0,)], ids=str)
def test_empty(impl, dtype, shape):
    h, w, b = make_inputs(shape, dtype)
    out = IMPLS[impl](h, w, b)
    assert out.shape == h.shape and out.dtype == dtype


@IMPL_DTYPES
@pytest.mark.parametrize("rows", [5, 40])  # GEMV and GEMM paths
def test_non_contiguous_weight_and_bias(impl, dtype, rows):
    h, w, b = make_inputs((rows, 24), dtype, seed=5)
    wt = w.t().contiguous().t()  # same values, column-major
    b2 = torch.stack([b, b], dim=1)[:, 0]  # stride 2
    out = IMPLS[impl](h, wt, b2)
    assert_accurate(out, h, w, b)
    eps = torch.finfo(dtype).eps
    scale = exact(h, w, b).abs().max().item()
    torch.testing.assert_close(out, IMPLS[impl](h, w, b), rtol=2 * eps, atol=2 * eps * scale)


def test_output_is_fresh():
    h, w, b = make_inputs((3, 8), torch.float32)
    for impl in IMPLS.values():
        out = impl(h, w, b)
        assert out.data_ptr() not in (h.data_ptr(), w.data_ptr(), b.data_ptr())


def test_one_dimensional_h():
    h, w, b = make_inputs((32,), torch.bfloat16, seed=2)
    for impl in IMPLS.values():
        out = impl(h, w, b)
        assert out.shape == (32,)
        assert_accurate(out, h, w, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_reference_is_pytorch_natural(dtype):
    """The reference is exactly F.linear(h, W, b) + h, for any leading shape."""
    h, w, b = make_inputs((2, 5, 24), dtype, seed=9)
    assert torch.equal(reference.affine_residual_reference(h, w, b), natural(h, w, b))


# --- compiled kernel vs reference, dispatch -------------------------------------


def test_dispatch_uses_compiled_cpu_kernel():
    assert ops.has_compiled_kernel("affine_residual", "cpu") == COMPILED


def test_works_without_compiled_extension(tmp_path):
    """No _C: the reference kernel serves the op (and its autograd) with PyTorch's numerics."""
    script = r"""
import json, sys, warnings
sys.modules["nbl_ext._C"] = None  # make `import nbl_ext._C` fail
warnings.simplefilter("ignore")
import torch, torch.nn.functional as F, nbl_ext
g = torch.Generator().manual_seed(0)
h = (torch.randn(2, 5, 24, generator=g) + 0.25).bfloat16().requires_grad_()
w = (torch.randn(24, 24, generator=g) / 5).bfloat16()
b = torch.randn(24, generator=g).bfloat16()
out = nbl_ext.ops.affine_residual(h, w, b)
out.float().sum().backward()
print(json.dumps({"compiled": nbl_ext.extension_info()["compiled"],
                  "cpu_kernel": nbl_ext.ops.has_compiled_kernel("affine_residual", "cpu"),
                  "equal": bool(torch.equal(out, F.linear(h, w, b) + h)),
                  "grad_ok": bool(torch.allclose(h.grad.float(), (1 + w.float().sum(0)).expand(2, 5, 24),
                                                 rtol=2e-2, atol=2e-2))}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {"compiled": False, "cpu_kernel": False, "equal": True, "grad_ok": True}


@pytest.mark.skipif(not COMPILED, reason="nbl_ext._C not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("rows", [1, 4, 16, 17, 100])
@pytest.mark.parametrize("d", [24, 576])
def test_compiled_matches_reference(dtype, rows, d):
    h, w, b = make_inputs((rows, d), dtype, seed=rows * d)
    got = torch.ops.nbl.affine_residual(h, w, b)
    want = reference.affine_residual_reference(h, w, b)
    scale = exact(h, w, b).abs().max().item()
    if dtype in LOW:
        # Both round to the dtype (the reference twice): a few units in the last place.
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got, want, rtol=2 * eps, atol=2 * eps * scale)
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


@pytest.mark.skipif(not COMPILED, reason="nbl_ext._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
def test_cpu_paths_agree(dtype):
    """The GEMV and BLAS paths round h + hW^T + b once: within an ulp of each other."""
    h, w, b = make_inputs((9, 100), dtype, seed=4)
    outs = {p: _C._affine_residual_cpu_path(h, w, b, p) for p in CPU_PATHS}
    scale = exact(h, w, b).abs().max().item()
    eps = torch.finfo(dtype).eps
    for p, out in outs.items():
        torch.testing.assert_close(out, outs["blas"], rtol=eps, atol=1e-5 * scale, msg=p)


@pytest.mark.skipif(not COMPILED, reason="nbl_ext._C not built")
def test_cpu_path_hook_rejects_unknown_path():
    h, w, b = make_inputs((2, 8), torch.float32)
    with pytest.raises(ValueError, match="unknown path"):
        _C._affine_residual_cpu_path(h, w, b, "fast")


# --- op registration: opcheck, torch.compile, autograd ---------------------------


def _opcheck_samples(device):
    samples = []
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for shape in [(3, 8), (2, 5, 8), (8,), (0, 8)]:
            samples.append(make_inputs(shape, dtype, device=device))
    for req in [(True, True, True), (True, False, False), (False, True, True)]:
        h, w, b = make_inputs((4, 6), torch.float64, device=device, seed=1)
        samples.append(tuple(t.requires_grad_(r) for t, r in zip((h, w, b), req)))
    return samples


@pytest.mark.parametrize("sample", range(len(_opcheck_samples("cpu"))))
def test_opcheck_cpu(sample):
    args = _opcheck_samples("cpu")[sample]
    torch.library.opcheck(torch.ops.nbl.affine_residual.default, args)


def test_torch_compile_fullgraph_matches_eager():
    def f(h, w, b):
        return ops.affine_residual(h, w, b).relu() * 0.5 + h

    compiled = torch.compile(f, fullgraph=True)
    for rows in (3, 5):  # the second call exercises the dynamic-shape path of the fake kernel
        h, w, b = make_inputs((2, rows, 16), torch.float32, seed=rows)
        torch.testing.assert_close(compiled(h, w, b), f(h, w, b), rtol=1e-6, atol=1e-6)


def test_torch_compile_rejects_bad_shapes_at_trace_time():
    compiled = torch.compile(ops.affine_residual, fullgraph=True)
    h, _, b = make_inputs((3, 8), torch.float32)
    with pytest.raises(Exception, match="weight must be square"):
        compiled(h, torch.randn(8, 9), b)


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5), (5,)], ids=str)
def test_gradcheck_float64(shape):
    h, w, b = (t.requires_grad_() for t in make_inputs(shape, torch.float64, seed=8))
    assert torch.autograd.gradcheck(ops.affine_residual, (h, w, b))
    assert torch.autograd.gradgradcheck(ops.affine_residual, (h, w, b))


def test_gradients_match_natural_expression():
    h, w, b = make_inputs((2, 7, 16), torch.float32, seed=12)
    g = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1))
    ins1 = [t.clone().requires_grad_() for t in (h, w, b)]
    ins2 = [t.clone().requires_grad_() for t in (h, w, b)]
    ops.affine_residual(*ins1).backward(g)
    natural(*ins2).backward(g)
    for a, c in zip(ins1, ins2):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-5, atol=1e-5)


def test_gradient_for_h_only_frozen_map():
    """The usual case: a frozen affine map inside a model that is differentiated."""
    h, w, b = make_inputs((4, 16), torch.float32, seed=13)
    h.requires_grad_()
    out = ops.affine_residual(h, w, b)
    assert out.requires_grad
    out.sum().backward()
    torch.testing.assert_close(h.grad, 1 + w.sum(0).expand(4, 16), rtol=1e-5, atol=1e-5)


def test_no_grad_output_has_no_graph():
    h, w, b = (t.requires_grad_() for t in make_inputs((2, 8), torch.float32))
    with torch.no_grad():
        out = ops.affine_residual(h, w, b)
    assert not out.requires_grad


# --- bad inputs -------------------------------------------------------------------

ERROR_IMPLS = {"op": torch.ops.nbl.affine_residual, "reference": reference.affine_residual_reference}


def _bad_cases():
    h = torch.randn(3, 8)
    w = torch.randn(8, 8)
    b = torch.randn(8)
    return {
        "weight_dtype": (
            (h, w.bfloat16(), b),
            r"one dtype; got h torch\.float32, weight torch\.bfloat16, bias "
            r"torch\.float32\. Cast the weight and bias to h's dtype",
        ),
        "bias_dtype": (
            (h.half(), w.half(), b),
            r"one dtype; got h torch\.float16, weight torch\.float16, bias "
            r"torch\.float32",
        ),
        "int_h": ((h.int(), w.int(), b.int()), r"h must be float32, bfloat16, float16 or float64; got torch\.int32"),
        "weight_not_square": (
            (h, torch.randn(8, 9), b),
            r"weight must be square \(d, d\) with d = h\.shape\[-1\] = 8; "
            r"got weight of shape \[8, 9\]",
        ),
        "weight_wrong_d": ((h, torch.randn(16, 16), b), r"d = h\.shape\[-1\] = 8; got weight of shape \[16, 16\]"),
        "weight_1d": ((h, torch.randn(64), b), r"weight must be square"),
        "weight_3d": ((h, torch.randn(1, 8, 8), b), r"weight must be square"),
        "bias_wrong_len": ((h, w, torch.randn(7)), r"bias must have shape \[d\] = \[8\]; got \[7\]"),
        "bias_2d": ((h, w, torch.randn(1, 8)), r"bias must have shape \[d\] = \[8\]; got \[1, 8\]"),
        "h_0d": ((torch.tensor(1.0), w, b), r"at least 1 dimension"),
        "device_meta_weight": (
            (h, w.to("meta"), b),
            r"must be on one device; got h on cpu, weight on meta, bias on "
            r"cpu\. Move the weight and bias to h's device",
        ),
    }


@pytest.mark.parametrize("impl", list(ERROR_IMPLS))
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs_raise_value_error(impl, case):
    args, pattern = _bad_cases()[case]
    with pytest.raises(ValueError, match=pattern):
        ERROR_IMPLS[impl](*args)


@pytest.mark.skipif(not COMPILED, reason="nbl_ext._C not built")
@pytest.mark.parametrize("case", [c for c in _bad_cases() if c != "device_meta_weight"])
def test_bad_inputs_compiled_cpu_kernel(case):
    """The C++ kernel (called directly, not through the fake kernel) raises the same errors."""
    args, pattern = _bad_cases()[case]
    with pytest.raises(ValueError, match=pattern):
        _C._affine_residual_cpu_path(*args, "auto")


# --- CUDA -------------------------------------------------------------------------


def cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


@pytest.fixture
def no_tf32():
    """float32 GEMMs in full float32 (PyTorch's default) for the 1e-5 bound."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 64, 333])  # GEMV up to 8 rows, cuBLAS + epilogue above
@pytest.mark.parametrize("d", [8, 13, 64, 576, 2048])  # 13: unaligned rows, scalar GEMV loads
def test_cuda_accuracy_vs_float64(dtype, rows, d, no_tf32):
    h, w, b = make_inputs((rows, d), dtype, device="cuda", seed=rows + d)
    assert_accurate(torch.ops.nbl.affine_residual(h, w, b), h, w, b)


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 33), (0,)], ids=str)
def test_cuda_shapes_and_massive_activations(dtype, lead, no_tf32):
    h, w, b = make_inputs((*lead, 576), dtype, device="cuda", seed=5, big_channels=True)
    assert_accurate(torch.ops.nbl.affine_residual(h, w, b), h, w, b)


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_cuda_non_contiguous_and_misaligned(dtype, no_tf32):
    for h in _views(dtype, "cuda").values():
        _, w, b = make_inputs((h.shape[-1],), dtype, device="cuda", seed=6)
        assert_accurate(torch.ops.nbl.affine_residual(h, w, b), h, w, b)
    # A contiguous h whose data starts one element past an aligned address.
    flat = torch.randn(4 * 64 + 1, device="cuda").to(dtype) + 0.25
    h = flat[1:].view(4, 64)
    _, w, b = make_inputs((64,), dtype, device="cuda", seed=7)
    assert_accurate(torch.ops.nbl.affine_residual(h, w, b), h, w, b)


@cuda
def test_cuda_kernel_is_registered():
    assert ops.has_compiled_kernel("affine_residual", "cuda") == CUDA_KERNEL


@cuda
@pytest.mark.parametrize("sample", range(len(_opcheck_samples("cpu"))))
def test_opcheck_cuda(sample):
    torch.library.opcheck(torch.ops.nbl.affine_residual.default, _opcheck_samples("cuda")[sample])


@cuda
def test_cuda_device_mismatch():
    h, w, b = make_inputs((3, 8), torch.float32)
    with pytest.raises(ValueError, match="must be on one device; got h on cpu, weight on cuda:0"):
        torch.ops.nbl.affine_residual(h, w.cuda(), b)
    with pytest.raises(ValueError, match="must be on one device"):
        torch.ops.nbl.affine_residual(h.cuda(), w.cuda(), b)


@cuda
def test_cuda_matches_cpu_kernel(no_tf32):
    h, w, b = make_inputs((3, 5, 64), torch.float32, seed=21)
    torch.testing.assert_close(
        torch.ops.nbl.affine_residual(h.cuda(), w.cuda(), b.cuda()).cpu(),
        torch.ops.nbl.affine_residual(h, w, b),
        rtol=1e-5,
        atol=1e-5,
    )


# --- CUDA kernel: every code path ---------------------------------------------------
# _C._affine_residual_cuda_path forces one path of the CUDA kernel (nbl_kernels.h):
#   gemv           hand-written GEMV, at most 8 rows (decode)
#   gemm_epilogue  at::mm into float32 + an elementwise epilogue kernel (the fallback)
#   cublaslt       one cuBLASLt matmul with the residual (beta * C) and bias epilogue;
#                  raises RuntimeError (instead of falling back) when cuBLASLt cannot
#                  take the problem: d not a multiple of 16 bytes, misaligned pointers
#   auto           what the op runs: gemv up to 8 rows, else cublaslt with the fallback

CUDA_PATHS = ("auto", "gemv", "gemm_epilogue", "cublaslt")
GEMV_MAX_ROWS = 8  # kCudaGemvMaxRows


def _rows(h):
    return 1 if h.dim() == 1 else h.numel() // max(h.shape[-1], 1)


def _cublaslt_takes(h, w, b):
    """What the cuBLASLt path needs (after the kernel's .contiguous() copies)."""
    d = h.shape[-1]
    if d % (16 // h.element_size()):
        return False
    hc = h if h.is_contiguous() else h.contiguous()
    return all(t.data_ptr() % 16 == 0 for t in (hc, w.contiguous(), b.contiguous()))


def run_cuda_path(path, h, w, b):
    """The forced path's output, or None where the path does not apply to h
    (gemv above 8 rows; cublaslt where cuBLASLt cannot run, checked to raise)."""
    if path == "gemv" and _rows(h) > GEMV_MAX_ROWS:
        with pytest.raises(ValueError, match="GEMV path takes at most 8 rows"):
            _C._affine_residual_cuda_path(h, w, b, path)
        return None
    if path == "cublaslt" and not _cublaslt_takes(h, w, b):
        with pytest.raises(RuntimeError, match="cuBLASLt path cannot run this problem"):
            _C._affine_residual_cuda_path(h, w, b, path)
        return None
    if path == "cublaslt" and h.dtype == torch.float64:
        # cuBLASLt may offer no algorithm with a bias epilogue for 64F compute (the op
        # then falls back, which auto covers); float64 is a checking dtype, not a model's.
        try:
            return _C._affine_residual_cuda_path(h, w, b, path)
        except RuntimeError as err:
            assert "found no algorithm" in str(err) or "NOT_SUPPORTED" in str(err), err
            return None
    return _C._affine_residual_cuda_path(h, w, b, path)


cuda_kernel = pytest.mark.skipif(not CUDA_KERNEL, reason="needs a CUDA GPU and nbl_ext._C built with CUDA")


@cuda
@cuda_kernel
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17, 64, 333, 2048])
@pytest.mark.parametrize("d", [8, 13, 24, 64, 100, 576, 2048])  # 13, 100: not multiples of 8
def test_cuda_paths_accuracy_vs_float64(path, dtype, rows, d, no_tf32):
    h, w, b = make_inputs((rows, d), dtype, device="cuda", seed=rows * 7 + d)
    out = run_cuda_path(path, h, w, b)
    if out is not None:
        assert out.is_contiguous()
        assert_accurate(out, h, w, b)


@cuda
@cuda_kernel
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(1, 576), (5, 64), (9, 64), (40, 576), (3, 13), (300, 13), (2, 33, 576)], ids=str)
def test_cuda_paths_massive_activations(path, dtype, shape, no_tf32):
    h, w, b = make_inputs(shape, dtype, device="cuda", seed=17, big_channels=True)
    assert h.abs().max() > 900
    out = run_cuda_path(path, h, w, b)
    if out is not None:
        assert_accurate(out, h, w, b)


@cuda
@cuda_kernel
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_cuda_paths_non_contiguous_1d_and_misaligned(path, dtype, no_tf32):
    cases = dict(_views(dtype, "cuda"))
    g = torch.Generator().manual_seed(23)
    big = (torch.randn(64, 96, generator=g, dtype=torch.float64) + 0.3).to(dtype=dtype, device="cuda")
    cases["transposed_prefill"] = big.t()[:, :64]  # (96, 64), strides (1, 96)
    cases["row_step_prefill"] = big[::2, :]  # (32, 96)
    cases["one_d"] = big[3]  # (96,)
    flat = (torch.randn(40 * 64 + 1, generator=g, dtype=torch.float64) + 0.25).to(dtype=dtype, device="cuda")
    cases["misaligned_prefill"] = flat[1:].view(40, 64)  # contiguous, data one element past alignment
    cases["misaligned_decode"] = flat[1 : 1 + 4 * 64].view(4, 64)
    for name, h in cases.items():
        _, w, b = make_inputs((h.shape[-1],), dtype, device="cuda", seed=6)
        before = h.clone()
        out = run_cuda_path(path, h, w, b)
        assert torch.equal(h, before), name
        if out is not None:
            assert out.shape == h.shape, name
            assert_accurate(out, h, w, b)


@cuda
@cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_cuda_misaligned_weight_and_bias_fall_back(dtype, no_tf32):
    """cuBLASLt needs 16-byte aligned operands: auto falls back, cublaslt says why."""
    h, w, b = make_inputs((40, 64), dtype, device="cuda", seed=31)
    wbuf = torch.empty(64 * 64 + 1, dtype=dtype, device="cuda")
    w_mis = wbuf[1:].view(64, 64)
    w_mis.copy_(w)
    bbuf = torch.empty(65, dtype=dtype, device="cuda")
    b_mis = bbuf[1:]
    b_mis.copy_(b)
    for args in ((h, w_mis, b), (h, w, b_mis)):
        assert_accurate(_C._affine_residual_cuda_path(*args, "auto"), *args)
        assert_accurate(torch.ops.nbl.affine_residual(*args), *args)
        with pytest.raises(RuntimeError, match="not 16-byte aligned"):
            _C._affine_residual_cuda_path(*args, "cublaslt")


@cuda
@cuda_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("rows", [3, 9, 500])
def test_cuda_paths_agree(dtype, rows, no_tf32):
    """Every path rounds h + hW^T + b once from float32 (float64) sums: within an ulp or so."""
    h, w, b = make_inputs((rows, 256), dtype, device="cuda", seed=rows)
    outs = {p: run_cuda_path(p, h, w, b) for p in CUDA_PATHS}
    outs = {p: o for p, o in outs.items() if o is not None}
    assert {"auto", "gemm_epilogue"} <= set(outs) and ("cublaslt" in outs or dtype == torch.float64)
    scale = exact(h, w, b).abs().max().item()
    eps = torch.finfo(dtype).eps
    # 16-bit: one rounding of nearly equal float32 sums; float32/64: summation order.
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2 * eps)
    for p, out in outs.items():
        torch.testing.assert_close(out, outs["gemm_epilogue"], rtol=tol, atol=tol * scale, msg=p)
    same = "gemv" if rows <= GEMV_MAX_ROWS else ("cublaslt" if "cublaslt" in outs else "gemm_epilogue")
    torch.testing.assert_close(outs["auto"], outs[same], rtol=tol, atol=tol * scale)


@cuda
@cuda_kernel
def test_cuda_cublaslt_follows_allow_tf32():
    """float32: TF32 tensor cores only when torch.backends.cuda.matmul.allow_tf32 is set, like at::mm."""
    h, w, b = make_inputs((512, 1024), torch.float32, device="cuda", seed=41)
    want = exact(h, w, b)
    scale = want.abs().max().item()
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        err_fp32 = (_C._affine_residual_cuda_path(h, w, b, "cublaslt").double() - want).abs().max().item()
        torch.backends.cuda.matmul.allow_tf32 = True
        err_tf32 = (_C._affine_residual_cuda_path(h, w, b, "cublaslt").double() - want).abs().max().item()
        err_mm_tf32 = (_C._affine_residual_cuda_path(h, w, b, "gemm_epilogue").double() - want).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert err_fp32 <= 1e-5 * scale
    assert err_tf32 <= 5e-3 * scale  # TF32: 10 mantissa bits
    # Both paths make the same choice: TF32 error in both, or (if the GPU has no TF32) in neither.
    assert (err_tf32 > 10 * err_fp32) == (err_mm_tf32 > 10 * err_fp32)


@cuda
@cuda_kernel
def test_cuda_path_hook_errors():
    h, w, b = make_inputs((2, 8), torch.float32, device="cuda")
    with pytest.raises(ValueError, match="unknown path"):
        _C._affine_residual_cuda_path(h, w, b, "fast")
    with pytest.raises(ValueError, match="CUDA kernel got a cpu tensor"):
        _C._affine_residual_cuda_path(h.cpu(), w.cpu(), b.cpu(), "auto")
    with pytest.raises(ValueError, match="must be on one device"):
        _C._affine_residual_cuda_path(h, w.cpu(), b, "cublaslt")


@pytest.mark.skipif(not COMPILED or nbl_ext.extension_info()["cuda"], reason="needs a CPU-only build of nbl_ext._C")
def test_cuda_path_hook_without_cuda_build():
    h, w, b = make_inputs((2, 8), torch.float32)
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        _C._affine_residual_cuda_path(h, w, b, "auto")
