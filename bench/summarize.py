"""Markdown table of a pytest-benchmark JSON written by bench/run.sh.

    python bench/summarize.py [RESULTS.json]      # default: newest bench/results/*.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = {"compiled": 0, "reference": 1, "store_all": 2}


def summarize(path: Path) -> str:
    data = json.loads(path.read_text())
    nbl = data["machine_info"].get("nbl", {})
    commit = data.get("commit_info", {})
    device = nbl.get("cuda_device_name") or f"CPU {data['machine_info'].get('cpu', {}).get('brand_raw', '')}".strip()
    rows = [b["extra_info"] for b in data["benchmarks"] if "variant" in b.get("extra_info", {})]
    rows.sort(key=lambda e: (e["device"], e["dtype"] != "float32", e["dtype"], e["d_x"], e["tokens"],
                             ORDER.get(e["variant"], 9)))
    store = {(e["device"], e["dtype"], e["d_x"], e["tokens"]): e["median_s"]
             for e in rows if e["variant"] == "store_all"}
    out = [
        f"`{path.name}`: {device}, {nbl.get('torch_num_threads', '?')} threads, torch {nbl.get('torch_version', '?')}, "
        f"commit {str(commit.get('id', '?'))[:10]}{' (dirty)' if commit.get('dirty') else ''}, {data.get('datetime', '')[:19]}",
        "",
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
