"""Workloads of the accumulator benchmarks: data, the three variants, the oracle.

Shared by ``test_bench_accumulator.py`` (timing, in process) and by the
peak-memory probe, which runs this file as a script in a fresh process::

    MALLOC_MMAP_THRESHOLD_=65536 python bench/workloads.py mem --variant compiled --d 2048 --n 4096

and prints one JSON line with the process's peak RSS (VmHWM, see
``_peak_rss_bytes``; measured from a high-water mark reset after imports and
warm-up where Linux allows). In the probe the data is
generated chunk by chunk, so the streaming variants never hold more than one
chunk of input while ``store_all`` necessarily keeps all of them;
``--variant baseline`` only generates the chunks (the subtracted baseline).

The calibration-cost benchmark (``test_bench_calibration.py``) uses the same
fresh-process method for whole calibrations::

    python bench/workloads.py calib --model smollm2-135m --weights real --method store_all --samples 16 --seq-len 512

(load the model, ``nbl_ext.benchmark.time_calibration`` with its warm-up; one JSON line).

Variants (all consume the same chunks and return float64
``(mean_x, mean_y, cov_xx, cov_yx, cov_yy)``, unbiased covariances):
  * ``compiled``:  ``nbl_ext.CovarianceAccumulator.update`` per chunk (the
    ``nbl::cov_update_`` op; the C++/CUDA kernel when one is registered);
  * ``reference``: ``nbl_ext.reference.cov_update_reference`` called directly
    on float64 state tensors, chunk by chunk, as the accumulator does;
  * ``store_all``: the original NBL recipe: keep every chunk in a list,
    ``torch.cat`` at the end, cast to float64 and ``torch.cov`` of ``[X | Y]``.
    float64 (not float32) so that its numerics match the float64 statistics
    of the other two variants; it computes the full (dx+dy)^2 covariance,
    i.e. also the redundant x-y block.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch

from nbl_ext.benchmark.report import ACCUMULATOR_VARIANTS
from nbl_ext.benchmark.timing import proc_status, reset_peak_rss

#: compiled_bf16: the compiled op with precision="bfloat16" (bf16 Gram products, float32
#: accumulation; see nbl_ext.stats.CovarianceAccumulator); its check tolerance is wider.
VARIANTS = ACCUMULATOR_VARIANTS  # ("compiled", "compiled_bf16", "reference", "store_all"), one order everywhere
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
#: Tokens per update() call of the streaming variants (one row block of the kernel).
CHUNK = 2048
SEED = 1234
#: "Massive activation" channels: a handful per layer with |mean| ~ 1e3 and O(1) spread
#: (Sun et al., 2024); the rest is N(0, 1).
N_MASSIVE = 4
MASSIVE_MEAN = 1.0e3
#: Guard tolerance: relative Frobenius error of cov @ probes against the float64 oracle.
#: Gram blocks are float32 (<= 2048-row sums), so ~1e-6 is expected; 1e-4 is "float32-grade".
CHECK_RTOL = 1.0e-4
#: Per-variant tolerances where the variant is less precise by design: compiled_bf16 rounds
#: the centered values to bfloat16 (2**-9 relative per value); measured 0.45e-3..2.1e-3 on
#: this data and metric (bench/README.md), held to the documented bound
#: nbl_ext.stats.BF16_REL_ERR_BOUND = 4e-3 (2**-8).
CHECK_RTOL_BY_VARIANT = {"compiled_bf16": 4.0e-3}


class Moments(NamedTuple):
    mean_x: torch.Tensor
    mean_y: torch.Tensor
    cov_xx: torch.Tensor
    cov_yx: torch.Tensor
    cov_yy: torch.Tensor


# --- data ---------------------------------------------------------------------
def massive_channels(d: int) -> list[int]:
    return sorted({(k * d) // N_MASSIVE + 7 for k in range(N_MASSIVE)})


def make_chunk(
    d: int, rows: int, dtype: torch.dtype, index: int, *, seed: int = SEED, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic LLM-like (x, y) chunk: x = residual stream, y = x + block output.

    Chunk ``index`` is the same tensor whichever process or order generates it.
    """
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    x = torch.randn(rows, d, generator=g, device=device)
    mc = massive_channels(d)
    signs = torch.tensor([(-1.0) ** k for k in range(len(mc))], device=device)
    x[:, mc] += MASSIVE_MEAN * signs
    y = x + 0.5 * torch.randn(rows, d, generator=g, device=device)
    return x.to(dtype), y.to(dtype)


def iter_chunks(
    d: int, n: int, dtype: torch.dtype, *, chunk: int = CHUNK, seed: int = SEED, device: str | torch.device = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Chunks of ``chunk`` tokens (the last one shorter) totalling n tokens, generated lazily."""
    for i, r0 in enumerate(range(0, n, chunk)):
        yield make_chunk(d, min(chunk, n - r0), dtype, i, seed=seed, device=device)


# --- the three variants -------------------------------------------------------
def run_compiled(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    d_x: int,
    d_y: int,
    device: str | torch.device = "cpu",
    precision: str = "float32",
) -> Moments:
    import nbl_ext

    acc = nbl_ext.CovarianceAccumulator(d_x, d_y, device=device, precision=precision)
    for x, y in chunks:
        acc.update(x, y)
    return Moments(acc.mean_x, acc.mean_y, acc.cov_xx, acc.cov_yx, acc.cov_yy)


def run_reference(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], d_x: int, d_y: int, device: str | torch.device = "cpu"
) -> Moments:
    from nbl_ext.reference import cov_update_reference

    kw = dict(dtype=torch.float64, device=device)
    mean_x, mean_y = torch.zeros(d_x, **kw), torch.zeros(d_y, **kw)
    m_xx, m_yx, m_yy = torch.zeros(d_x, d_x, **kw), torch.zeros(d_y, d_x, **kw), torch.zeros(d_y, d_y, **kw)
    count = 0
    for x, y in chunks:
        cov_update_reference(mean_x, mean_y, m_xx, m_yx, m_yy, x, y, count)
        count += x.shape[0]
    return Moments(mean_x, mean_y, m_xx / (count - 1), m_yx / (count - 1), m_yy / (count - 1))


def run_store_all(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], d_x: int, d_y: int, device: str | torch.device = "cpu"
) -> Moments:
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for x, y in chunks:  # what an activation hook does: keep everything
        xs.append(x)
        ys.append(y)
    p = torch.cat([torch.cat(xs), torch.cat(ys)], dim=1).to(torch.float64)  # (n, dx + dy)
    del xs, ys
    c = torch.cov(p.T)  # (dx + dy, dx + dy), unbiased
    mean = p.mean(dim=0)
    return Moments(mean[:d_x], mean[d_x:], c[:d_x, :d_x], c[d_x:, :d_x], c[d_x:, d_x:])


RUNNERS: dict[str, Callable[..., Moments]] = {
    "compiled": run_compiled,
    "compiled_bf16": lambda chunks, d_x, d_y, device="cpu": run_compiled(chunks, d_x, d_y, device, "bfloat16"),
    "reference": run_reference,
    "store_all": run_store_all,
}


# --- cost model ---------------------------------------------------------------
def gram_flops(n: int, d_x: int, d_y: int) -> int:
    """Useful FLOPs of the three Gram products (xx, yx, yy): 2 n (dx^2 + dy dx + dy^2)."""
    return 2 * n * (d_x * d_x + d_y * d_x + d_y * d_y)


def input_bytes(n: int, d_x: int, d_y: int, dtype: torch.dtype) -> int:
    return n * (d_x + d_y) * torch.empty((), dtype=dtype).element_size()


def state_bytes(d_x: int, d_y: int) -> int:
    """float64 co-moments (the means are negligible)."""
    return 8 * (d_x * d_x + d_x * d_y + d_y * d_y)


# --- correctness guard --------------------------------------------------------
class Oracle(NamedTuple):
    mean: torch.Tensor  # (dx + dy,) float64
    probes: torch.Tensor  # (dx + dy, k) float64
    cov_probes: torch.Tensor  # cov([X | Y]) @ probes, float64, two-pass


def make_oracle(chunks: list[tuple[torch.Tensor, torch.Tensor]], k: int = 4) -> Oracle:
    """Two-pass float64 cov([X|Y]) @ V for k random probe vectors V (cost O(n (dx+dy) k)).

    A Freivalds-style check: any wrong block or row of a variant's covariance
    shows in cov @ V with probability ~1, for a fraction of a full covariance's cost.
    """
    dev = chunks[0][0].device
    d = chunks[0][0].shape[1] + chunks[0][1].shape[1]
    n = sum(x.shape[0] for x, _ in chunks)
    total = torch.zeros(d, dtype=torch.float64, device=dev)
    for x, y in chunks:
        total += torch.cat([x, y], dim=1).sum(dim=0, dtype=torch.float64)
    mean = total / n
    g = torch.Generator(device=dev).manual_seed(SEED + 17)
    v = torch.randn(d, k, generator=g, device=dev, dtype=torch.float64)
    acc = torch.zeros(d, k, dtype=torch.float64, device=dev)
    for x, y in chunks:
        pc = torch.cat([x, y], dim=1).to(torch.float64) - mean
        acc += pc.T @ (pc @ v)
    return Oracle(mean, v, acc / (n - 1))


def check(result: Moments, oracle: Oracle, variant: str) -> float:
    """Raise AssertionError unless ``result`` matches the oracle; return the relative error."""
    d_x = result.mean_x.shape[0]
    vx, vy = oracle.probes[:d_x], oracle.probes[d_x:]
    cxx, cyx, cyy = (t.to(torch.float64) for t in (result.cov_xx, result.cov_yx, result.cov_yy))
    got = torch.cat([cxx @ vx + cyx.T @ vy, cyx @ vx + cyy @ vy])
    rel = float(torch.linalg.norm(got - oracle.cov_probes) / torch.linalg.norm(oracle.cov_probes))
    mean = torch.cat([result.mean_x, result.mean_y]).to(torch.float64)
    mean_err = float((mean - oracle.mean).abs().max() / oracle.mean.abs().max().clamp_min(1.0))
    rtol = CHECK_RTOL_BY_VARIANT.get(variant, CHECK_RTOL)
    ok = math.isfinite(rel) and rel <= rtol and mean_err <= 1e-9
    assert ok, (
        f"{variant}: covariance does not match the float64 oracle: relative error of cov @ probes "
        f"{rel:.3e} (tolerance {rtol:.0e}), relative mean error {mean_err:.3e}"
    )
    return rel


# --- peak-memory probe (run in a fresh process) ------------------------------
def _peak_rss_bytes() -> tuple[int, str]:
    """Peak RSS of this process: VmHWM (Linux), else ru_maxrss.

    Not ru_maxrss on Linux: a child started by fork/vfork + exec inherits in
    ru_maxrss the high-water mark of the parent's memory at exec time (the
    pytest process, holding the benchmark data), so every probe would read
    the same number. VmHWM belongs to this process's own address space.
    """
    hwm = proc_status("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (r if sys.platform == "darwin" else r * 1024), "ru_maxrss"  # Linux reports KiB


def _probe(variant: str, d: int, n: int, dtype: torch.dtype, chunk: int) -> dict:
    import nbl_ext  # noqa: F401  (the baseline pays the same imports)

    # Same warm-up in every process (thread pools, BLAS init), then measure from a reset peak.
    a = torch.randn(64, 64)
    torch.mm(a, a)
    del a
    reset = reset_peak_rss()
    chunks = iter_chunks(d, n, dtype, chunk=chunk)
    if variant == "baseline":
        for x, y in chunks:
            del x, y
    else:
        res = RUNNERS[variant](chunks, d, d)
        assert all(bool(torch.isfinite(t).all()) for t in res)
    peak, source = _peak_rss_bytes()
    return {
        "variant": variant,
        "d": d,
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "chunk": chunk,
        "maxrss_bytes": peak,
        "peak_source": source,
        "peak_reset": reset,
        "threads": torch.get_num_threads(),
    }


def _calib_probe(
    model_name: str,
    weights: str,
    device: str,
    dtype: str | None,
    method: str,
    samples: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    ceilings: dict | None,
) -> dict:
    """One calibration-cost measurement in this (fresh) process: load, warm up, time_calibration."""
    from nbl_ext import benchmark as nb

    if weights == "random":
        model = nb.random_model(model_name, dtype=dtype, device=device)
    else:
        from nbl_ext.models import load_model

        model = load_model(model_name, dtype=dtype, device=device, progress=False)[0]
    data = nb.calibration_tokens(model.config.vocab_size, samples, seq_len, seed=seed)
    # time_calibration warms up (one short forward: weights touched, kernels ready) before it measures.
    r = nb.time_calibration(model, data, method=method, batch_size=batch_size, ceilings=ceilings, warmup=True)
    r["threads"] = torch.get_num_threads()
    r["maxrss_bytes"], r["peak_source"] = _peak_rss_bytes()
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    cal = sub.add_parser("calib", help="calibration cost of one method in a fresh process (JSON line)")
    cal.add_argument("--model", required=True, help="a bundled model name (real weights) or a random shape")
    cal.add_argument("--weights", choices=("real", "random"), required=True)
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default=None)
    cal.add_argument("--method", choices=("streaming", "store_all"), required=True)
    cal.add_argument("--samples", type=int, required=True)
    cal.add_argument("--seq-len", type=int, required=True)
    cal.add_argument("--batch-size", type=int, default=1)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--ceilings", default=None, help="JSON of calibration_ceilings (measured by the caller)")
    mem = sub.add_parser("mem", help="peak RSS of one variant, fresh process")
    mem.add_argument("--variant", choices=(*VARIANTS, "baseline"), required=True)
    mem.add_argument("--d", type=int, required=True)
    mem.add_argument("--n", type=int, required=True)
    mem.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    mem.add_argument("--chunk", type=int, default=CHUNK)
    a = ap.parse_args(argv)
    if a.cmd == "calib":
        ceil = json.loads(a.ceilings) if a.ceilings else None
        print(
            json.dumps(
                _calib_probe(
                    a.model, a.weights, a.device, a.dtype, a.method, a.samples, a.seq_len, a.batch_size, a.seed, ceil
                )
            )
        )
        return
    print(json.dumps(_probe(a.variant, a.d, a.n, DTYPES[a.dtype], a.chunk)))


if __name__ == "__main__":
    main()
