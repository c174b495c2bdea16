"""scripts/performance_report.py (docs/performance.md from bench results) and the GPU CI entry point .ci/gpu.

The rendering tests write a small synthetic pytest-benchmark JSON in a temporary directory
(never committed data): one CPU accumulator run, an older run it supersedes, a CUDA generation
run of the 8B target case, a CUDA calibration run, a suite the report does not know, and a
file that is not a benchmark JSON. The last tests are the fast guards of the committed
files: `bash -n .ci/gpu`, and docs/performance.md in sync with bench/results (--check).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "performance_report.py"


def _load():
    spec = importlib.util.spec_from_file_location("performance_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


pr = _load()


# --- synthetic results -----------------------------------------------------------------------------------
def _machine(cuda: bool, commit: str, load: float) -> dict:
    nbl = {
        "torch_version": "2.11.0+cu130" if cuda else "2.13.0+cpu",
        "torch_num_threads": 2,
        "cpu_count": 2,
        "cuda_available": cuda,
        "cuda_version": "13.0" if cuda else None,
        "loadavg_at_end": [load, load, load],
        "git_commit": commit,
        "git_dirty": False,
    }
    if cuda:
        nbl["cuda_device_name"] = "NVIDIA H200"
    return {
        "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "nbl": nbl},
        "commit_info": {"id": commit, "dirty": False},
    }


def _bench(name: str, extra: dict, median: float = 1.0, file: str = "test_bench_x.py") -> dict:
    return {
        "name": name,
        "fullname": f"bench/{file}::{name}",
        "group": "g",
        "params": {},
        "extra_info": extra,
        "stats": {"median": median, "iqr": 0.01, "min": median * 0.9, "rounds": 5},
    }


def _acc(variant: str, d: int, n: int, t: float, mem: float) -> dict:
    flops = 2 * n * 3 * d * d
    return _bench(
        f"test_accumulator[cpu-d{d}-n{n}-float32-{variant}]",
        {
            "variant": variant,
            "device": "cpu",
            "d_x": d,
            "d_y": d,
            "tokens": n,
            "dtype": "float32",
            "median_s": t,
            "tokens_per_s": n / t,
            "gflops": flops / t / 1e9,
            "gemm_float32_gflops": 100.0,
            "pct_of_gemm_fp32": 100 * flops / t / 1e9 / 100.0,
            "floor_s_fp32": flops / 100e9,
            "peak_mem_mb": mem,
            "loadavg_1m": 1.5,
        },
        t,
        "test_bench_accumulator.py",
    )


def _gen(mode: str, variant: str, step: float, e2e: float, ideal: float) -> dict:
    method, _, k = variant.partition("-k")
    return _bench(
        f"test_generate[cuda-llama-3.1-8b-b1-p2048-n2048-bfloat16-{mode}-{variant}]",
        {
            "suite": "generate",
            "device": "cuda",
            "model": "llama-3.1-8b",
            "weights": "random",
            "mode": mode,
            "batch": 1,
            "prompt_len": 2048,
            "new_tokens": 2048,
            "dtype": "bfloat16",
            "variant": variant,
            "method": None if variant == "original" else method,
            "k": int(k or 0),
            "sweep": False,
            "prefill_s": 0.2,
            "decode_step_s": step,
            "decode_tokens_per_s": 1 / step,
            "e2e_tokens_per_s": e2e,
            "kv_cache_bytes": 2**28,
            "peak_memory_bytes": 2**34,
            "ideal_decode_speedup": ideal,
            "pct_of_floor": 70.0,
            "achieved_bandwidth_bytes_per_s": 3.9e12,
            "bandwidth_bytes_per_s": 4.2e12,
            "matmul_flops_per_s": 7e14,
            "loadavg_1m": 0.5,
        },
        60.0,
        "test_bench_generate.py",
    )


def _cal(tokens: int, seconds: float, host: float) -> dict:
    return _bench(
        f"test_calibration[cuda-llama-3.1-8b-{tokens}]",
        {
            "suite": "calibration",
            "device": "cuda",
            "model": "llama-3.1-8b",
            "method": "nbl",
            "tokens": tokens,
            "time_s": seconds,
            "peak_host_bytes": host,
            "peak_gpu_bytes": 40 * 2**30,
            "floor_s": seconds / 2,
        },
        seconds,
        "test_bench_calibration.py",
    )


def _aff(device: str, rows: int, kernel: float, ref: float, gemm: float, attn: float | None, bw_pct: float) -> dict:
    e = {
        "suite": "affine",
        "device": device,
        "shape": "llama-3.1-8b" if device == "cuda" else "smollm2-135m",
        "d": 4096,
        "rows": rows,
        "dtype": "bfloat16",
        "kernel_median_s": kernel,
        "reference_median_s": ref,
        "gemm_median_s": gemm,
        "median_s": kernel,
        "kernel_vs_reference": ref / kernel,
        "kernel_vs_gemm": kernel / gemm,
        "floor_s": kernel / 2,
        "pct_of_floor": 50.0,
        "pct_of_bandwidth": bw_pct,
        "loadavg_1m": 0.4,
    }
    if attn is not None:
        e.update(attention_median_s=attn, kernel_vs_attention=kernel / attn)
    return _bench(f"test_affine_residual[{device}-n{rows}]", e, kernel, "test_bench_affine.py")


def _write(path: Path, machine: dict, when: str, benches: list[dict]) -> Path:
    path.write_text(json.dumps({**machine, "datetime": when, "version": "5.1.0", "benchmarks": benches}))
    return path


def make_results(root: Path) -> Path:
    """The synthetic results directory described in the module docstring, under ``root``."""
    res = root / "results"
    res.mkdir()
    acc = [
        _acc(v, d, n, t * n * d / 1e6, m)
        for d in (64, 128)
        for n in (1024, 4096)
        for v, t, m in (("compiled", 1.0, 10.0), ("reference", 1.2, 11.0), ("store_all", 2.5, n / 50))
    ]
    _write(res / "cpu-old.json", _machine(False, "a" * 40, 9.0), "2026-01-01T00:00:00", acc[:3])
    _write(res / "cpu-new.json", _machine(False, "b" * 40, 1.5), "2026-02-01T00:00:00", acc)
    gen = [
        _gen(mode, v, step, e2e, ideal)
        for mode in ("eager", "static")
        for v, step, e2e, ideal in (
            ("original", 0.030, 30.0, 1.0),
            ("nbl-k12", 0.025, 36.0, 1.052),
            ("drop-k12", 0.024, 37.0, 1.081),
        )
    ]
    _write(
        res / "gpu-gen.json",
        _machine(True, "c" * 40, 0.5),
        "2026-02-02T00:00:00",
        gen + [_bench("test_mystery[x]", {"suite": "mystery", "device": "cuda"}, 0.5, "test_bench_mystery.py")],
    )
    _write(
        res / "gpu-cal.json",
        _machine(True, "d" * 40, 0.7),
        "2026-02-03T00:00:00",
        [_cal(2048 * 16, 20.0, 30 * 2**30), _cal(256 * 2048, 150.0, 31 * 2**30)],
    )
    # affine: GPU decode at 85% / 90% of bandwidth, prefill 1.05x the GEMM, 20% of attention;
    # CPU: kernel 0.9x and 1.2x the reference's time (the second one misses the target)
    _write(
        res / "gpu-affine.json",
        _machine(True, "e" * 40, 0.4),
        "2026-02-04T00:00:00",
        [
            _aff("cuda", 1, 1e-5, 3e-5, 1.2e-5, None, 85.0),
            _aff("cuda", 8, 1.1e-5, 3e-5, 1.2e-5, None, 90.0),
            _aff("cuda", 2048, 1.05e-3, 1.2e-3, 1e-3, 5.25e-3, 60.0),
        ],
    )
    _write(
        res / "cpu-affine.json",
        _machine(False, "f" * 40, 0.4),
        "2026-02-04T00:00:00",
        [_aff("cpu", 1, 0.9e-4, 1e-4, 1e-4, None, 30.0), _aff("cpu", 2048, 1.2e-2, 1e-2, 1e-2, 0.1, 40.0)],
    )
    (res / "not-a-benchmark.json").write_text(json.dumps({"runs": []}))
    return res


@pytest.fixture
def results(tmp_path) -> Path:
    return make_results(tmp_path)


def _render(results: Path, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    doc = tmp_path / "docs" / "performance.md"
    return pr.main(["--results", str(results), "--doc", str(doc), *extra]), doc


# --- rendering -------------------------------------------------------------------------------------------
def test_renders_tables_targets_and_plots(results, tmp_path):
    pytest.importorskip("matplotlib")
    rc, doc = _render(results, tmp_path)
    assert rc == 0
    text = doc.read_text()
    # the newest run per (device, suite); the older CPU run is named as superseded, the stray file as skipped
    assert "`cpu-new.json`" in text and "Older runs, superseded" in text and "`cpu-old.json`" in text
    assert "`not-a-benchmark.json`: not a pytest-benchmark JSON" in text
    assert "## Covariance accumulator: CPU Test CPU, 2 threads" in text
    assert "## Generation latency: NVIDIA H200" in text and "## Calibration: NVIDIA H200" in text
    assert "## Suite `mystery`: NVIDIA H200" in text and "`test_mystery[x]`" in text
    # each table states device, commit, date, torch and load average
    assert "Run `cpu-new.json`: commit bbbbbbbbbb, 2026-02-01 00:00 UTC, torch 2.13.0+cpu" in text
    assert "1-min load average 1.5 during the run; 1.5 at the end" in text
    # accumulator table: compiled vs store_all ratio is computed (d=64, n=1024: 2.5 / 1.0)
    assert "| compiled | float32 | 64 | 1024 |" in text and "| 2.50 |" in text
    # generation: x e2e = 36 / 30 = 1.200 for NBL-12, below the 1.40 target
    targets = text.split("## Targets")[1].split("## Runs shown")[0]
    assert "| NVIDIA H200 | 1.200x e2e (1.200x decode) | NOT met |" in targets
    assert "1.200x decode, 1.200x e2e; ideal bytes ratio 1.052 (114% of it in decode) | reported" in targets
    assert "GEMV path at 85-90% of the same-run copy bandwidth over 2 decode cases (rows <= 16) | met" in targets
    assert "kernel / GEMM time 1.05 over 1 prefill cases | met" in targets
    assert "linearized branch at 20.0% of the attention branch's time (llama-3.1-8b" in targets
    assert "linearized branch at 12.0% of the attention branch's time (smollm2-135m" in targets
    assert "kernel / reference time 0.90-1.20 over 2 cases | NOT met |" in targets
    assert "150 s for 524,288 tokens; peak host 30.0 GiB at 32,768 tokens -> 31.0 GiB | met" in targets
    # accumulator on the CPU: compiled at 2 * 3 d^2 n / t ... the pct is computed from the JSON, and shown
    assert "compiled at " in targets and "of the same-run fp32 GEMM rate" in targets
    # targets nothing measured: plainly missing
    assert targets.count("missing: needs a GPU session") == 1  # the GPU accumulator
    assert "| Accumulator >= 50% of the same-run GEMM rate | GPU | - | missing: needs a GPU session |" in targets
    assert "## Fused linearized-attention forward (`nbl::affine_residual`): NVIDIA H200" in text
    assert (
        "| llama-3.1-8b | bfloat16 | 2048 | 1050.0 | 1200.0 | 1000.0 | 5250.0 | 1.14 | 1.05 | 0.200 | 50 | 60 |" in text
    )
    for png in (
        "accumulator_cpu-test-cpu-2-threads.png",
        "generate_nvidia-h200.png",
        "calibration_nvidia-h200.png",
        "affine_nvidia-h200.png",
        "affine_cpu-test-cpu-2-threads.png",
    ):
        assert (doc.parent / "performance" / png).is_file()
        assert f"(performance/{png})" in text


def test_deterministic_and_check(results, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc, doc = _render(results, tmp_path)
    first = doc.read_text()
    pngs = {p.name: p.read_bytes() for p in (doc.parent / "performance").glob("*.png")}
    assert _render(results, tmp_path)[0] == 0
    assert doc.read_text() == first
    assert {p.name: p.read_bytes() for p in (doc.parent / "performance").glob("*.png")} == pngs
    capsys.readouterr()
    assert _render(results, tmp_path, "--check")[0] == 0
    assert "up to date" in capsys.readouterr().out
    # a new result makes the page stale
    _write(
        results / "gpu-cal-2.json",
        _machine(True, "e" * 40, 0.7),
        "2026-03-01T00:00:00",
        [_cal(2048 * 16, 19.0, 30 * 2**30)],
    )
    assert _render(results, tmp_path, "--check")[0] == 1
    out = capsys.readouterr().out
    assert "is stale" in out and "gpu-cal-2.json" in out and "regenerate with" in out
    # so does a missing plot
    _render(results, tmp_path)
    (doc.parent / "performance" / "generate_nvidia-h200.png").unlink()
    assert _render(results, tmp_path, "--check")[0] == 1
    assert "missing plot" in capsys.readouterr().out


def test_no_results_every_target_missing(tmp_path):
    empty = tmp_path / "none"
    empty.mkdir()
    rc, doc = _render(empty, tmp_path)
    assert rc == 0
    text = doc.read_text()
    assert text.count("missing: needs a GPU session") == 7
    assert "No benchmark results found" in text


def test_known_suite_with_other_fields_falls_back_to_a_generic_table(tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    _write(
        res / "odd.json",
        _machine(True, "f" * 40, 0.1),
        "2026-04-01T00:00:00",
        [
            _bench(
                "test_generate[odd]",
                {"suite": "generate", "device": "cuda", "variant": "original"},
                2.0,
                "test_bench_generate.py",
            )
        ],
    )
    rc, doc = _render(res, tmp_path)
    text = doc.read_text()
    assert rc == 0
    assert "## Suite `generate`: NVIDIA H200" in text and "The generate table could not be made" in text
    assert "| `test_generate[odd]` | 2 |" in text
    targets = text.split("## Targets")[1].split("## Runs shown")[0]
    assert "could not be read from the results: KeyError" in targets


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exc:
        pr.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for needle in (
        "--check",
        "--results",
        "the newest run",
        "commit whole-suite runs",
        "needs a GPU session",
        "1 stale",
    ):
        assert needle in out


def test_missing_results_path_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        pr.main(["--results", str(tmp_path / "nope"), "--check"])
    assert exc.value.code == 2


# --- the committed files ---------------------------------------------------------------------------------
def test_gpu_ci_script_parses():
    """.ci/gpu only runs on a GPU runner; at least its syntax is checked everywhere."""
    bash = shutil.which("bash")
    assert bash, "bash is needed to check .ci/gpu"
    subprocess.run([bash, "-n", str(ROOT / ".ci" / "gpu")], check=True)


def test_committed_performance_page_is_in_sync(capsys):
    """docs/performance.md must match bench/results (regenerate: python scripts/performance_report.py)."""
    rc = pr.main(["--check"])
    assert rc == 0, capsys.readouterr().out
