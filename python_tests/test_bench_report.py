"""nbl_ext.benchmark.report: one reader/renderer of benchmark results, and no patching in the library.

bench/summarize.py (the table of one run) and scripts/performance_report.py (docs/performance.md) must
print the same table for the same rows, list the accumulator variants in one order, and the library code
must not swap its own functions at run time (the engine takes the accumulator factory and the timer).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

from nbl_ext.benchmark import report

ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _acc(variant: str, d: int, n: int, t: float) -> dict:
    flops = 2 * n * 3 * d * d
    return {
        "name": f"test_accumulator[cpu-d{d}-n{n}-float32-{variant}]",
        "fullname": f"bench/test_bench_accumulator.py::test_accumulator[cpu-d{d}-n{n}-float32-{variant}]",
        "extra_info": {
            "variant": variant,
            "device": "cpu",
            "d_x": d,
            "d_y": d,
            "tokens": n,
            "dtype": "float32",
            "median_s": t,
            "tokens_per_s": n / t,
            "gflops": flops / t / 1e9,
            "pct_of_gemm_fp32": flops / t / 1e9,
            "floor_s_fp32": flops / 100e9,
            "peak_mem_mb": 10.0,
        },
        "stats": {"median": t},
    }


def _gen(variant: str, step: float, e2e: float) -> dict:
    method, _, k = variant.partition("-k")
    return {
        "name": f"test_generate[{variant}]",
        "fullname": f"bench/test_bench_generate.py::test_generate[{variant}]",
        "extra_info": {
            "suite": "generate",
            "device": "cpu",
            "model": "smollm2-135m",
            "mode": "eager",
            "batch": 1,
            "prompt_len": 64,
            "new_tokens": 16,
            "dtype": "float32",
            "variant": variant,
            "method": None if variant == "original" else method,
            "k": int(k or 0),
            "prefill_s": 0.1,
            "decode_step_s": step,
            "decode_tokens_per_s": 1 / step,
            "e2e_tokens_per_s": e2e,
            "kv_cache_bytes": 2**20,
            "peak_memory_bytes": None,
            "ideal_decode_speedup": 1.1,
            "pct_of_floor": None,
        },
        "stats": {"median": 1.0},
    }


def _results(tmp_path: Path) -> Path:
    # variants written in an order that is not the table's
    benches = [
        _acc(v, 64, 1024, t)
        for v, t in (("store_all", 2.0), ("reference", 1.2), ("compiled_bf16", 0.9), ("compiled", 1.0))
    ]
    benches += [_gen("drop-k2", 0.02, 40.0), _gen("original", 0.03, 30.0), _gen("nbl-k2", 0.025, 36.0)]
    machine = {
        "cpu": {"brand_raw": "Test CPU", "count": 2},
        "nbl": {"torch_version": "2.13.0+cpu", "torch_num_threads": 2, "cpu_count": 2},
    }
    path = tmp_path / "results" / "run.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps(
            {
                "machine_info": machine,
                "commit_info": {"id": "a" * 40, "dirty": False},
                "datetime": "2026-02-01T00:00:00",
                "version": "5.1.0",
                "benchmarks": benches,
            }
        )
    )
    return path


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_summarize_and_performance_page_print_the_same_tables(tmp_path):
    path = _results(tmp_path)
    summary = _load(ROOT / "bench" / "summarize.py", "summarize").summarize(path)
    pr = _load(ROOT / "scripts" / "performance_report.py", "performance_report")
    page, _ = pr.render([path.parent], tmp_path / "docs" / "performance.md", tmp_path / "docs" / "plots", draw=False)
    lines, page_lines = _table_lines(summary), iter(_table_lines(page))
    assert len(lines) > 8 and all(line in page_lines for line in lines)  # the page has them all, in this order
    variants = [line.split("|")[1].strip() for line in _table_lines(summary) if "| float32 | 64 |" in line]
    assert variants == list(report.ACCUMULATOR_VARIANTS)
    gen = [line.split("|")[5].strip() for line in _table_lines(summary) if "smollm2-135m" in line]
    assert gen == ["original", "drop-k2", "nbl-k2"]  # by k, then method
    # ratios to the original of the same case, and "-" (not "-%") for a missing floor
    nbl = next(line for line in _table_lines(summary) if "| nbl-k2 |" in line)
    assert "| 1.200 | 1.200 | 1.100 |" in nbl and nbl.endswith("| - | - |")


def test_workloads_run_the_variants_the_tables_list():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        workloads = _load(ROOT / "bench" / "workloads.py", "workloads")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert tuple(workloads.RUNNERS) == workloads.VARIANTS == report.ACCUMULATOR_VARIANTS


def test_library_code_does_not_patch_itself():
    """unittest.mock belongs in tests: the engine's accumulator_factory and timer replace the old patches."""

    def is_mock(node: ast.AST) -> bool:
        if isinstance(node, ast.Import):
            return any(a.name in ("mock", "unittest.mock") for a in node.names)
        if isinstance(node, ast.ImportFrom):
            return (
                (node.module or "").split(".")[0] == "mock"
                or node.module == "unittest.mock"
                or (node.module == "unittest" and any(a.name == "mock" for a in node.names))
            )
        return False

    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "nbl_ext").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if is_mock(node)
    ]
    assert not offenders, f"mock imported in library code: {offenders}"
