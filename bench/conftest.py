"""pytest-benchmark configuration of the nbl-ext benchmarks (bench/).

* machine_info gets torch/CUDA/device, ``nbl_ext.extension_info()``, CPU counts and
  the git commit (pytest-benchmark's own ``commit_info`` is kept as is);
* ``gemm_rate``: same-run torch.mm rates, the attainable rate each result is set against;
* ``record_extra_info``: computes tokens/s, GFLOP/s, % of GEMM rate, ... into
  ``benchmark.extra_info``.

bench/ is only collected when asked for (``pytest bench``, ``bash bench/run.sh``),
so a bare ``pytest`` at the repository root does not start the benchmarks.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from nbl_ext.benchmark import time_call

BENCH_DIR = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if os.environ.get("NBL_BENCH") == "1":
        return None
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        p = (base / arg.split("::")[0]).resolve()
        if p == BENCH_DIR or BENCH_DIR in p.parents:
            return None
    return True if BENCH_DIR in Path(collection_path).resolve().parents else None


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    import nbl_ext
    from nbl_ext.benchmark.provenance import cuda_info, git_info

    git = git_info()

    info: dict[str, Any] = {
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "nbl_ext": nbl_ext.extension_info(),
        "nbl_ext_version": nbl_ext.__version__,
        "env": {
            k: os.environ.get(k)
            for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
            if k in os.environ
        },
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "git_commit": git["commit"],
        "git_dirty": bool(git["dirty"]),
    }
    if torch.cuda.is_available():
        cuda = cuda_info(0)
        info.update(
            {
                "cuda_device_name": cuda["name"],
                "cuda_capability": cuda["capability"],
                "cuda_total_memory_gib": round(cuda["total_memory_bytes"] / 2**30, 1),
                "cuda_sm_count": cuda["sm_count"],
                "cuda_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            }
        )
    machine_info["nbl"] = info


# --- same-run GEMM rates ----------------------------------------------------------
def _measure_gemm(d: int, k: int, dtype: torch.dtype, device: str) -> float:
    """GFLOP/s of torch.mm((d x k) @ (k x d)): median of repetitions timed by nbl_ext.benchmark.time_call
    (CUDA events on CUDA, perf_counter on CPU) after warm-up."""
    a = torch.randn(d, k, device=device).to(dtype)
    b = torch.randn(k, d, device=device).to(dtype)
    flops = 2.0 * d * k * d
    times: list[float] = []
    mm = lambda: torch.mm(a, b)  # noqa: E731
    if device == "cuda":
        for _ in range(3):
            mm()
        torch.cuda.synchronize()
        times = [time_call(device, mm) for _ in range(20)]
    else:
        mm()
        t_end = time.perf_counter() + 1.0
        while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 20):
            times.append(time_call(device, mm))
    return flops / statistics.median(times) / 1e9


@pytest.fixture(scope="session")
def gemm_rate():
    """``gemm_rate(d, dtype, device, tag=None)`` -> GFLOP/s of a (d x 2048) @ (2048 x d) torch.mm.

    Cached per session and ``tag`` (pass a case key to re-measure next to each case)."""
    cache: dict[tuple, float] = {}

    def get(d: int, dtype: torch.dtype, device: str, k: int = 2048, tag: Any = None) -> float:
        key = (d, k, dtype, device, tag)
        if key not in cache:
            cache[key] = _measure_gemm(d, k, dtype, device)
        return cache[key]

    return get


# --- extra_info ---------------------------------------------------------------------
def compute_extra_info(
    *,
    variant: str,
    device: str,
    d_x: int,
    d_y: int,
    n: int,
    dtype: torch.dtype,
    chunk: int,
    times_s: list[float],
    timer: str,
    gemm: dict[str, float],
    memory: dict[str, Any],
    check_rel_err: float | None,
) -> dict[str, Any]:
    """The numbers a benchmark reports (all rates from the median of ``times_s``)."""
    from workloads import gram_flops, input_bytes, state_bytes

    med = statistics.median(times_s)
    flops = gram_flops(n, d_x, d_y)
    gflops = flops / med / 1e9
    ref = gemm.get("float32")
    info: dict[str, Any] = {
        "variant": variant,
        "device": device,
        "d_x": d_x,
        "d_y": d_y,
        "tokens": n,
        "dtype": str(dtype).removeprefix("torch."),
        "chunk": chunk,
        "median_s": med,
        "min_s": min(times_s),
        "n_timed": len(times_s),
        "timer": timer,
        "tokens_per_s": n / med,
        "gram_flops": flops,
        "gflops": gflops,
        "flops_per_token": flops // n,
        "input_bytes_per_token": input_bytes(1, d_x, d_y, dtype),
        "state_bytes": state_bytes(d_x, d_y),
        "check_rel_err": check_rel_err,
    }
    for name, rate in gemm.items():
        info[f"gemm_{name}_gflops"] = rate
    if ref:
        info["pct_of_gemm_fp32"] = 100.0 * gflops / ref
        info["floor_s_fp32"] = flops / (ref * 1e9)
    info.update(memory)
    return info


@pytest.fixture
def record_extra_info(benchmark):
    """``record_extra_info(**kw)``: compute_extra_info(**kw) merged into benchmark.extra_info."""

    def record(**kw: Any) -> dict[str, Any]:
        benchmark.extra_info.update(compute_extra_info(**kw))
        return benchmark.extra_info

    return record
