"""Streaming covariance accumulator: compiled op vs PyTorch reference vs store-all.

Variants: compiled (float32 Gram products), compiled_bf16 (the same op with
precision="bfloat16": its accuracy cost is its check_rel_err, its speed on CUDA
is set against the same-run bfloat16 GEMM rate), reference, store_all.

Each test times one variant on one case (device, d = dim_x = dim_y, tokens,
dtype), checks its result against a float64 oracle (so a broken kernel cannot
report a fast number), measures its peak memory, and records throughput
against the same-run GEMM rate in ``benchmark.extra_info``. See bench/README.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import nbl_ext
from nbl_ext import ops
from nbl_ext.benchmark import time_call
from workloads import CHUNK, RUNNERS, VARIANTS, check, gram_flops, iter_chunks, make_oracle

HAS_CUDA = torch.cuda.is_available()
WORKLOADS = Path(__file__).resolve().parent / "workloads.py"
REPO = WORKLOADS.parent.parent
F32, BF16 = torch.float32, torch.bfloat16

# (d, tokens, dtype). CPU is trimmed so the whole suite stays under ~10 min on 2 cores.
CPU_CASES = [
    (576, 1024, F32),
    (576, 4096, F32),
    (576, 16384, F32),
    (2048, 1024, F32),
    (2048, 4096, F32),
    (2048, 16384, F32),
    (4096, 1024, F32),
    (4096, 4096, F32),
    (2048, 4096, BF16),
]
CUDA_CASES = [
    *[(d, n, F32) for d in (576, 2048, 4096) for n in (1024, 4096, 16384, 65536)],
    (2048, 16384, BF16),
    (4096, 16384, BF16),
]
#: Target timed seconds per test (rounds = target / estimated round time, clamped).
TARGET_S = {"cpu": 2.0, "cuda": 1.0}
ROUNDS = {"cpu": (3, 15), "cuda": (5, 50)}


def _params() -> list:
    out = []
    for device, cases in (("cpu", CPU_CASES), ("cuda", CUDA_CASES)):
        marks = [pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")] if device == "cuda" else []
        for d, n, dt in cases:
            for v in VARIANTS:
                tag = str(dt).removeprefix("torch.")
                out.append(pytest.param(device, d, n, dt, v, marks=marks, id=f"{device}-d{d}-n{n}-{tag}-{v}"))
    return out


# --- data, cached for the variants of one case (params are case-major) ---------------
_CASE: dict[str, Any] = {}


def _case_data(device: str, d: int, n: int, dtype: torch.dtype):
    key = (device, d, n, dtype)
    if _CASE.get("key") != key:
        _CASE.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        chunks = list(iter_chunks(d, n, dtype, device=device))
        _CASE.update(key=key, chunks=chunks, oracle=make_oracle(chunks))
    return _CASE["chunks"], _CASE["oracle"]


# --- peak memory --------------------------------------------------------------------
_BASELINE: dict[tuple, int] = {}
_PEAK_SOURCE: set[str] = set()


def _probe_cpu(variant: str, d: int, n: int, dtype: torch.dtype) -> int:
    cmd = [
        sys.executable,
        str(WORKLOADS),
        "mem",
        "--variant",
        variant,
        "--d",
        str(d),
        "--n",
        str(n),
        "--dtype",
        str(dtype).removeprefix("torch."),
        "--chunk",
        str(CHUNK),
    ]
    # A fixed glibc mmap threshold: buffers >= 64 KiB are mmapped and go back to the OS
    # when freed, so RSS tracks live memory instead of heap retention/fragmentation
    # (with glibc's dynamic threshold the streaming peaks wobbled by ~40 MB).
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"memory probe failed: {' '.join(cmd)}\n{out.stderr[-4000:]}"
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    _PEAK_SOURCE.add(rec["peak_source"] + ("" if rec["peak_reset"] else ", peak not reset after imports"))
    return int(rec["maxrss_bytes"])


def _peak_cuda(variant: str, d: int, n: int, dtype: torch.dtype) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    chunks = iter_chunks(d, n, dtype, device="cuda")
    if variant == "baseline":
        for x, y in chunks:
            del x, y
    else:
        res = RUNNERS[variant](chunks, d, d, device="cuda")
        del res
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_memory(device: str, variant: str, d: int, n: int, dtype: torch.dtype) -> dict[str, Any]:
    """Peak memory of one variant over generating the data chunk by chunk, minus the baseline.

    CPU: peak RSS of a fresh process running the variant, minus that of a fresh
    process that only imports torch + nbl_ext and generates the chunks.
    CUDA: torch.cuda.max_memory_allocated over the same, in process.
    """
    probe = _probe_cpu if device == "cpu" else _peak_cuda
    key = (device, d, n, dtype)
    if key not in _BASELINE:
        _BASELINE[key] = probe("baseline", d, n, dtype)
    raw = probe(variant, d, n, dtype)
    base = _BASELINE[key]
    return {
        "peak_mem_mb": (raw - base) / 2**20,
        "peak_mem_raw_mb": raw / 2**20,
        "peak_mem_baseline_mb": base / 2**20,
        "peak_mem_method": f"peak RSS ({'; '.join(sorted(_PEAK_SOURCE))}, MALLOC_MMAP_THRESHOLD_=65536) "
        "of a fresh process - baseline"
        if device == "cpu"
        else "cuda.max_memory_allocated - baseline",
    }


# --- the benchmark ----------------------------------------------------------------------
@pytest.mark.parametrize("device,d,n,dtype,variant", _params())
def test_accumulator(benchmark, record_extra_info, gemm_rate, device, d, n, dtype, variant):
    if variant.startswith("compiled") and not ops.has_compiled_kernel("cov_update_", device):
        pytest.skip(f"no compiled nbl::cov_update_ kernel for {device} (extension_info: {nbl_ext.extension_info()})")
    benchmark.group = f"{device} d={d} n={n} {str(dtype).removeprefix('torch.')}"
    chunks, oracle = _case_data(device, d, n, dtype)
    run = RUNNERS[variant]

    # Same-run GEMM rates, re-measured per case (next to its three variants: shared
    # machines drift). CPU: float64 too (store_all's arithmetic); CUDA: bfloat16 too.
    case = (device, d, n, dtype)
    gemm = {"float32": gemm_rate(d, torch.float32, device, tag=case)}
    other = torch.bfloat16 if device == "cuda" else torch.float64
    gemm[str(other).removeprefix("torch.")] = gemm_rate(d, other, device, tag=case)

    # Rounds from the GEMM-rate estimate of one round (store_all: float64, (2d)^2 Gram).
    est = gram_flops(n, d, d) / (gemm["float32"] * 1e9)
    if variant == "store_all":
        est *= (4 / 3) * gemm["float32"] / gemm.get("float64", gemm["float32"])
    lo, hi = ROUNDS[device]
    rounds = max(lo, min(hi, int(TARGET_S[device] / max(est, 1e-6))))
    warmup = 1 if (device == "cuda" or est < 0.5) else 0

    times: list[float] = []

    def target():
        if device == "cuda":
            torch.cuda.synchronize()
        out = []
        times.append(time_call(device, lambda: out.append(run(chunks, d, d, device=device))))
        return out[0]

    result = benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup, iterations=1)
    try:
        rel = check(result, oracle, variant)  # a wrong answer never gets a number
        del result
        timed = times[warmup:] if len(times) > warmup else times
        mem = measure_memory(device, variant, d, n, dtype)
        mem["loadavg_1m"] = os.getloadavg()[0]  # >> core count: the numbers are contended
        record_extra_info(
            variant=variant,
            device=device,
            d_x=d,
            d_y=d,
            n=n,
            dtype=dtype,
            chunk=CHUNK,
            times_s=timed,
            timer="cuda_events" if device == "cuda" else "perf_counter",
            gemm=gemm,
            memory=mem,
            check_rel_err=rel,
        )
        if variant == "compiled_bf16" and "bfloat16" in gemm:
            # Its attainable rate is the bf16 GEMM's (CUDA: tensor cores), measured in this run.
            flops = gram_flops(n, d, d)
            benchmark.extra_info.update(
                pct_of_gemm_bf16=100.0 * flops / statistics.median(timed) / 1e9 / gemm["bfloat16"],
                floor_s_bf16=flops / (gemm["bfloat16"] * 1e9),
            )
    except BaseException:
        benchmark.has_error = True  # pytest-benchmark then leaves it out of the JSON
        raise
