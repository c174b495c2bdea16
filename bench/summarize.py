"""Markdown tables of a pytest-benchmark JSON written by bench/run.sh.

    python bench/summarize.py [RESULTS.json]      # default: newest bench/results/*.json

One table per suite present: the covariance accumulator (test_bench_accumulator.py),
generation latency (test_bench_generate.py, ratios to the original of the same case) and
calibration cost (test_bench_calibration.py, ratios to streaming at the same tokens) and the
fused linearized-attention forward (test_bench_affine.py, ratios within each case). The tables
are nbl_ext.benchmark.report's, the same as on docs/performance.md (scripts/performance_report.py);
this adds the notes of one run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's nbl_ext

from nbl_ext.benchmark import report


def summarize(path: Path) -> str:
    data = json.loads(path.read_text())
    nbl = data["machine_info"].get("nbl", {})
    commit = data.get("commit_info", {})
    device = nbl.get("cuda_device_name") or f"CPU {data['machine_info'].get('cpu', {}).get('brand_raw', '')}".strip()
    header = (
        f"`{path.name}`: {device}, {nbl.get('torch_num_threads', '?')} threads, "
        f"torch {nbl.get('torch_version', '?')}, "
        f"commit {str(commit.get('id', '?'))[:10]}{' (dirty)' if commit.get('dirty') else ''}, "
        f"{data.get('datetime', '')[:19]}"
    )
    suites: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        suites.setdefault(report.suite_of(b), []).append(b)
    parts = [header]
    for suite, notes in NOTES.items():
        if suites.get(suite):
            parts.append("\n".join(notes(suites[suite], data)))
    if len(parts) == 1:
        parts.append("(no benchmarks with results in this file)")
    return "\n\n".join(parts)


def _affine(benches: list[dict], data: dict) -> list[str]:
    """nbl::affine_residual (test_bench_affine.py): kernel vs reference, bare GEMM and attention branch."""
    return [
        "Fused linearized-attention forward (nbl::affine_residual; ratios within each case)",
        "",
        *report.affine_table(benches),
    ]


def _accumulator(benches: list[dict], data: dict) -> list[str]:
    rows = report.accumulator_rows(benches)
    out = report.accumulator_table(benches)
    gemm = sorted(
        {
            (e["d_x"], k.removeprefix("gemm_").removesuffix("_gflops"), round(v))
            for e in rows
            for k, v in e.items()
            if k.startswith("gemm_")
        }
    )
    if gemm:
        out += [
            "",
            "Same-run GEMM rate, (d x 2048) @ (2048 x d), GFLOP/s (range over cases): "
            + "; ".join(
                f"d={d} {dt} {min(r for dd, t, r in gemm if (dd, t) == (d, dt))}-"
                f"{max(r for dd, t, r in gemm if (dd, t) == (d, dt))}"
                for d, dt in sorted({(d, dt) for d, dt, _ in gemm})
            ),
        ]
    load = [e["loadavg_1m"] for e in rows if "loadavg_1m" in e]
    if load:
        out.append(
            f"1-min load average during the run: {min(load):.1f}-{max(load):.1f} "
            f"(on {data['machine_info'].get('cpu', {}).get('count', '?')} CPUs)."
        )
    return out


def _generate(benches: list[dict], data: dict) -> list[str]:
    """Generation latency; ``x`` columns: the original of the same case (device, model, shape, mode) / this."""
    rows = report.generation_rows(benches)
    out = [
        "Generation latency (nbl_ext.benchmark.time_generation; x = ratio to the original of the same case, "
        "ideal x = bytes per decode step original / variant, % floor = bytes / same-run bandwidth over the measured "
        "step)",
        "",
        *report.generation_table(benches),
    ]
    ceil = sorted(
        {
            (e["device"], e["dtype"], round(e["bandwidth_bytes_per_s"] / 1e9), round(e["matmul_flops_per_s"] / 1e9))
            for e in rows
            if e.get("bandwidth_bytes_per_s")
        }
    )
    if ceil:
        out += [
            "",
            "Same-run ceilings (copy GB/s, matmul GFLOP/s): "
            + "; ".join(f"{d} {dt}: {bw} GB/s, {mm} GFLOP/s" for d, dt, bw, mm in ceil),
        ]
    peaks = {e.get("peak_memory_method") for e in rows if e.get("peak_memory_method")}
    if peaks:
        out.append("Peak memory: " + " | ".join(sorted(peaks)))
    load = [e["loadavg_1m"] for e in rows if e.get("loadavg_1m") is not None]
    if load:
        out.append(f"1-min load average during the run: {min(load):.1f}-{max(load):.1f}.")
    return out


def _calibration(benches: list[dict], data: dict) -> list[str]:
    """Calibration cost (nbl_ext.benchmark.time_calibration rows, phases and ratios in the JSON)."""
    rows = [b.get("extra_info") or {} for b in benches]
    out = [
        "Calibration cost (all layers; time of nbl_ext.benchmark.time_calibration, phases in the JSON; "
        "floor = forward FLOPs / same-run matmul rate + Gram FLOPs / same-run float32 rate, or bytes / bandwidth; "
        "% of floor = floor / time)",
        "",
        *report.calibration_table(benches),
    ]
    ceil = sorted(
        {
            (
                e["device"],
                e["dtype"],
                round(c["matmul_flops_per_s"] / 1e9),
                round(c.get("gram_flops_per_s", c["matmul_flops_per_s"]) / 1e9),
                round(c["bandwidth_bytes_per_s"] / 1e9),
            )
            for e in rows
            if (c := e.get("ceilings"))
        }
    )
    if ceil:
        out += [
            "",
            "Same-run ceilings (matmul GFLOP/s in the model dtype, float32 GFLOP/s, copy GB/s): "
            + "; ".join(f"{d} {dt}: {mm}, {g}, {bw}" for d, dt, mm, g, bw in ceil),
        ]
    meth = {e.get("peak_memory_method") for e in rows if e.get("peak_memory_method")}
    if meth:
        out.append("Peak memory: " + " | ".join(sorted(meth)))
    load = [e["loadavg_1m"] for e in rows if e.get("loadavg_1m") is not None]
    if load:
        out.append(f"1-min load average during the run: {min(load):.1f}-{max(load):.1f}.")
    return out


#: suite -> its table with this run's notes, in the order of docs/performance.md.
NOTES = {"accumulator": _accumulator, "affine": _affine, "generate": _generate, "calibration": _calibration}


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
