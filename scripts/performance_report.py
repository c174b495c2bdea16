"""Render docs/performance.md and its plots from the benchmark results (pytest-benchmark JSON).

    python scripts/performance_report.py     # bench/results/*.json -> docs/performance.md + docs/performance/*.png
    python scripts/performance_report.py --check         # exit 1 if docs/performance.md is stale (CI, python_tests)
    python scripts/performance_report.py --results bench/results --results NEW.json --doc OUT/performance.md

What it reads: every ``*.json`` under the ``--results`` directories (and any file named
directly) that is a pytest-benchmark JSON as ``bash bench/run.sh`` writes it (``machine_info``
with ``machine_info.nbl`` from bench/conftest.py, ``benchmarks`` with per-benchmark
``extra_info``). Other JSON files are listed as skipped.

What it picks: benchmarks are grouped by device (the GPU's name for CUDA rows; the CPU's name
and thread count for CPU rows) and by suite (``extra_info["suite"]``; rows with ``d_x`` and
``variant`` are the accumulator; otherwise the test file ``bench/test_bench_<suite>.py``). For
each (device, suite) the newest run (pytest-benchmark's ``datetime``; file name breaks ties)
is shown, so suites run separately are all shown. Known suites get tables and plots
(accumulator, generate, calibration); any other suite gets a generic table of its medians.
A run of part of a suite replaces the whole suite's earlier run on that device, so commit
whole-suite runs.

The "Targets" table lists each target of the performance issue with the measured value from
those runs, or says plainly what is missing. Every number on the page comes from the JSON;
re-running without new results changes nothing (no clock, no absolute paths on the page).

``--check`` renders in memory and compares with the page on disk (the plots are only checked
to exist: PNG bytes depend on the matplotlib/freetype build). The page names every run it
uses, so a new or removed result JSON makes it stale.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's nbl_ext, whatever is installed

from nbl_ext.benchmark.report import (  # noqa: E402  (the tables and the JSON reading: one place, nbl bench's too)
    ACCUMULATOR_VARIANTS,
    CALIB_KEYS,
    TABLES,
    accumulator_rows,
    affine_rows,
    calibration_rows,
    fmt,
    generation_case,
    generation_rows,
    is_benchmark_json,
    row_device,
    suite_of,
)

DEFAULT_RESULTS = ROOT / "bench" / "results"
DEFAULT_DOC = ROOT / "docs" / "performance.md"

ACC_ORDER = {v: i for i, v in enumerate(ACCUMULATOR_VARIANTS)}
ACC_COLOR = {"compiled": "tab:blue", "compiled_bf16": "tab:cyan", "reference": "tab:green", "store_all": "tab:red"}
METHOD_COLOR = {"nbl": "tab:blue", "drop": "tab:red"}
METHOD_LABEL = {"nbl": "NBL", "drop": "DROP"}
FULL_CALIB_TOKENS = 256 * 2048
FLAT_TOLERANCE = 1.10  # "flat host memory": peak at the most tokens <= 1.10 x peak at the fewest
MISSING_GPU = "missing: needs a GPU session"


# --- loading -------------------------------------------------------------------------------------------
@dataclass
class Run:
    path: Path
    data: dict
    rows: dict[tuple[str, str], list[dict]] = field(default_factory=dict)  # (device label, suite) -> benchmarks

    @property
    def nbl(self) -> dict:
        return self.data.get("machine_info", {}).get("nbl", {})

    @property
    def when(self) -> str:
        return str(self.data.get("datetime", ""))


def device_label(data: dict, dev: str) -> str:
    mi = data.get("machine_info", {})
    nbl = mi.get("nbl", {})
    if dev == "cuda":
        return nbl.get("cuda_device_name") or "CUDA GPU (name not recorded)"
    brand = (mi.get("cpu") or {}).get("brand_raw") or mi.get("processor") or "unknown CPU"
    label = f"CPU {brand}, {nbl.get('torch_num_threads', '?')} threads"
    if nbl.get("cuda_device_name"):
        label += f" (host of {nbl['cuda_device_name']})"
    return label


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def load_runs(sources: list[Path]) -> tuple[list[Run], list[str]]:
    files: list[Path] = []
    for src in sources:
        files += sorted(src.glob("*.json")) if src.is_dir() else [src]
    runs, skipped = [], []
    seen: set[Path] = set()
    for f in files:
        if f.resolve() in seen:
            continue
        seen.add(f.resolve())
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            skipped.append(f"`{f.name}`: not readable as JSON ({type(exc).__name__})")
            continue
        if not is_benchmark_json(data):
            skipped.append(f"`{f.name}`: not a pytest-benchmark JSON (no `machine_info` / `benchmarks`)")
            continue
        run = Run(f, data)
        for b in data["benchmarks"]:
            run.rows.setdefault((device_label(data, row_device(b)), suite_of(b)), []).append(b)
        runs.append(run)
    return runs, skipped


def newest(runs: list[Run]) -> dict[tuple[str, str], Run]:
    """The newest run per (device label, suite)."""
    best: dict[tuple[str, str], Run] = {}
    for run in runs:
        for key in run.rows:
            cur = best.get(key)
            if cur is None or (run.when, run.path.name) > (cur.when, cur.path.name):
                best[key] = run
    return best


# --- formatting helpers ---------------------------------------------------------------------------------
def _range(vals: list[float], spec: str = ".1f", suffix: str = "") -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    a, b = format(lo, spec), format(hi, spec)
    return f"{a}{suffix}" if a == b else f"{a}-{b}{suffix}"


def run_meta(run: Run, rows: list[dict]) -> str:
    nbl = run.nbl
    commit = run.data.get("commit_info", {})
    cid = str(commit.get("id") or nbl.get("git_commit") or "?")[:10]
    dirty = " (dirty)" if commit.get("dirty") or nbl.get("git_dirty") else ""
    load = [b.get("extra_info", {}).get("loadavg_1m") for b in rows]
    end = nbl.get("loadavg_at_end")
    cuda = f", CUDA {nbl['cuda_version']}" if nbl.get("cuda_version") else ""
    ncpu = nbl.get("cpu_count") or run.data.get("machine_info", {}).get("cpu", {}).get("count", "?")
    load_txt = f"1-min load average {_range(load)} during the run" if any(v is not None for v in load) else ""
    if end:
        load_txt += ("; " if load_txt else "") + f"{end[0]:.1f} at the end"
    return (
        f"Run `{run.path.name}`: commit {cid}{dirty}, {run.when[:16].replace('T', ' ')} UTC, "
        f"torch {nbl.get('torch_version', '?')}{cuda}, {nbl.get('torch_num_threads', '?')} threads, "
        f"{load_txt or 'load average not recorded'} (on {ncpu} CPUs), "
        f"{len(rows)} benchmark{'s' if len(rows) != 1 else ''}."
    )


def _savefig(fig, png: Path) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png, dpi=100, metadata={"Software": None})


def _from_zero(ax) -> None:
    """y from 0 to 8% above the highest point: flat stays flat-looking, growth shows."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    if ys:
        ax.set_ylim(0, 1.08 * max(ys))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- accumulator ---------------------------------------------------------------------------------------
def accumulator_section(label: str, run: Run, rows: list[dict], png: Path | None, rel: str) -> list[str]:
    ex = accumulator_rows(rows)
    out = [f"## Covariance accumulator: {label}", "", run_meta(run, rows), ""]
    if png is not None:
        out += [
            f"![accumulator throughput and memory]({rel})",
            "",
            "Top: tokens/s against the number of tokens, with the float32-GEMM floor (three Gram products "
            "at the same-run `torch.mm` rate; dashed). Bottom: peak memory over the baseline process: the "
            "streaming variants stay flat, store_all grows with the tokens. float32 cases.",
            "",
        ]
    out += TABLES["accumulator"](rows)
    out.append("")
    out += _acc_findings(ex)
    return out + [""]


def _acc_findings(ex: list[dict]) -> list[str]:
    lines = []
    comp = [e for e in ex if e["variant"] == "compiled"]
    store = {(e["dtype"], e["d_x"], e["tokens"]): e for e in ex if e["variant"] == "store_all"}
    ref = {(e["dtype"], e["d_x"], e["tokens"]): e for e in ex if e["variant"] == "reference"}
    if comp:
        pct = [e.get("pct_of_gemm_fp32") for e in comp]
        lines.append(
            f"- compiled reaches {_range(pct, '.0f', '%')} of the same-run float32 GEMM rate ({len(comp)} cases)."
        )
        xs = [
            store[k].get("median_s") / e["median_s"]
            for e in comp
            if (k := (e["dtype"], e["d_x"], e["tokens"])) in store
        ]
        if xs:
            lines.append(
                f"- compiled vs store_all: {_range(xs, '.2f', 'x')} faster "
                f"({sum(x > 1 for x in xs)} of {len(xs)} cases faster)."
            )
        xr = [ref[k]["median_s"] / e["median_s"] for e in comp if (k := (e["dtype"], e["d_x"], e["tokens"])) in ref]
        if xr:
            lines.append(
                f"- compiled vs the PyTorch reference: {_range(xr, '.2f', 'x')} "
                f"(compiled faster in {sum(x > 1 for x in xr)} of {len(xr)} cases)."
            )
    for variant in ("compiled", "store_all"):
        for (dt, d), pts in sorted(_by_d(ex, variant).items()):
            if len(pts) >= 2 and all(m is not None for _, m in pts):
                (n0, m0), (n1, m1) = pts[0], pts[-1]
                lines.append(
                    f"- peak memory, {variant}, d={d} {dt}: {m0:.0f} MB at {n0} tokens, {m1:.0f} MB at "
                    f"{n1} tokens ({m1 / m0:.2f}x for {n1 / n0:.0f}x the tokens)."
                )
    return lines


def _by_d(ex: list[dict], variant: str) -> dict[tuple[str, int], list[tuple[int, float | None]]]:
    out: dict[tuple[str, int], list[tuple[int, float | None]]] = {}
    for e in ex:
        if e["variant"] == variant:
            out.setdefault((e["dtype"], e["d_x"]), []).append((e["tokens"], e.get("peak_mem_mb")))
    return {k: sorted(v) for k, v in out.items()}


def plot_accumulator(label: str, rows: list[dict], png: Path) -> None:
    plt = _plt()
    ex = [e for e in accumulator_rows(rows) if e["dtype"] == "float32"]
    ds = sorted({e["d_x"] for e in ex})
    fig, axes = plt.subplots(2, len(ds), figsize=(4.2 * len(ds), 7), squeeze=False)
    for col, d in enumerate(ds):
        ax, axm = axes[0][col], axes[1][col]
        here = [e for e in ex if e["d_x"] == d]
        for v in sorted({e["variant"] for e in here}, key=lambda v: (ACC_ORDER.get(v, 9), v)):
            pts = sorted((e["tokens"], e["tokens_per_s"], e.get("peak_mem_mb")) for e in here if e["variant"] == v)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=ACC_COLOR.get(v), label=v)
            mem = [(p[0], p[2]) for p in pts if p[2] is not None]
            if mem:
                axm.plot(*zip(*mem), marker="o", color=ACC_COLOR.get(v), label=v)
        floor = {}
        for e in here:
            if e.get("floor_s_fp32"):
                floor.setdefault(e["tokens"], []).append(e["tokens"] / e["floor_s_fp32"])
        if floor:
            fx = sorted(floor)
            ax.plot(fx, [statistics.median(floor[n]) for n in fx], "k--", lw=1, label="fp32 GEMM floor (max tokens/s)")
        ax.set_title(f"d = {d}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3, which="both")
        axm.set_xscale("log", base=2)
        _from_zero(axm)
        axm.set_xlabel("tokens")
        axm.set_ylabel("peak memory over baseline, MB")
        axm.grid(alpha=0.3, which="both")
        if col == 0:
            ax.legend(fontsize=8)
            axm.legend(fontsize=8)
    fig.suptitle(f"Covariance accumulator: {label}", fontsize=10)
    _savefig(fig, png)
    plt.close(fig)


# --- generation -------------------------------------------------------------------------------------------
def generate_section(label: str, run: Run, rows: list[dict], png: Path | None, rel: str) -> list[str]:
    ex = generation_rows(rows)
    out = [f"## Generation latency: {label}", "", run_meta(run, rows), ""]
    if png is not None:
        out += [
            f"![generation speedup vs k]({rel})",
            "",
            "Speedup over the original of the same case (same run) against the number of attention blocks "
            "replaced, for decode steps and end to end, next to the ideal bytes ratio (bytes per decode step "
            "original / variant; dotted).",
            "",
        ]
    out += TABLES["generate"](rows)
    ceil = sorted(
        {
            (e["dtype"], round(e["bandwidth_bytes_per_s"] / 1e9), round(e["matmul_flops_per_s"] / 1e9))
            for e in ex
            if e.get("bandwidth_bytes_per_s") and e.get("matmul_flops_per_s")
        }
    )
    if ceil:
        out += [
            "",
            "Same-run ceilings: "
            + "; ".join(f"{dt}: copy {bw:,} GB/s, matmul {mm:,} GFLOP/s" for dt, bw, mm in ceil)
            + ".",
        ]
    return out + [""]


def plot_generate(label: str, rows: list[dict], png: Path) -> None:
    plt = _plt()
    ex = generation_rows(rows)
    cases = sorted({generation_case(e) for e in ex if e["variant"] != "original" and e["x_decode"] is not None})
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        here = [e for e in ex if generation_case(e) == case and e["variant"] != "original"]
        for m in sorted({e["method"] for e in here}):
            # k = 0 is the original itself: every ratio 1
            pts = [(0, 1.0, 1.0, 1.0)] + sorted(
                (e["k"], e["x_decode"], e["x_e2e"], e.get("ideal_decode_speedup")) for e in here if e["method"] == m
            )
            ks = [p[0] for p in pts]
            c = METHOD_COLOR.get(m)
            name = METHOD_LABEL.get(m, m)
            ax.plot(ks, [p[1] for p in pts], "-o", color=c, label=f"{name} x decode")
            ax.plot(ks, [p[2] for p in pts], "--s", color=c, label=f"{name} x e2e")
            if all(p[3] is not None for p in pts):
                ax.plot(ks, [p[3] for p in pts], ":x", color=c, lw=1.5, label=f"{name} ideal bytes ratio")
        ax.axhline(1.0, color="k", lw=0.8)
        model, mode, batch, prompt, new, dtype, _ = case
        if (model, mode, batch, prompt, new, dtype) == ("llama-3.1-8b", "eager", 1, 2048, 2048, "bfloat16"):
            ax.axhline(1.40, color="tab:gray", ls="-.", lw=1, label="target: NBL-12 e2e 1.40x")
        ax.set_title(f"{model} {mode}, batch {batch}, {prompt}+{new}, {dtype}", fontsize=9)
        ax.set_xlabel("attention blocks replaced (k)")
        ax.set_ylabel("speedup over the original (same run)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Generation: {label}", fontsize=10)
    _savefig(fig, png)
    plt.close(fig)


# --- calibration ------------------------------------------------------------------------------------------
def calibration_section(label: str, run: Run, rows: list[dict], png: Path | None, rel: str) -> list[str]:
    out = [f"## Calibration: {label}", "", run_meta(run, rows), ""]
    if png is not None:
        out += [f"![calibration time and memory vs tokens]({rel})", ""]
    out += TABLES["calibration"](rows)
    out += [
        "",
        "Fields read from `extra_info` (first present): "
        + "; ".join(f"{k}: {', '.join(f'`{a}`' for a in v)}" for k, v in CALIB_KEYS.items())
        + "; `tokens`, `model`.",
        "",
    ]
    return out


def _calib_series(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in calibration_rows(rows):
        if r["tokens"]:
            out.setdefault((str(r["model"]), str(r["method"])), []).append(r)
    return out


def plot_calibration(label: str, rows: list[dict], png: Path) -> None:
    plt = _plt()
    fig, (ax, axm) = plt.subplots(1, 2, figsize=(10, 4))
    for (model, method), rs in sorted(_calib_series(rows).items()):
        tok = [r["tokens"] for r in rs]
        ax.plot(tok, [r["time_s"] for r in rs], marker="o", label=f"{model} {method}")
        host = [(r["tokens"], r["peak_host_bytes"] / 2**20) for r in rs if r["peak_host_bytes"] is not None]
        gpu = [(r["tokens"], r["peak_gpu_bytes"] / 2**20) for r in rs if r["peak_gpu_bytes"] is not None]
        if host:
            axm.plot(*zip(*host), marker="o", label=f"{model} {method}, host")
        if gpu:
            axm.plot(*zip(*gpu), marker="s", ls="--", label=f"{model} {method}, GPU")
    _from_zero(axm)
    for a, yl in ((ax, "time, s"), (axm, "peak memory, MiB")):
        a.set_xscale("log", base=2)
        a.set_xlabel("calibration tokens")
        a.set_ylabel(yl)
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=7)
    fig.suptitle(f"Calibration: {label}", fontsize=10)
    _savefig(fig, png)
    plt.close(fig)


# --- other suites -----------------------------------------------------------------------------------------
def affine_section(label: str, run: Run, rows: list[dict], png: Path | None, rel: str) -> list[str]:
    out = [
        f"## Fused linearized-attention forward (`nbl::affine_residual`): {label}",
        "",
        run_meta(run, rows),
        "",
        "Per case: the compiled op, PyTorch's reference (addmm + add), a bare GEMM of the same shape and, for "
        "the 2048-token prefill, the attention branch the map replaces (`h + self_attn(input_layernorm(h))`, "
        "random weights, SDPA), timed interleaved in one test. `ref / kernel` >= 1: the kernel is not slower; "
        "`% floor`: the floor (FLOPs / same-run matmul rate, bytes / same-run copy bandwidth, the larger) over "
        "the kernel's time.",
        "",
    ]
    out += TABLES["affine"](rows)
    if png is not None:
        out += ["", f"![affine_residual: time per row vs rows]({rel})"]
    return out + [""]


def plot_affine(label: str, rows: list[dict], png: Path) -> None:
    plt = _plt()
    ex = affine_rows(rows)
    series = sorted({(e.get("shape", "?"), e.get("dtype", "?")) for e in ex})
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 3.8), squeeze=False)
    for ax, (shape, dtype) in zip(axes[0], series):
        sel = [e for e in ex if e.get("shape") == shape and e.get("dtype") == dtype]
        n = [e["rows"] for e in sel]
        for key, color in (("kernel", "tab:blue"), ("reference", "tab:green"), ("gemm", "tab:gray")):
            ax.plot(n, [1e6 * e[f"{key}_median_s"] / e["rows"] for e in sel], "o-", color=color, label=key)
        ax.plot(n, [1e6 * e["floor_s"] / e["rows"] for e in sel], "k--", lw=1, label="floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows (tokens)")
        ax.set_ylabel("us per row")
        ax.set_title(f"{shape} {dtype}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"affine_residual: {label}", fontsize=9)
    _savefig(fig, png)


def generic_section(label: str, suite: str, run: Run, rows: list[dict]) -> list[str]:
    out = [
        f"## Suite `{suite}`: {label}",
        "",
        run_meta(run, rows),
        "",
        "No dedicated table for this suite yet (scripts/performance_report.py); pytest-benchmark's statistics:",
        "",
        "| benchmark | median s | IQR s | min s | rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    for b in sorted(rows, key=lambda b: b.get("name", "")):
        s = b.get("stats") or {}
        out.append(
            f"| `{b.get('name', '?')}` | {fmt(s.get('median'), '.4g')} | {fmt(s.get('iqr'), '.3g')} "
            f"| {fmt(s.get('min'), '.4g')} | {fmt(s.get('rounds'), 'd')} |"
        )
    return out + [""]


# --- targets ------------------------------------------------------------------------------------------------
Latest = dict[tuple[str, str], Run]
TargetRow = tuple[str, str, str, str]  # device, measured, status, source


def _suite_rows(latest: Latest, suite: str, dev: str) -> list[tuple[str, Run, list[dict]]]:
    out = []
    for (label, s), run in sorted(latest.items()):
        if s != suite:
            continue
        rows = [b for b in run.rows[(label, s)] if row_device(b) == dev]
        if rows:
            out.append((label, run, rows))
    return out


def _verdict(ok: bool | None) -> str:
    return "reported" if ok is None else ("met" if ok else "NOT met")


def t_nbl12(latest: Latest, mode: str) -> list[TargetRow]:
    out = []
    for label, run, rows in _suite_rows(latest, "generate", "cuda"):
        ex = generation_rows(rows)
        hit = [
            e
            for e in ex
            if e["model"] == "llama-3.1-8b"
            and e["mode"] == mode
            and e["batch"] == 1
            and e["prompt_len"] == 2048
            and e["new_tokens"] == 2048
            and e["dtype"] == "bfloat16"
            and e["variant"] == "nbl-k12"
            and e["x_e2e"] is not None
        ]
        for e in hit:
            if mode == "eager":
                out.append(
                    (
                        label,
                        f"{e['x_e2e']:.3f}x e2e ({e['x_decode']:.3f}x decode)",
                        _verdict(e["x_e2e"] >= 1.40),
                        f"`{run.path.name}`",
                    )
                )
            else:
                ideal = e.get("ideal_decode_speedup")
                out.append(
                    (
                        label,
                        f"{e['x_decode']:.3f}x decode, {e['x_e2e']:.3f}x e2e; ideal bytes ratio "
                        f"{fmt(ideal, '.3f')} ({fmt(100 * e['x_decode'] / ideal if ideal else None, '.0f')}% "
                        "of it in decode)",
                        _verdict(None),
                        f"`{run.path.name}`",
                    )
                )
    return out


def t_decode_bw(latest: Latest) -> list[TargetRow]:
    out = []
    for label, run, rows in _suite_rows(latest, "affine", "cuda"):
        pct = [e["pct_of_bandwidth"] for e in affine_rows(rows) if e["rows"] <= 16 and e.get("pct_of_bandwidth")]
        if pct:
            out.append(
                (
                    label,
                    f"GEMV path at {_range(pct, '.0f', '%')} of the same-run copy bandwidth over "
                    f"{len(pct)} decode cases (rows <= 16)",
                    _verdict(min(pct) >= 80),
                    f"`{run.path.name}`",
                )
            )
    return out


def t_accumulator(latest: Latest) -> list[TargetRow]:
    out = []
    for dev in ("cuda", "cpu"):
        for label, run, rows in _suite_rows(latest, "accumulator", dev):
            pct = [e.get("pct_of_gemm_fp32") for e in accumulator_rows(rows) if e["variant"] == "compiled"]
            pct = [p for p in pct if p is not None]
            if pct:
                out.append(
                    (
                        label,
                        f"compiled at {_range(pct, '.0f', '%')} of the same-run fp32 GEMM rate ({len(pct)} cases)",
                        _verdict(min(pct) >= 50),
                        f"`{run.path.name}`",
                    )
                )
        if dev == "cuda" and not out:
            out.append(("GPU", "-", MISSING_GPU, "-"))
    return out


def _pairs(rows: list[dict], a: str, b: str, keys: tuple[str, ...]) -> list[tuple[dict, dict]]:
    ex = [x.get("extra_info") or {} for x in rows]
    other = {tuple(e.get(k) for k in keys): e for e in ex if e.get("variant") == b}
    return [
        (e, other[key])
        for e in ex
        if e.get("variant") == a
        and (key := tuple(e.get(k) for k in keys)) in other
        and e.get("median_s")
        and other[key].get("median_s")
    ]


def t_affine_prefill(latest: Latest) -> list[TargetRow]:
    out = []
    for label, run, rows in _suite_rows(latest, "affine", "cuda"):
        r = [e["kernel_vs_gemm"] for e in affine_rows(rows) if e["rows"] > 16 and e.get("kernel_vs_gemm")]
        if r:
            out.append(
                (
                    label,
                    f"kernel / GEMM time {_range(r, '.2f')} over {len(r)} prefill cases",
                    _verdict(max(r) <= 1.10),
                    f"`{run.path.name}`",
                )
            )
    return out


def t_cpu_affine(latest: Latest) -> list[TargetRow]:
    out = []
    for label, run, rows in _suite_rows(latest, "affine", "cpu"):
        r = [1.0 / e["kernel_vs_reference"] for e in affine_rows(rows) if e.get("kernel_vs_reference")]
        if r:
            worst = max(r)
            out.append(
                (
                    label,
                    f"kernel / reference time {_range(r, '.2f')} over {len(r)} cases",
                    _verdict(worst <= 1.0)
                    if worst <= 1.0 or worst > 1.10
                    else "NOT met by <= 10% (within this machine's run-to-run noise; see bench/README.md)",
                    f"`{run.path.name}`",
                )
            )
    return out


def t_layer(latest: Latest) -> list[TargetRow]:
    out = []
    for dev in ("cuda", "cpu"):
        for label, run, rows in _suite_rows(latest, "affine", dev):
            r = [100 * e["kernel_vs_attention"] for e in affine_rows(rows) if e.get("kernel_vs_attention")]
            if r:
                shapes = ", ".join(sorted({e.get("shape", "?") for e in affine_rows(rows)}))
                out.append(
                    (
                        label,
                        f"linearized branch at {_range(r, '.1f', '%')} of the attention branch's time "
                        f"({shapes}, 2048-token prefill, batch 1)",
                        _verdict(max(r) <= 35) if dev == "cuda" else "reported (the target is for the GPU)",
                        f"`{run.path.name}`",
                    )
                )
        if dev == "cuda" and not out:
            out.append(("GPU", "-", MISSING_GPU, "-"))
    return out


def t_calibration(latest: Latest) -> list[TargetRow]:
    out = []
    for label, run, rows in _suite_rows(latest, "calibration", "cuda"):
        for (model, method), rs in sorted(_calib_series(rows).items()):
            full = [r for r in rs if r["tokens"] == FULL_CALIB_TOKENS and "8b" in model.lower()]
            if not full:
                continue
            t = full[-1]["time_s"]
            host = [(r["tokens"], r["peak_host_bytes"]) for r in rs if r["peak_host_bytes"]]
            if len(host) >= 2:
                growth = host[-1][1] / host[0][1]
                flat = growth <= FLAT_TOLERANCE
                mem = (
                    f"peak host {host[0][1] / 2**30:.1f} GiB at {host[0][0]:,} tokens -> {host[-1][1] / 2**30:.1f} GiB"
                )
            else:
                flat, mem = None, "host-memory flatness not measured (one token count)"
            ok = None if t is None else (t < 180 and flat is not False) if flat is not None else None
            out.append(
                (
                    label,
                    f"{model} {method}: {fmt(t, '.0f')} s for {FULL_CALIB_TOKENS:,} tokens; {mem}",
                    _verdict(ok),
                    f"`{run.path.name}`",
                )
            )
    return out


#: (target as the issue states it, evaluator, what is missing when nothing is found, how it is read)
TARGETS: list[tuple[str, Callable[[Latest], list[TargetRow]], str, str]] = [
    (
        "NBL-12 end-to-end generation >= 1.40x the original (Llama-3.1-8B shape, bf16, batch 1, 2048 + 2048, HF eager)",
        lambda lt: t_nbl12(lt, "eager"),
        MISSING_GPU,
        "generate suite, CUDA rows: `e2e_tokens_per_s` of `nbl-k12` / `original`, llama-3.1-8b, eager, batch 1, "
        "2048+2048, bfloat16",
    ),
    (
        "Fast path (static cache + torch.compile): NBL-12 gain vs the ideal bytes ratio",
        lambda lt: t_nbl12(lt, "static"),
        MISSING_GPU,
        "the same case in static mode: x decode against `ideal_decode_speedup` (no threshold in the issue: reported)",
    ),
    (
        "affine_residual prefill within 10% of a same-run cuBLAS GEMM",
        t_affine_prefill,
        MISSING_GPU,
        "suite `affine` (bench/test_bench_affine.py), CUDA cases with more than 16 rows: `kernel_vs_gemm` (kernel / "
        "bare GEMM time, interleaved in one test) <= 1.10",
    ),
    (
        "affine_residual decode (few rows) >= 80% of the measured bandwidth",
        t_decode_bw,
        MISSING_GPU,
        "suite `affine`, CUDA cases with at most 16 rows: `pct_of_bandwidth` (bytes (d^2 + 2 n d + d) x sizeof over "
        "the kernel's time, against the same-run copy bandwidth) >= 80",
    ),
    (
        "Linearized layer <= 35% of the attention block's time (2048 context, batch 1)",
        t_layer,
        MISSING_GPU,
        "suite `affine`, 2048-row cases: `kernel_vs_attention` (kernel / attention-branch time) <= 0.35 on CUDA; "
        "CPU rows reported",
    ),
    (
        "Accumulator >= 50% of the same-run GEMM rate",
        t_accumulator,
        MISSING_GPU,
        "accumulator suite: `pct_of_gemm_fp32` of the `compiled` variant, every case (CPU rows shown too)",
    ),
    (
        "Full 8B calibration, 256 x 2048 tokens, < 3 min with flat host memory",
        t_calibration,
        MISSING_GPU,
        f"suite `calibration`, CUDA rows of an 8B model with `tokens` = {FULL_CALIB_TOKENS:,}: time < 180 s, and peak "
        f"host memory at the most tokens <= {FLAT_TOLERANCE:.2f}x that at the fewest",
    ),
    (
        "CPU affine_residual not slower than the reference",
        t_cpu_affine,
        "missing: no `affine` benchmark results yet",
        "suite `affine`, CPU cases: 1 / `kernel_vs_reference` (kernel / reference time) <= 1.0 in every case",
    ),
]


def targets_section(latest: Latest) -> list[str]:
    out = [
        "## Targets",
        "",
        "From the performance issue; each measured value comes from the newest run of its suite "
        'on that device. "met" / "NOT met" compare with the target\'s threshold; "reported": the issue '
        "sets no threshold.",
        "",
        "| target | device | measured | status | run |",
        "|---|---|---|---|---|",
    ]
    for text, fn, missing, _ in TARGETS:
        try:
            found = fn(latest)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # results without the fields it reads
            found = [("-", f"could not be read from the results: {type(exc).__name__} {exc}", "error", "-")]
        if not found:
            out.append(f"| {text} | - | - | {missing} | - |")
        for dev, measured, status, src in found:
            out.append(f"| {text} | {dev} | {measured} | {status} | {src} |")
    out += ["", "How each target is read:", ""]
    out += [f"- {text}: {how}." for text, _, _, how in TARGETS]
    return out + [""]


# --- the page --------------------------------------------------------------------------------------------------
SECTIONS = {
    "accumulator": (0, accumulator_section, plot_accumulator),
    "affine": (1, affine_section, plot_affine),
    "generate": (2, generate_section, plot_generate),
    "calibration": (3, calibration_section, plot_calibration),
}


def _want_plot(suite: str, rows: list[dict]) -> bool:
    if suite == "accumulator":
        return any(e["dtype"] == "float32" for e in accumulator_rows(rows))
    if suite == "generate":
        return any(e["variant"] != "original" and e["x_decode"] is not None for e in generation_rows(rows))
    if suite == "calibration":
        return any(len(v) >= 2 for v in _calib_series(rows).values())
    if suite == "affine":
        return len(affine_rows(rows)) >= 2
    return False


def render(sources: list[Path], doc: Path, plots: Path, *, draw: bool = True) -> tuple[str, list[Path]]:
    """The page's text and the plots it links; the plots are drawn when ``draw``."""
    runs, skipped = load_runs(sources)
    latest = newest(runs)
    rel_plots = Path(os.path.relpath(plots, doc.parent)).as_posix()
    lines = [
        "# Performance",
        "",
        "Generated by `scripts/performance_report.py` from the pytest-benchmark JSON under `bench/results/` "
        "(written by `bash bench/run.sh`); do not edit by hand. Regenerate: "
        "`.venv/bin/python scripts/performance_report.py`; `--check` tells whether this page is up to date. "
        "How the benchmarks measure and what the columns mean: `bench/README.md`.",
        "",
        "Ratios are within one run (variants of the same case, adjacent in time); absolute numbers from "
        "different runs or machines do not compare. A 1-min load average above the CPU count means the "
        "machine was shared and the numbers contended.",
        "",
    ]
    lines += targets_section(latest)
    lines += [
        "## Runs shown",
        "",
        "| device | suite | run | commit | date (UTC) | torch | benchmarks |",
        "|---|---|---|---|---|---|---:|",
    ]
    for (label, suite), run in sorted(latest.items()):
        lines.append(
            f"| {label} | {suite} | `{run.path.name}` | {str(run.data.get('commit_info', {}).get('id', '?'))[:10]} "
            f"| {run.when[:16].replace('T', ' ')} | {run.nbl.get('torch_version', '?')} "
            f"| {len(run.rows[(label, suite)])} |"
        )
    shown = {id(r) for r in latest.values()}
    older = sorted(r.path.name for r in runs if id(r) not in shown)
    if older:
        lines += [
            "",
            "Older runs, superseded for every (device, suite) they cover: " + ", ".join(f"`{n}`" for n in older) + ".",
        ]
    if skipped:
        lines += ["", "Skipped files: " + "; ".join(skipped) + "."]
    if not latest:
        lines += ["", "No benchmark results found: run `bash bench/run.sh` (see bench/README.md)."]
    lines.append("")
    pngs: list[Path] = []
    order = sorted(latest.items(), key=lambda kv: (SECTIONS.get(kv[0][1], (9,))[0], kv[0][1], kv[0][0]))
    for (label, suite), run in order:
        rows = run.rows[(label, suite)]
        if suite not in SECTIONS:
            lines += generic_section(label, suite, run, rows)
            continue
        _, section, plot = SECTIONS[suite]
        try:
            png = plots / f"{suite}_{slug(label)}.png" if _want_plot(suite, rows) else None
            part = section(label, run, rows, png, f"{rel_plots}/{png.name}" if png else "")
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # a suite whose fields changed
            lines += generic_section(label, suite, run, rows)
            lines[-1:-1] = [f"(The {suite} table could not be made from these rows: {type(exc).__name__} {exc}.)"]
            continue
        lines += part
        if png is not None:
            pngs.append(png)
            if draw:
                plot(label, rows, png)
    return "\n".join(lines).rstrip("\n") + "\n", pngs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="performance_report.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[0],
        epilog=(
            "examples:\n"
            "  python scripts/performance_report.py              # regenerate docs/performance.md and its plots\n"
            "  python scripts/performance_report.py --check      # exit 1 if the page is stale (CI)\n"
            "  python scripts/performance_report.py --results bench/results --results /tmp/new.json \\\n"
            "      --doc /tmp/out/performance.md                 # a page with a run that is not committed yet\n\n"
            "What is shown: per device (GPU name, or CPU name + threads) and suite (extra_info['suite'];\n"
            "the accumulator by its d_x/variant fields; else the test file bench/test_bench_<suite>.py)\n"
            "the newest run by its pytest-benchmark datetime. A run of part of a suite therefore replaces\n"
            "the whole suite's earlier run on that device: commit whole-suite runs. Known suites get\n"
            "tables and plots (accumulator, generate, calibration); others a table of their medians.\n"
            "The calibration table reads extra_info fields method, tokens, time_s (or seconds, calibrate_s,\n"
            "elapsed_s, median_s), tokens_per_s, peak_host_bytes / peak_gpu_bytes (or *_mb), floor_s.\n\n"
            "Targets: each target of the performance issue with its measured value and met / NOT met,\n"
            "or 'missing: needs a GPU session'; the page lists which fields each target reads.\n\n"
            "After adding a result JSON under bench/results: run this, commit the page and its plots.\n"
            "Exit status: 0 written / up to date, 1 stale (--check), 2 usage error."
        ),
    )
    ap.add_argument(
        "--results",
        action="append",
        type=Path,
        metavar="PATH",
        help="a results directory (its *.json) or one JSON file; repeatable (default: bench/results)",
    )
    ap.add_argument("--doc", type=Path, default=DEFAULT_DOC, help="the page to write (default: docs/performance.md)")
    ap.add_argument(
        "--plots",
        type=Path,
        default=None,
        help="directory of the plots (default: next to the page, <doc stem>/, e.g. docs/performance/)",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the page differs from what the results give or a plot is missing",
    )
    args = ap.parse_args(argv)
    sources = args.results or [DEFAULT_RESULTS]
    for s in sources:
        if not s.exists():
            ap.error(f"--results {s}: no such file or directory")
    doc = args.doc
    plots = args.plots or doc.parent / doc.stem
    text, pngs = render(sources, doc, plots, draw=not args.check)
    if args.check:
        current = doc.read_text() if doc.is_file() else ""
        missing = [p for p in pngs if not p.is_file()]
        if current == text and not missing:
            print(f"{doc}: up to date ({len(pngs)} plots)")
            return 0
        if current != text:
            diff = list(
                difflib.unified_diff(
                    current.splitlines(), text.splitlines(), str(doc), "from the results", lineterm="", n=1
                )
            )
            print(f"{doc} is stale: it differs from what the results give ({len(diff)} diff lines; first 40):")
            print("\n".join(diff[:40]))
        for p in missing:
            print(f"missing plot: {p}")
        print(
            "regenerate with: "
            + " ".join(
                ["python scripts/performance_report.py"]
                + [f"--results {s}" for s in (args.results or [])]
                + ([f"--doc {doc}"] if args.doc != DEFAULT_DOC else [])
            )
        )
        return 1
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    print(f"wrote {doc} and {len(pngs)} plots under {plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
