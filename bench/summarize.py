"""Markdown tables of a pytest-benchmark JSON written by bench/run.sh.

    python bench/summarize.py [RESULTS.json]      # default: newest bench/results/*.json

One table per suite present: the covariance accumulator (test_bench_accumulator.py),
generation latency (test_bench_generate.py, ratios to the original of the same case) and
calibration cost (test_bench_calibration.py, ratios to streaming at the same tokens) and the
fused linearized-attention forward (test_bench_affine.py, ratios within each case).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = {"compiled": 0, "compiled_bf16": 1, "reference": 2, "store_all": 3}


def summarize(path: Path) -> str:
    data = json.loads(path.read_text())
    nbl = data["machine_info"].get("nbl", {})
    commit = data.get("commit_info", {})
    device = nbl.get("cuda_device_name") or f"CPU {data['machine_info'].get('cpu', {}).get('brand_raw', '')}".strip()
    header = (f"`{path.name}`: {device}, {nbl.get('torch_num_threads', '?')} threads, torch {nbl.get('torch_version', '?')}, "
              f"commit {str(commit.get('id', '?'))[:10]}{' (dirty)' if commit.get('dirty') else ''}, "
              f"{data.get('datetime', '')[:19]}")
    extras = [b.get("extra_info", {}) for b in data["benchmarks"]]
    parts = [header]
    acc = [e for e in extras if "d_x" in e and "variant" in e]
    gen = [e for e in extras if e.get("suite") == "generate"]
    cal = [e for e in extras if e.get("suite") == "calibration"]
    aff = [e for e in extras if e.get("suite") == "affine"]
    if acc:
        parts.append(_accumulator_table(acc, data))
    if gen:
        parts.append(_generate_table(gen))
    if cal:
        parts.append(calibration_table(cal))
    if aff:
        parts.append(_affine_table(aff))
    if not acc and not gen and not cal and not aff:
        parts.append("(no benchmarks with results in this file)")
    return "\n\n".join(parts)


def _affine_table(rows: list[dict]) -> str:
    """nbl::affine_residual (test_bench_affine.py): kernel vs reference, bare GEMM and attention branch."""
    out = ["| device | shape | dtype | rows | kernel us | ref / kernel | kernel / GEMM | kernel / attention "
           "| % floor | % bandwidth |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for e in sorted(rows, key=lambda e: (e["device"], e["shape"], e["dtype"], e["rows"])):
        out.append(f"| {e['device']} | {e['shape']} | {e['dtype']} | {e['rows']} | {e['median_s'] * 1e6:.1f} "
                   f"| {f(e.get('kernel_vs_reference'), '.2f')} | {f(e.get('kernel_vs_gemm'), '.2f')} "
                   f"| {f(e.get('kernel_vs_attention'), '.3f')} | {f(e.get('pct_of_floor'), '.0f')} "
                   f"| {f(e.get('pct_of_bandwidth'), '.0f')} |")
    return "\n".join(out)


def _accumulator_table(rows: list[dict], data: dict) -> str:
    rows.sort(key=lambda e: (e["device"], e["dtype"] != "float32", e["dtype"], e["d_x"], e["tokens"],
                             ORDER.get(e["variant"], 9)))
    store = {(e["device"], e["dtype"], e["d_x"], e["tokens"]): e["median_s"]
             for e in rows if e["variant"] == "store_all"}
    out = [
        "| variant | dtype | d | tokens | median ms | tokens/s | GFLOP/s | % of fp32 GEMM | x store_all | peak MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in rows:
        base = store.get((e["device"], e["dtype"], e["d_x"], e["tokens"]))
        speed = f"{base / e['median_s']:.2f}" if base else "-"
        pct = e.get("pct_of_gemm_fp32")
        mem = e.get("peak_mem_mb")
        out.append(
            f"| {e['variant']} | {e['dtype']} | {e['d_x']} | {e['tokens']} | {1e3 * e['median_s']:.1f} "
            f"| {e['tokens_per_s']:,.0f} | {e['gflops']:.1f} | {'-' if pct is None else f'{pct:.0f}%'} "
            f"| {speed} | {'-' if mem is None else f'{mem:.0f}'} |"
        )
    gemm = sorted({(e["d_x"], k.removeprefix("gemm_").removesuffix("_gflops"), round(v))
                   for e in rows for k, v in e.items() if k.startswith("gemm_")})
    if gemm:
        out += ["", "Same-run GEMM rate, (d x 2048) @ (2048 x d), GFLOP/s (range over cases): " + "; ".join(
            f"d={d} {dt} {min(r for dd, t, r in gemm if (dd, t) == (d, dt))}-"
            f"{max(r for dd, t, r in gemm if (dd, t) == (d, dt))}"
            for d, dt in sorted({(d, dt) for d, dt, _ in gemm}))]
    load = [e["loadavg_1m"] for e in rows if "loadavg_1m" in e]
    if load:
        out.append(f"1-min load average during the run: {min(load):.1f}-{max(load):.1f} "
                   f"(on {data['machine_info'].get('cpu', {}).get('count', '?')} CPUs).")
    return "\n".join(out)


def _variant_key(variant: str) -> tuple:
    if variant == "original":
        return (0, 0, "")
    method, _, k = variant.partition("-k")
    return (1, int(k) if k.isdigit() else 0, method)


def _generate_table(rows: list[dict]) -> str:
    """Generation latency; ``x`` columns: the original of the same case (device, model, shape, mode) / this."""
    def case(e: dict) -> tuple:
        return (e["device"], e["model"], e["batch"], e["prompt_len"], e["new_tokens"], e["dtype"], e["mode"])

    rows = sorted(rows, key=lambda e: (case(e), _variant_key(e["variant"])))
    base = {case(e): e for e in rows if e["variant"] == "original"}
    out = [
        "Generation latency (nbl_ext.benchmark.time_generation; x = ratio to the original of the same case, "
        "ideal x = bytes per decode step original / variant, % floor = bytes / same-run bandwidth over the measured step)",
        "",
        "| model | mode | batch | prompt+new | variant | prefill ms | decode ms/step | decode tok/s | e2e tok/s "
        "| x decode | x e2e | ideal x | KV MiB | peak MiB | % floor |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in rows:
        o = base.get(case(e))
        xd = f"{o['decode_step_s'] / e['decode_step_s']:.3f}" if o else "-"
        xe = f"{e['e2e_tokens_per_s'] / o['e2e_tokens_per_s']:.3f}" if o else "-"
        peak = e.get("peak_memory_bytes")
        pct = e.get("pct_of_floor")
        out.append(
            f"| {e['model']}{' (random)' if e.get('weights') == 'random' else ''} | {e['mode']} | {e['batch']} "
            f"| {e['prompt_len']}+{e['new_tokens']} | {e['variant']} | {1e3 * e['prefill_s']:.1f} "
            f"| {1e3 * e['decode_step_s']:.2f} | {e['decode_tokens_per_s']:,.1f} | {e['e2e_tokens_per_s']:,.1f} "
            f"| {xd} | {xe} | {e.get('ideal_decode_speedup', float('nan')):.3f} | {e['kv_cache_bytes'] / 2**20:,.1f} "
            f"| {'-' if peak is None else f'{peak / 2**20:,.0f}'} | {'-' if pct is None else f'{pct:.0f}%'} |")
    ceil = sorted({(e["device"], e["dtype"], round(e["bandwidth_bytes_per_s"] / 1e9), round(e["matmul_flops_per_s"] / 1e9))
                   for e in rows if e.get("bandwidth_bytes_per_s")})
    if ceil:
        out += ["", "Same-run ceilings (copy GB/s, matmul GFLOP/s): " + "; ".join(
            f"{d} {dt}: {bw} GB/s, {mm} GFLOP/s" for d, dt, bw, mm in ceil)]
    peaks = {e.get("peak_memory_method") for e in rows if e.get("peak_memory_method")}
    if peaks:
        out.append("Peak memory: " + " | ".join(sorted(peaks)))
    load = [e["loadavg_1m"] for e in rows if e.get("loadavg_1m") is not None]
    if load:
        out.append(f"1-min load average during the run: {min(load):.1f}-{max(load):.1f}.")
    return "\n".join(out)


def _mb(v) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f}"


def calibration_table(rows: list[dict]) -> str:
    """Calibration cost (nbl_ext.benchmark.time_calibration rows, from the suite or `nbl bench --calibration`)."""
    def case(e: dict) -> tuple:
        return (e["device"], e.get("model", ""), e["dtype"], e["tokens"])

    rows = sorted((e for e in rows if "skipped" not in e),
                  key=lambda e: (case(e)[:3], e["tokens"], e["method"] != "streaming"))
    base = {case(e): e for e in rows if e["method"] == "streaming"}
    out = [
        "Calibration cost (all layers; time = total of nbl_ext.benchmark.time_calibration, phases in the JSON; "
        "floor = forward FLOPs / same-run matmul rate + Gram FLOPs / same-run float32 rate, or bytes / bandwidth; "
        "% floor = floor / time; x streaming = this / streaming at the same tokens)",
        "",
        "| model | dtype | method | samples x len | tokens | time s | forward s | stats s | fit s | tokens/s "
        "| peak host MB | peak GPU MB | floor s | % floor | x streaming time | x streaming host |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in rows:
        o = base.get(case(e))
        xt = f"{e['total_s'] / o['total_s']:.2f}" if o else "-"
        xh = (f"{e['peak_host_bytes'] / o['peak_host_bytes']:.1f}"
              if o and e.get("peak_host_bytes") is not None and o.get("peak_host_bytes") else "-")
        fl = (e.get("floor") or {}).get("floor_s")
        pct = e.get("pct_of_floor")
        out.append(
            f"| {e.get('model', '?')}{' (random)' if e.get('weights') == 'random' else ''} | {e['dtype']} "
            f"| {e['method']} | {e['num_samples']} x {e['seq_len']} | {e['tokens']:,} | {e['total_s']:.1f} "
            f"| {e['forward_s']:.1f} | {e['statistics_s']:.1f} | {e['fit_s']:.1f} | {e['tokens_per_s']:,.0f} "
            f"| {_mb(e.get('peak_host_bytes'))} | {_mb(e.get('peak_cuda_bytes'))} "
            f"| {'-' if fl is None else f'{fl:.1f}'} | {'-' if pct is None else f'{pct:.0f}%'} | {xt} | {xh} |")
    ceil = sorted({(e["device"], e["dtype"], round(c["matmul_flops_per_s"] / 1e9),
                    round(c.get("gram_flops_per_s", c["matmul_flops_per_s"]) / 1e9),
                    round(c["bandwidth_bytes_per_s"] / 1e9)) for e in rows if (c := e.get("ceilings"))})
    if ceil:
        out += ["", "Same-run ceilings (matmul GFLOP/s in the model dtype, float32 GFLOP/s, copy GB/s): " + "; ".join(
            f"{d} {dt}: {mm}, {g}, {bw}" for d, dt, mm, g, bw in ceil)]
    meth = {e.get("peak_memory_method") for e in rows if e.get("peak_memory_method")}
    if meth:
        out.append("Peak memory: " + " | ".join(sorted(meth)))
    load = [e["loadavg_1m"] for e in rows if e.get("loadavg_1m") is not None]
    if load:
        out.append(f"1-min load average during the run: {min(load):.1f}-{max(load):.1f}.")
    return "\n".join(out)


def main(argv: list[str]) -> None:
    if argv:
        path = Path(argv[0])
    else:
        found = sorted((Path(__file__).parent / "results").glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            sys.exit("summarize.py: no bench/results/*.json; run bash bench/run.sh first")
        path = found[-1]
    print(summarize(path))


if __name__ == "__main__":
    main(sys.argv[1:])
