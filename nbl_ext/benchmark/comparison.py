"""One comparison run of generation speed: the original model, then NBL-k and DROP-k variants, in every mode,
with ratios to the original and each variant's decode floor."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from torch import nn

from nbl_ext.adapters import get_adapter
from nbl_ext.benchmark.costs import Shape, floors
from nbl_ext.benchmark.generation import MODES, time_generation
from nbl_ext.benchmark.models import last_layers, synthetic_linearize
from nbl_ext.benchmark.timing import free_memory, model_device
from nbl_ext.result import METHODS
from nbl_ext.validation import check_count


def _merge_rounds(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """One :func:`time_generation` result from single-run rounds: medians of the timings, extremes kept."""
    out = dict(rs[-1])
    for key in ("prefill_s", "ttft_s", "decode_step_s", "e2e_s"):
        out[key] = statistics.median(r[key] for r in rs)
    out["decode_step_min_s"] = min(r["decode_step_min_s"] for r in rs)
    out["decode_step_max_s"] = max(r["decode_step_max_s"] for r in rs)
    out["decode_steps"] = sum(r["decode_steps"] for r in rs)
    out["decode_tokens_per_s"] = out["batch"] / out["decode_step_s"]
    out["e2e_tokens_per_s"] = out["batch"] * out["new_tokens"] / out["e2e_s"]
    peaks = [r["peak_memory_bytes"] for r in rs if r["peak_memory_bytes"] is not None]
    out["peak_memory_bytes"] = max(peaks) if peaks else None
    out["warmup"], out["repeats"], out["interleaved_rounds"] = rs[0]["warmup"], len(rs), len(rs)
    return out


def compare(
    model_factory: Callable[[], nn.Module],
    methods_and_ks: Sequence[tuple[str, int]],
    *,
    modes: Sequence[str] = ("eager",),
    batch: int = 1,
    prompt_len: int = 256,
    new_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    compile: bool | str = True,
    prefill_chunk: int | None = None,
    layers_for: Callable[[int, int], list[int]] = last_layers,
    ceilings: dict[str, Any] | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    interleave: bool = False,
) -> dict[str, Any]:
    """Original, then each ``(method, k)`` variant, in every mode, in one run; ratios to the original.

    ``model_factory()`` must return a fresh *original* model each call (the
    variants are linearized in place, :func:`synthetic_linearize` on
    ``layers_for(num_layers, k)``, default the last k layers). Each model is
    freed before the next is built. ``ceilings`` (from
    :func:`measure_ceilings`) turn the byte/FLOP counts into floors.

    ``interleave=True`` (eager mode only) builds every variant first and times
    them round by round: each of the ``repeats`` rounds runs every variant once
    (the warm-up in the first round), so a slow spell of a shared machine lands
    on all variants alike instead of on whichever ran then. It holds all the
    models at once (small models, CPU); timings are medians over the rounds
    (decode: of each round's median step), ``interleaved_rounds`` says so.

    Returns ``{"settings", "shape", "num_layers", "ceilings", "runs"}``; each
    run is :func:`time_generation`'s dict plus ``variant`` ("original",
    "nbl-k8", ...), ``method``, ``k``, ``layers``, ``floor`` (this variant's
    :func:`decode_cost` and floors at the middle of the generation, context =
    prompt_len + new_tokens // 2), ``ideal_decode_speedup`` (bytes ratio,
    :func:`floors`), ``achieved_bandwidth_bytes_per_s`` (bytes per step /
    measured step) and ``vs_original``: decode/prefill/e2e speedups and the
    KV-cache, peak-memory and weight ratios to the original in the same mode.
    """
    say = log or (lambda _msg: None)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"compare: mode must be one of {MODES}, got {m!r}")
    if interleave and any(m != "eager" for m in modes):
        raise ValueError(
            "compare: interleave=True times eager mode only (a static run compiles its own decode "
            "step, which one round at a time would re-time); run static mode without interleaving"
        )
    original = model_factory()
    adapter = get_adapter(original)
    n = adapter.num_layers
    variants: list[tuple[str, str | None, int]] = [("original", None, 0)]
    for method, k in methods_and_ks:
        if method not in METHODS:
            raise ValueError(f"compare: method must be one of {METHODS}, got {method!r}")
        check_count(k, "k", what="compare")
        if k > n:
            raise ValueError(f"k={k} is larger than the model's {n} decoder layers")
        variants.append((f"{method}-k{k}", method, k))
    shape = Shape.of(original)
    dtype = next(original.parameters()).dtype
    device = model_device(original)
    context = prompt_len + new_tokens // 2
    bw = ceilings.get("bandwidth_bytes_per_s") if ceilings else None
    peak = ceilings.get("matmul_flops_per_s") if ceilings else None
    runs: list[dict[str, Any]] = []

    def finish(r: dict[str, Any], name: str, method: str | None, k: int, layers: list[int]) -> dict[str, Any]:
        fl = floors(
            shape, k=k, method=method or "nbl", batch=batch, context=context, dtype=dtype, bandwidth=bw, peak_flops=peak
        )
        floor = fl["linearized"]
        r.update(
            variant=name,
            method=method,
            k=k,
            layers=layers,
            floor=dict(floor, context=context),
            ideal_decode_speedup=fl["ideal_speedup"],
            achieved_bandwidth_bytes_per_s=floor["bytes"] / r["decode_step_s"],
            pct_of_floor=(100.0 * floor["floor_s"] / r["decode_step_s"]) if floor["floor_s"] else None,
        )
        say(
            f"  {name} ({r['mode']}): decode {1e3 * r['decode_step_s']:.2f} ms/step, "
            f"prefill {1e3 * r['prefill_s']:.1f} ms"
        )
        return r

    timing = dict(
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        compile=compile,
        prefill_chunk=prefill_chunk,
        seed=seed,
    )
    if interleave:
        built: list[tuple[str, str | None, int, list[int], nn.Module]] = []
        for name, method, k in variants:
            m = original if name == "original" else model_factory()
            layers = layers_for(n, k) if method else []
            if method:
                synthetic_linearize(m, layers, method, seed=seed)
            built.append((name, method, k, layers, m))
        rounds: dict[tuple[str, str], list[dict[str, Any]]] = {(b[0], mode): [] for b in built for mode in modes}
        for rnd in range(repeats):
            say(f"round {rnd + 1}/{repeats}: {', '.join(b[0] for b in built)}")
            for name, _, _, _, m in built:
                for mode in modes:
                    rounds[(name, mode)].append(
                        time_generation(m, mode=mode, warmup=warmup if rnd == 0 else 0, repeats=1, **timing)
                    )
        for name, method, k, layers, _ in built:
            for mode in modes:
                runs.append(finish(_merge_rounds(rounds[(name, mode)]), name, method, k, layers))
        del built, original
        free_memory(device)
    else:
        model: nn.Module | None = original
        del original
        for name, method, k in variants:
            if model is None:
                model = model_factory()
            layers = layers_for(n, k) if method else []
            if method:
                synthetic_linearize(model, layers, method, seed=seed)
            for mode in modes:
                say(f"{name} ({mode}): batch {batch}, prompt {prompt_len}, {new_tokens} new tokens")
                r = time_generation(model, mode=mode, warmup=warmup, repeats=repeats, **timing)
                runs.append(finish(r, name, method, k, layers))
            model = None
            free_memory(device)
    base = {r["mode"]: r for r in runs if r["variant"] == "original"}
    for r in runs:
        o = base[r["mode"]]
        r["vs_original"] = {
            "decode_speedup": o["decode_step_s"] / r["decode_step_s"],
            "prefill_speedup": o["prefill_s"] / r["prefill_s"],
            "e2e_speedup": r["e2e_tokens_per_s"] / o["e2e_tokens_per_s"],
            "kv_cache_ratio": (r["kv_cache_bytes"] / o["kv_cache_bytes"]) if o["kv_cache_bytes"] else None,
            "peak_memory_ratio": (r["peak_memory_bytes"] / o["peak_memory_bytes"])
            if r["peak_memory_bytes"] is not None and o["peak_memory_bytes"]
            else None,
            "weights_ratio": r["weights_bytes"] / o["weights_bytes"],
        }
    return {
        "settings": {
            "modes": list(modes),
            "batch": batch,
            "prompt_len": prompt_len,
            "new_tokens": new_tokens,
            "warmup": warmup,
            "repeats": repeats,
            "prefill_chunk": prefill_chunk,
            "seed": seed,
            "interleave": interleave,
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "variants": [v[0] for v in variants],
        },
        "shape": asdict(shape),
        "num_layers": n,
        "ceilings": ceilings,
        "runs": runs,
    }
