"""The one reader and renderer of benchmark results.

* the `nbl bench` tables (:func:`format_bench`, :func:`format_bench_calibration`) of :func:`~nbl_ext.benchmark.compare`
  and :func:`~nbl_ext.benchmark.compare_calibration` reports;
* the Markdown tables of pytest-benchmark JSON written by ``bash bench/run.sh``, one per suite, that
  bench/summarize.py prints and scripts/performance_report.py puts on docs/performance.md, with what both
  read from that JSON (:func:`suite_of`, :func:`row_device`) and the accumulator variants in one order.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

#: The covariance-accumulator variants of bench/test_bench_accumulator.py (bench/workloads.py runs them), in the
#: order every table lists them: the compiled op, its bfloat16-Gram precision, the PyTorch reference, store-all.
ACCUMULATOR_VARIANTS = ("compiled", "compiled_bf16", "reference", "store_all")


def format_bench_calibration(report: dict) -> str:
    """The table `nbl bench --calibration` prints: one row per method and token count."""
    runs = report["runs"]
    dev = report.get("device", {})
    done = [r for r in runs if "skipped" not in r]
    dtype = done[0]["dtype"] if done else "?"
    lines = [
        f"{report.get('model', {}).get('name', '?')}: calibration of all layers, {dtype} on {dev.get('name', '?')}",
        f"{'method':<10} {'samples x len':>14} {'tokens':>9} {'time s':>8} {'fwd s':>7} {'stats s':>7} "
        f"{'fit s':>6} {'tokens/s':>9} {'host MiB':>9} {'GPU MiB':>8} {'floor s':>8} {'% floor':>7} {'x time':>6}",
    ]
    for r in runs:
        head = f"{r['method']:<10} {str(r['num_samples']) + ' x ' + str(r['seq_len']):>14} {r['tokens']:>9}"
        if "skipped" in r:
            lines.append(f"{head}   skipped: {r['skipped']}")
            continue
        mib = lambda v: "-" if v is None else f"{v / 2**20:.0f}"  # noqa: E731
        fl = r["floor"]["floor_s"]
        pct = r["pct_of_floor"]
        x = r.get("vs_streaming", {}).get("time_ratio")
        lines.append(
            f"{head} {r['total_s']:>8.1f} {r['forward_s']:>7.1f} {r['statistics_s']:>7.1f} {r['fit_s']:>6.1f} "
            f"{r['tokens_per_s']:>9.0f} {mib(r['peak_host_bytes']):>9} {mib(r['peak_cuda_bytes']):>8} "
            f"{'-' if fl is None else f'{fl:.1f}':>8} "
            f"{'-' if pct is None else f'{pct:.0f}%':>7} "
            f"{'-' if x is None else f'{x:.2f}':>6}"
        )
    c = report.get("ceilings")
    if c:
        lines.append(
            f"same-run ceilings: matmul {c['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s ({dtype}), float32 "
            f"{c['gram_flops_per_s'] / 1e9:.0f} GFLOP/s, copy {c['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s"
        )
    lines.append(
        "host MiB: peak RSS growth over the loaded model; GPU MiB: peak allocated (weights included); "
        "floor: forward FLOPs / matmul rate + Gram FLOPs / float32 rate (or bytes / bandwidth); "
        "x time: / streaming at the same tokens"
    )
    return "\n".join(lines)


def format_bench(report: dict) -> str:
    """The table `nbl bench` prints: one row per variant and mode, ratios to the original in that mode."""
    s = report["settings"]
    dev = report.get("device", {})
    lines = [
        f"{report.get('model', {}).get('name', '?')}: batch {s['batch']}, prompt {s['prompt_len']}, "
        f"{s['new_tokens']} new tokens, {s['dtype']} on {dev.get('name', s['device'])}",
        f"{'variant':<10} {'mode':<6} {'prefill ms':>10} {'decode ms':>9} {'tok/s':>9} {'e2e tok/s':>9} "
        f"{'x decode':>8} {'x e2e':>6} {'ideal x':>7} {'KV MiB':>8} {'peak MiB':>8} {'GB/s':>7}",
    ]
    for r in report["runs"]:
        v = r["vs_original"]
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        lines.append(
            f"{r['variant']:<10} {r['mode']:<6} {1e3 * r['prefill_s']:>10.1f} {1e3 * r['decode_step_s']:>9.2f} "
            f"{r['decode_tokens_per_s']:>9.1f} {r['e2e_tokens_per_s']:>9.1f} {v['decode_speedup']:>8.3f} "
            f"{v['e2e_speedup']:>6.3f} {r['ideal_decode_speedup']:>7.3f} {r['kv_cache_bytes'] / 2**20:>8.1f} "
            f"{peak:>8} {r['achieved_bandwidth_bytes_per_s'] / 1e9:>7.1f}"
        )
    c = report.get("ceilings")
    if c:
        lines.append(
            f"same-run ceilings: copy {c['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, matmul "
            f"{c['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s; decode floor (memory) of the original at "
            f"mid-generation: {1e3 * report['runs'][0]['floor']['floor_s']:.2f} ms/step"
        )
    lines.append(
        "x decode / x e2e: speedup over the original in the same mode; ideal x: bytes per decode step "
        "original / variant (weights + KV); GB/s: those bytes / measured step"
    )
    return "\n".join(lines)


# --- pytest-benchmark JSON (bash bench/run.sh) ------------------------------------------------------------
#: extra_info keys read for the calibration suite, first present wins (bytes unless the key says mb).
CALIB_KEYS = {
    "method": ("method", "variant"),
    "time_s": ("time_s", "seconds", "calibrate_s", "elapsed_s", "median_s"),
    "tokens_per_s": ("tokens_per_s",),
    "peak_host_bytes": ("peak_host_bytes", "peak_rss_bytes", "peak_host_mb", "peak_rss_mb"),
    "peak_gpu_bytes": ("peak_gpu_bytes", "peak_cuda_bytes", "peak_gpu_mb", "peak_cuda_mb"),
    "floor_s": ("floor_s",),
}


def is_benchmark_json(data: Any) -> bool:
    """Whether ``data`` (parsed JSON) is a pytest-benchmark result file."""
    return isinstance(data, dict) and isinstance(data.get("benchmarks"), list) and "machine_info" in data


def suite_of(bench: dict) -> str:
    """The suite of one pytest-benchmark entry: ``extra_info["suite"]``; the accumulator by its ``d_x`` and
    ``variant`` fields; else the test file ``bench/test_bench_<suite>.py``."""
    e = bench.get("extra_info") or {}
    if e.get("suite"):
        return str(e["suite"])
    if "d_x" in e and "variant" in e:
        return "accumulator"
    stem = Path(str(bench.get("fullname", "")).split("::")[0]).stem
    return stem.removeprefix("test_bench_") or "other"


def row_device(bench: dict) -> str:
    """Device type ("cuda", "cpu") of one pytest-benchmark entry."""
    e = bench.get("extra_info") or {}
    dev = e.get("device") or (bench.get("params") or {}).get("device")
    if not dev:
        dev = "cuda" if "cuda" in str(bench.get("name", "")) else "cpu"
    return str(dev).split(":")[0]


def fmt(x: Any, spec: str = ".3g") -> str:
    """``x`` formatted with ``spec``; "-" for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.0f}%"


def _mib(v: Any) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f}"


# --- accumulator suite (bench/test_bench_accumulator.py) --------------------------------------------------
def accumulator_rows(benches: list[dict]) -> list[dict]:
    """The accumulator suite's ``extra_info`` rows, float32 first, then by d, tokens and variant."""
    order = {v: i for i, v in enumerate(ACCUMULATOR_VARIANTS)}
    out = [b["extra_info"] for b in benches if "d_x" in b.get("extra_info", {})]
    return sorted(
        out,
        key=lambda e: (
            str(e.get("device")),
            e["dtype"] != "float32",
            e["dtype"],
            e["d_x"],
            e["tokens"],
            order.get(e["variant"], len(order)),
            e["variant"],
        ),
    )


def accumulator_table(benches: list[dict]) -> list[str]:
    """Markdown table of the accumulator suite; ``x store_all`` = store_all's median / this one."""
    ex = accumulator_rows(benches)
    store = {
        (e.get("device"), e["dtype"], e["d_x"], e["tokens"]): e["median_s"] for e in ex if e["variant"] == "store_all"
    }
    out = [
        "| variant | dtype | d | tokens | median ms | tokens/s | GFLOP/s | % of fp32 GEMM | floor ms | x store_all "
        "| peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in ex:
        base = store.get((e.get("device"), e["dtype"], e["d_x"], e["tokens"]))
        out.append(
            f"| {e['variant']} | {e['dtype']} | {e['d_x']} | {e['tokens']} | {1e3 * e['median_s']:.1f} "
            f"| {e['tokens_per_s']:,.0f} | {e['gflops']:.1f} | {fmt(e.get('pct_of_gemm_fp32'), '.0f')}% "
            f"| {fmt(1e3 * e['floor_s_fp32'] if e.get('floor_s_fp32') else None, '.1f')} "
            f"| {fmt(base / e['median_s'] if base else None, '.2f')} | {fmt(e.get('peak_mem_mb'), '.0f')} |"
        )
    return out


# --- generate suite (bench/test_bench_generate.py) --------------------------------------------------------
def generation_case(e: dict) -> tuple:
    """What a generation row is compared within: (model, mode, batch, prompt_len, new_tokens, dtype, sweep)."""
    return (e["model"], e["mode"], e["batch"], e["prompt_len"], e["new_tokens"], e["dtype"], bool(e.get("sweep")))


def _variant_key(e: dict) -> tuple:
    return (0, 0, "") if e["variant"] == "original" else (1, int(e.get("k") or 0), str(e.get("method")))


def generation_rows(benches: list[dict]) -> list[dict]:
    """The generate suite's ``extra_info`` rows by case and variant, each with ``x_decode`` and ``x_e2e``: the
    speedups over the original of the same device and case (None without one)."""
    ex = [b["extra_info"] for b in benches if b.get("extra_info", {}).get("variant")]
    ex.sort(key=lambda e: (str(e.get("device")), generation_case(e), _variant_key(e)))
    base = {(e.get("device"), generation_case(e)): e for e in ex if e["variant"] == "original"}
    out = []
    for e in ex:
        o = base.get((e.get("device"), generation_case(e)))
        out.append(
            {
                **e,
                "x_decode": o["decode_step_s"] / e["decode_step_s"] if o else None,
                "x_e2e": e["e2e_tokens_per_s"] / o["e2e_tokens_per_s"] if o else None,
            }
        )
    return out


def generation_table(benches: list[dict]) -> list[str]:
    """Markdown table of the generate suite (ratios from :func:`generation_rows`)."""
    out = [
        "| model | mode | batch | prompt+new | variant | prefill ms | decode ms/step | decode tok/s | e2e tok/s "
        "| x decode | x e2e | ideal x | KV MiB | peak MiB | % floor |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in generation_rows(benches):
        out.append(
            f"| {e['model']}{' (random)' if e.get('weights') == 'random' else ''} | {e['mode']} | {e['batch']} "
            f"| {e['prompt_len']}+{e['new_tokens']} | {e['variant']} | {1e3 * e['prefill_s']:.1f} "
            f"| {1e3 * e['decode_step_s']:.2f} | {e['decode_tokens_per_s']:,.1f} | {e['e2e_tokens_per_s']:,.1f} "
            f"| {fmt(e['x_decode'], '.3f')} | {fmt(e['x_e2e'], '.3f')} | {fmt(e.get('ideal_decode_speedup'), '.3f')} "
            f"| {e['kv_cache_bytes'] / 2**20:,.1f} | {_mib(e.get('peak_memory_bytes'))} "
            f"| {_pct(e.get('pct_of_floor'))} |"
        )
    return out


# --- calibration suite (bench/test_bench_calibration.py) --------------------------------------------------
def _calib_value(e: dict, what: str) -> Any:
    for key in CALIB_KEYS[what]:
        if e.get(key) is not None:
            v = e[key]
            return v * 2**20 if key.endswith("_mb") else v
    return None


def calibration_rows(benches: list[dict]) -> list[dict]:
    """The calibration suite's rows, each field read by :data:`CALIB_KEYS` (the time falls back to
    pytest-benchmark's median), by model, method and tokens."""
    out = []
    for b in benches:
        e = b.get("extra_info") or {}
        if "skipped" in e:
            continue
        r = {k: _calib_value(e, k) for k in CALIB_KEYS}
        if r["time_s"] is None:
            r["time_s"] = (b.get("stats") or {}).get("median")
        r["tokens"] = e.get("tokens")
        if r["tokens_per_s"] is None and r["tokens"] and r["time_s"]:
            r["tokens_per_s"] = r["tokens"] / r["time_s"]
        r["model"] = e.get("model") or "-"
        r["name"] = b.get("name", "")
        out.append(r)
    return sorted(out, key=lambda r: (str(r["model"]), str(r["method"]), r["tokens"] or 0, r["name"]))


def calibration_table(benches: list[dict]) -> list[str]:
    """Markdown table of the calibration suite (:func:`calibration_rows`); % of floor = floor / time."""
    out = [
        "| model | method | tokens | time s | tokens/s | peak host MiB | peak GPU MiB | floor s | % of floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in calibration_rows(benches):
        pct = 100 * r["floor_s"] / r["time_s"] if r["floor_s"] and r["time_s"] else None
        out.append(
            f"| {r['model']} | {r['method'] or '-'} | {fmt(r['tokens'], ',')} | {fmt(r['time_s'], '.2f')} "
            f"| {fmt(r['tokens_per_s'], ',.0f')} | {_mib(r['peak_host_bytes'])} | {_mib(r['peak_gpu_bytes'])} "
            f"| {fmt(r['floor_s'], '.2f')} | {_pct(pct)} |"
        )
    return out


# --- affine suite (bench/test_bench_affine.py) ------------------------------------------------------------
def affine_rows(benches: list[dict]) -> list[dict]:
    """The affine suite's ``extra_info`` rows with a kernel time, by shape, dtype and rows."""
    ex = [b.get("extra_info") or {} for b in benches]
    return sorted(
        (e for e in ex if e.get("rows") is not None and e.get("kernel_median_s")),
        key=lambda e: (e.get("shape", ""), e.get("dtype", ""), e["rows"]),
    )


def affine_table(benches: list[dict]) -> list[str]:
    """Markdown table of the affine suite: kernel, reference, bare GEMM and attention-branch times and ratios."""
    out = [
        "| shape | dtype | rows | kernel us | reference us | GEMM us | attention us | ref / kernel "
        "| kernel / GEMM | kernel / attention | % floor | % bandwidth |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in affine_rows(benches):
        us = {k: e.get(f"{k}_median_s") for k in ("kernel", "reference", "gemm", "attention")}
        out.append(
            f"| {e.get('shape', '?')} | {e.get('dtype', '?')} | {e['rows']} "
            + " ".join(f"| {fmt(v * 1e6 if v else None, '.1f')}" for v in us.values())
            + f" | {fmt(e.get('kernel_vs_reference'), '.2f')} | {fmt(e.get('kernel_vs_gemm'), '.2f')} "
            f"| {fmt(e.get('kernel_vs_attention'), '.3f')} | {fmt(e.get('pct_of_floor'), '.0f')} "
            f"| {fmt(e.get('pct_of_bandwidth'), '.0f')} |"
        )
    return out


#: suite -> its Markdown table, in the order the pages show them.
TABLES = {
    "accumulator": accumulator_table,
    "affine": affine_table,
    "generate": generation_table,
    "calibration": calibration_table,
}
