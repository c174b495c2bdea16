"""Benchmarks of NBL: generation latency (original vs NBL-k vs DROP-k), calibration cost, floors (`nbl bench`).

Speed does not depend on weight values, so the speed claims use real model shapes with random weights
(:func:`random_model`) and random affine maps (:func:`synthetic_linearize`, no calibration); real weights
(``nbl_ext.models.load_model``) work the same way. The measurement follows pytorch-labs/gpt-fast: prefill and
decode are timed separately, decode as a median per-token step, and each variant is set against its floor
(bytes per step / memory bandwidth)::

    model = random_model("llama-3.1-8b", dtype="bfloat16", device="cuda")
    synthetic_linearize(model, [24, 25, 26, 27], "nbl")
    time_generation(model, batch=1, prompt_len=2048, new_tokens=2048, mode="static")

    compare(lambda: random_model("llama-3.1-8b", device="cuda"), [("nbl", 8), ("drop", 8)],
            modes=("eager", "static"))    # original, NBL-8, DROP-8 in one run, with ratios

One module per concern:

* :mod:`~nbl_ext.benchmark.models`: named shapes, random-weight models, synthetic maps;
* :mod:`~nbl_ext.benchmark.timing`: device clocks, the phase timer, peak memory;
* :mod:`~nbl_ext.benchmark.generation`: :func:`time_generation` (eager and static modes);
* :mod:`~nbl_ext.benchmark.costs`: bytes/FLOPs of a decode step and of a calibration, same-run ceilings, floors;
* :mod:`~nbl_ext.benchmark.comparison`: :func:`compare`, one run of every variant with ratios;
* :mod:`~nbl_ext.benchmark.calibration`: :func:`time_calibration` (streaming vs the store-all baseline);
* :mod:`~nbl_ext.benchmark.provenance`: :func:`run_info` (device, versions, git commit);
* :mod:`~nbl_ext.benchmark.report`: the one reader and renderer of benchmark results (the `nbl bench`
  tables, bench/summarize.py, scripts/performance_report.py).
"""

from __future__ import annotations

from nbl_ext.benchmark.calibration import (
    CALIBRATION_METHODS,
    calibration_tokens,
    compare_calibration,
    store_all_bytes,
    time_calibration,
)
from nbl_ext.benchmark.comparison import compare
from nbl_ext.benchmark.costs import (
    Shape,
    calibration_ceilings,
    calibration_cost,
    calibration_floor,
    decode_cost,
    floors,
    measure_ceilings,
)
from nbl_ext.benchmark.generation import MODES, WARMUP_TOKENS, cache_bytes, time_generation
from nbl_ext.benchmark.models import (
    SHAPES,
    last_layers,
    random_model,
    shape_config,
    synthetic_linearize,
    synthetic_maps,
)
from nbl_ext.benchmark.provenance import run_info
from nbl_ext.benchmark.report import format_bench, format_bench_calibration
from nbl_ext.benchmark.timing import PhaseTimes, time_call

__all__ = [
    "CALIBRATION_METHODS",
    "MODES",
    "SHAPES",
    "WARMUP_TOKENS",
    "PhaseTimes",
    "Shape",
    "cache_bytes",
    "calibration_ceilings",
    "calibration_cost",
    "calibration_floor",
    "calibration_tokens",
    "compare",
    "compare_calibration",
    "decode_cost",
    "floors",
    "format_bench",
    "format_bench_calibration",
    "last_layers",
    "measure_ceilings",
    "random_model",
    "run_info",
    "shape_config",
    "store_all_bytes",
    "synthetic_linearize",
    "synthetic_maps",
    "time_calibration",
    "time_call",
    "time_generation",
]
