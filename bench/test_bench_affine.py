"""The fused linearized-attention forward, ``nbl::affine_residual``: out = h + h W^T + b.

One test per case (device, model shape, rows, dtype). pytest-benchmark times the
compiled op; in the same test, interleaved with it (each round times these in pytest-benchmark's
untimed setup, then the kernel: a shared machine's drift hits all alike), it times

* ``reference``: ``nbl_ext.reference.affine_residual_reference`` (PyTorch's
  addmm + add, what the op would cost without the extension);
* ``gemm``: a bare ``torch.mm(h, W.T)`` of the same shape and dtype (cuBLAS /
  oneDNN / MKL): what the fused op's GEMM part cannot beat;
* ``attention`` (prefill rows only, the rows are a 2048-token prompt, batch 1):
  the attention branch the map replaces, ``h + self_attn(input_layernorm(h))``
  of the model shape's layer (random weights, SDPA), called with the arguments
  the model's own forward passes to that layer.

and records ``kernel_vs_reference`` (reference time / kernel time: >= 1 means
the kernel is not slower), ``kernel_vs_gemm`` (kernel / GEMM time),
``kernel_vs_attention`` (kernel / attention-branch time) and the floor: FLOPs
``2 n d^2``, bytes ``(d^2 + 2 n d + d) x sizeof`` against the same-run matmul
rate and copy bandwidth (``nbl_ext.benchmark.measure_ceilings``). Every timed
result is checked against a float64 evaluation first.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

import pytest
import torch

from nbl_ext import ops, reference
from nbl_ext.adapters import get_adapter
from nbl_ext.benchmark import SHAPES, measure_ceilings, random_model, time_call
from nbl_ext.engine import record_layer_call

HAS_CUDA = torch.cuda.is_available()
F32, BF16 = torch.float32, torch.bfloat16
PROMPT = 2048  # rows of the prefill cases: a 2048-token prompt, batch 1

# (shape, rows, dtype): decode-sized rows (1..16) and the 2048-token prefill.
CPU_CASES = [(s, n, dt) for s in ("smollm2-135m",) for dt in (F32, BF16) for n in (1, 2, 4, 16, 128, PROMPT)]
CUDA_CASES = [(s, n, BF16) for s in ("llama-3.1-8b",) for n in (1, 4, 8, 16, 64, PROMPT, 4 * PROMPT)]
TARGET_S = {"cpu": 1.0, "cuda": 0.5}  # per variant, per test


def _params() -> list:
    out = []
    for device, cases in (("cpu", CPU_CASES), ("cuda", CUDA_CASES)):
        marks = [pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")] if device == "cuda" else []
        for shape, n, dt in cases:
            tag = str(dt).removeprefix("torch.")
            out.append(pytest.param(device, shape, n, dt, marks=marks, id=f"{device}-{shape}-n{n}-{tag}"))
    return out


# --- helpers ---------------------------------------------------------------------------------
_CEILINGS: dict[tuple, dict[str, Any]] = {}
_LAYER: dict[tuple, Any] = {}


def _ceilings(device: str, dtype: torch.dtype) -> dict[str, Any]:
    key = (device, dtype)
    if key not in _CEILINGS:
        _CEILINGS[key] = measure_ceilings(device, dtype)
    return _CEILINGS[key]


def _attention_branch(shape: str, device: str, dtype: torch.dtype) -> tuple[Callable, torch.Tensor]:
    """(fn, h): fn() runs layer 0's attention branch with its residual on h (PROMPT tokens, batch 1)."""
    key = (shape, device, dtype)
    if key not in _LAYER:
        _LAYER.clear()
        model = random_model(shape, dtype=dtype, device=device, num_layers=1)
        ids = torch.randint(
            0, model.config.vocab_size, (1, PROMPT), device=device, generator=torch.Generator(device).manual_seed(0)
        )
        adapter = get_adapter(model)
        with torch.no_grad():
            args, kwargs = record_layer_call(model, adapter, ids, 0)
        layer = adapter.layers()[0]
        h = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw.update(past_key_values=None, use_cache=False)

        def branch() -> torch.Tensor:
            return h + layer.self_attn(hidden_states=layer.input_layernorm(h), **kw)[0]

        _LAYER[key] = (branch, h, model)
    fn, h, _ = _LAYER[key]
    return fn, h


def _check(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    """Max error over the float64 result, in units of the dtype's eps x |h| + |h W^T| + |b| bound."""
    h64, w64, b64 = h.double(), w.double(), b.double()
    exact = h64 + h64 @ w64.t() + b64
    mag = h64.abs() + h64.abs() @ w64.abs().t() + b64.abs()
    eps = torch.finfo(h.dtype).eps
    return ((out.double() - exact).abs() / (eps * mag + 1e-30)).max().item()


# --- the benchmark -------------------------------------------------------------------------------
@pytest.mark.parametrize("device,shape,n,dtype", _params())
def test_affine_residual(benchmark, device, shape, n, dtype):
    if not ops.has_compiled_kernel("affine_residual", device):
        pytest.skip(f"no compiled nbl::affine_residual kernel for {device}")
    benchmark.group = f"affine {device} {shape} {str(dtype).removeprefix('torch.')}"
    torch.manual_seed(0)
    d = SHAPES[shape]["hidden_size"]
    with torch.no_grad():
        attention = None
        if n % PROMPT == 0:
            attention, h_attn = _attention_branch(shape, device, dtype)
            h = h_attn.reshape(-1, d)
            h = h.repeat(n // PROMPT, 1) if n > PROMPT else h
        else:
            h = torch.randn(n, d, device=device).to(dtype)
        w = (torch.randn(d, d, device=device) * 0.02).to(dtype)
        b = (torch.randn(d, device=device) * 0.02).to(dtype)
        wt = w.t()

        variants: dict[str, Callable] = {
            "kernel": lambda: ops.affine_residual(h, w, b),
            "reference": lambda: reference.affine_residual_reference(h, w, b),
            "gemm": lambda: torch.mm(h, wt),
        }
        if attention is not None and n == PROMPT:
            variants["attention"] = attention

        err = _check(ops.affine_residual(h, w, b), h, w, b)
        assert err <= 4.0, f"nbl::affine_residual is off by {err:.2f} x eps x magnitude"

        def timer(fn: Callable) -> float:
            return time_call(device, fn)

        for fn in variants.values():  # warm-up (allocator, oneDNN primitive cache, cuBLAS handles)
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        est = max(timer(variants["kernel"]), 1e-6)
        rounds = max(5, min(200, int(TARGET_S[device] / est)))
        times: dict[str, list[float]] = {k: [] for k in variants}

        def others():  # pytest-benchmark's untimed setup of each round: the same-run comparisons
            for name, fn in variants.items():
                if name != "kernel":
                    times[name].append(timer(fn))

        def kernel():
            times["kernel"].append(timer(variants["kernel"]))

        # Interleaved: each round times the comparisons, then the kernel (pytest-benchmark's number).
        benchmark.pedantic(kernel, setup=others, rounds=rounds, warmup_rounds=1, iterations=1)

    if not times["reference"]:  # --benchmark-disable: the kernel ran once, without the per-round setup
        others()
        kernel()
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}  # [0]: warm-up round
    s = torch.empty((), dtype=dtype).element_size()
    flops = 2.0 * n * d * d
    bytes_moved = (d * d + 2 * n * d + d) * s
    ceil = _ceilings(device, dtype)
    floor_s = max(flops / ceil["matmul_flops_per_s"], bytes_moved / ceil["bandwidth_bytes_per_s"])
    info: dict[str, Any] = {
        "suite": "affine",
        "device": device,
        "shape": shape,
        "d": d,
        "rows": n,
        "dtype": str(dtype).removeprefix("torch."),
        "check_err_eps": err,
        **{f"{k}_median_s": v for k, v in med.items()},
        "median_s": med["kernel"],
        "kernel_vs_reference": med["reference"] / med["kernel"],
        "kernel_vs_gemm": med["kernel"] / med["gemm"],
        "flops": flops,
        "bytes": bytes_moved,
        "gflops": flops / med["kernel"] / 1e9,
        "achieved_bandwidth_bytes_per_s": bytes_moved / med["kernel"],
        "pct_of_bandwidth": 100.0 * bytes_moved / med["kernel"] / ceil["bandwidth_bytes_per_s"],
        "pct_of_matmul_rate": 100.0 * flops / med["kernel"] / ceil["matmul_flops_per_s"],
        "floor_s": floor_s,
        "pct_of_floor": 100.0 * floor_s / med["kernel"],
        "ceilings": ceil,
        "rounds": rounds,
        "loadavg_1m": os.getloadavg()[0],
    }
    if "attention" in med:
        info["kernel_vs_attention"] = med["kernel"] / med["attention"]
    benchmark.extra_info.update(info)
