"""Calibration cost: nbl_ext.calibrate (streaming statistics) vs the reference code's store-all approach.

Each benchmark runs one method at one token count in a **fresh process**
(``python bench/workloads.py calib ...``: load the model, then
``nbl_ext.benchmark.time_calibration``, which warms up with one short forward), so that its peak host RSS
is its own and not the leftovers of an earlier case. It records the total time,
the phases (forward passes + spill I/O, statistics, scoring/fit), tokens/s,
peak host RSS growth and peak CUDA memory, and the floor (forward FLOPs at the
same-run matmul rate + Gram FLOPs at the same-run float32 rate, or bytes over
bandwidth; ``nbl_ext.benchmark.calibration_cost``). The pytest-benchmark stats
(one round) are the wall time of the whole subprocess; the numbers are in
extra_info. Cases are method-major within a token count: streaming runs right
before store_all at the same tokens, and ``summarize.py`` sets each against it.

Guards (a wrong result gets no number): every layer calibrated on every token
with finite scores, and store_all's per-layer CCA bounds, NMSE and cosines
equal streaming's of the same case (same model, same tokens) within
tolerance: the same statistics computed two ways.

CPU: SmolLM2-135M real weights (the bundled package), float32, 512-token
samples. CUDA (skipped without a GPU): the Llama-3.1-8B shape with random
weights in bfloat16, 2048-token samples: streaming at 256 x 2048 (the paper's
calibration set; target under 3 minutes on one H100/H200) and at fewer tokens
to show its flat memory; store_all where its activations fit in host memory
(skipped beyond, with the estimate; it grows linearly, so the larger counts
are an extrapolation from the measured ones).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nbl_ext import benchmark as nb
from nbl_ext.benchmark.timing import available_host_bytes

HAS_CUDA = torch.cuda.is_available()
WORKLOADS = Path(__file__).resolve().parent / "workloads.py"
REPO = WORKLOADS.parent.parent

# (device, model, weights, dtype, seq_len, sample counts, methods)
CASES = [
    # CPU sized for 2 shared cores (~25 tokens/s through the layer-by-layer forward at load 8): ~20 min
    ("cpu", "smollm2-135m", "real", "float32", 512, (4, 8, 16), ("streaming", "store_all")),
    ("cuda", "llama-3.1-8b", "random", "bfloat16", 2048, (8, 32), ("streaming", "store_all")),
    ("cuda", "llama-3.1-8b", "random", "bfloat16", 2048, (64, 256), ("streaming",)),
]
#: store_all vs streaming: relative tolerance of the per-layer bounds/NMSE, absolute of the cosines. The two
#: compute the same float64 statistics (float32 Gram blocks of centered chunks vs float64 torch.cov).
BOUND_RTOL, COSINE_ATOL = 1e-3, 1e-6
TIMEOUT_S = {"cpu": 1800, "cuda": 1200}
#: The issue's GPU target: all 32 layers of the 8B shape on 256 x 2048 tokens in under 3 minutes (recorded, not
#: asserted: a slow run is a finding, not a wrong result).
TARGET = {("cuda", "llama-3.1-8b", 256 * 2048, "streaming"): 180.0}


def _params() -> list:
    out = []
    for device, model, weights, dtype, seq_len, counts, methods in CASES:
        marks = [pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")] if device == "cuda" else []
        for n in counts:
            for m in methods:
                out.append(
                    pytest.param(
                        device,
                        model,
                        weights,
                        dtype,
                        seq_len,
                        n,
                        m,
                        marks=marks,
                        id=f"{device}-{model}-{n}x{seq_len}-{dtype}-{m}",
                    )
                )
    return out


@pytest.fixture(scope="session")
def calib_ceilings():
    """Same-run matmul rate (model dtype), float32 Gram rate and bandwidth per (device, dtype)."""
    cache: dict[tuple[str, str], dict[str, Any]] = {}

    def get(device: str, dtype: str) -> dict[str, Any]:
        if (device, dtype) not in cache:
            cache[(device, dtype)] = nb.calibration_ceilings(device, dtype)
        return cache[(device, dtype)]

    return get


def _store_all_fits(model: str, dtype: str, samples: int, seq_len: int) -> tuple[bool, str]:
    """store_all keeps layers x 2 x tokens x d elements on the host; compare with what is available."""
    sh = nb.Shape.of(model)
    s = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    need = nb.calibration_cost(sh, num_samples=samples, seq_len=seq_len, dtype=dtype)["stored_activation_bytes"]
    avail = available_host_bytes()
    msg = (
        f"store_all needs ~{need / 2**30:.1f} GiB of host memory ({sh.layers} layers x 2 x {samples * seq_len} "
        f"tokens x {sh.hidden} x {s} B) of {'?' if avail is None else f'{avail / 2**30:.1f}'} GiB available; "
        "it grows linearly with the tokens (extrapolate from the smaller counts)"
    )
    return avail is None or need < 0.8 * avail, msg


def _probe(
    device: str, model: str, weights: str, dtype: str, seq_len: int, samples: int, method: str, ceilings: dict[str, Any]
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(WORKLOADS),
        "calib",
        "--model",
        model,
        "--weights",
        weights,
        "--device",
        device,
        "--dtype",
        dtype,
        "--method",
        method,
        "--samples",
        str(samples),
        "--seq-len",
        str(seq_len),
        "--ceilings",
        json.dumps(ceilings),
    ]
    # Fixed glibc mmap threshold: freed buffers go back to the OS, RSS follows live memory (as the accumulator
    # suite's memory probes do).
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S[device])
    if out.returncode != 0 and "is not installed" in out.stderr and weights == "real":
        pytest.skip(f"{model}: bundled model package missing ({out.stderr.strip().splitlines()[-1]})")
    assert out.returncode == 0, f"calibration probe failed: {' '.join(cmd)}\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


_STREAMING: dict[tuple, dict[str, Any]] = {}


@pytest.mark.parametrize("device,model_name,weights,dtype,seq_len,samples,method", _params())
def test_calibration(benchmark, calib_ceilings, device, model_name, weights, dtype, seq_len, samples, method):
    benchmark.group = f"calibration {device} {model_name} {dtype} {samples}x{seq_len}"
    if method == "store_all":
        ok, why = _store_all_fits(model_name, dtype, samples, seq_len)
        if not ok:
            pytest.skip(f"does not fit: {why}")
    ceil = calib_ceilings(device, dtype)
    out: dict[str, Any] = {}

    def target():
        out.update(_probe(device, model_name, weights, dtype, seq_len, samples, method, ceil))

    try:
        benchmark.pedantic(target, rounds=1, iterations=1, warmup_rounds=0)
        n_layers = nb.Shape.of(model_name).layers
        # Guards: every layer, every token, finite scores; store_all == streaming on the same case
        assert out["tokens"] == samples * seq_len and out["num_layers"] == n_layers, out
        assert len(out["bounds"]) == n_layers and all(math.isfinite(b) for b in out["bounds"] + out["nmse"])
        case = (device, model_name, dtype, seq_len, samples)
        if method == "streaming":
            _STREAMING[case] = out
        elif case in _STREAMING:
            ref = _STREAMING[case]
            for key in ("bounds", "nmse"):
                for i, (a, b) in enumerate(zip(out[key], ref[key])):
                    assert abs(a - b) <= BOUND_RTOL * max(abs(b), 1e-3), (
                        f"store_all {key}[{i}] = {a} but streaming gives {b} on the same tokens"
                    )
            for i, (a, b) in enumerate(zip(out["cosines"], ref["cosines"])):
                assert abs(a - b) <= COSINE_ATOL, f"store_all cosine[{i}] = {a}, streaming {b}"
            out["vs_streaming"] = {
                "time_ratio": out["total_s"] / ref["total_s"],
                "peak_host_ratio": out["peak_host_bytes"] / ref["peak_host_bytes"]
                if out["peak_host_bytes"] and ref["peak_host_bytes"]
                else None,
                "peak_cuda_ratio": out["peak_cuda_bytes"] / ref["peak_cuda_bytes"]
                if out["peak_cuda_bytes"] and ref["peak_cuda_bytes"]
                else None,
                "max_bound_rel_diff": max(abs(a - b) / max(abs(b), 1e-3) for a, b in zip(out["bounds"], ref["bounds"])),
            }
        benchmark.extra_info.update(
            {
                "suite": "calibration",
                "model": model_name,
                "weights": weights,
                **out,
                "floor_s": out["floor"]["floor_s"],
                "floor_bound": out["floor"]["bound"],
                "target_s": TARGET.get((device, model_name, samples * seq_len, method)),
                "meets_target": (out["total_s"] < TARGET[(device, model_name, samples * seq_len, method)])
                if (device, model_name, samples * seq_len, method) in TARGET
                else None,
                "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            }
        )
    except BaseException:
        benchmark.has_error = True  # pytest-benchmark then leaves it out of the JSON
        raise
