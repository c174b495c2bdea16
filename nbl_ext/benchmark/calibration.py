"""What calibrating costs: time (total and per phase), tokens/s, peak host RSS and peak CUDA memory.

:func:`time_calibration` measures ``nbl_ext.calibrate`` (streaming float64 statistics, constant memory in
the token count) or the reference code's approach (keep every layer's X and A for all tokens on the host,
then ``torch.cov``: the store-all baseline), and sets it against the floor of the work both do
(:func:`~nbl_ext.benchmark.costs.calibration_cost`: forward FLOPs and Gram FLOPs at same-run rates).
The phases are timed through the engine's ``timer`` hook and the baseline's activations are kept through
its ``accumulator_factory`` hook: no patching.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nbl_ext.adapters import get_adapter
from nbl_ext.benchmark.costs import Shape, calibration_cost, calibration_floor
from nbl_ext.benchmark.timing import PeakMemory, PhaseTimes, available_host_bytes, free_memory, model_device, sync
from nbl_ext.calibrate import boundaries_fit, calibrate
from nbl_ext.criteria import token_statistics
from nbl_ext.engine import LayerStats, LayerwiseRunner, check_token_data, eval_mode, progress_bar, score_layer
from nbl_ext.numerics import Moments
from nbl_ext.result import CalibrationResult
from nbl_ext.stats import CovarianceAccumulator
from nbl_ext.validation import check_count

CALIBRATION_METHODS = ("streaming", "store_all")


def calibration_tokens(vocab_size: int, num_samples: int, seq_len: int, *, seed: int = 0) -> torch.Tensor:
    """Random calibration token ids ``(num_samples, seq_len)`` in ``[0, vocab_size)``: the cost of a forward
    does not depend on which tokens it sees (real text is for quality, not for timing)."""
    for name, v in (("vocab_size", vocab_size), ("num_samples", num_samples), ("seq_len", seq_len)):
        check_count(v, name, what="calibration_tokens")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_samples, seq_len), generator=g)


class _StoredActivations:
    """Stands in for the CovarianceAccumulator inside ``LayerwiseRunner.run``: keeps every (X, A) chunk on
    the host (what the reference code does) instead of folding it into statistics."""

    def __init__(self, dim_x: int, dim_y: int, *, device: torch.device | str | None = None) -> None:
        self.dim_x, self.dim_y = dim_x, dim_y
        self.xs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.count = 0

    @classmethod
    def factory(
        cls, dim_x: int, dim_y: int, *, device: torch.device | str | None = None, precision: str = "float32"
    ) -> _StoredActivations:
        """The engine's ``accumulator_factory``. ``precision`` is ignored: store_all keeps the activations and
        computes float64 covariances at the end, there are no Gram products whose precision could be chosen."""
        return cls(dim_x, dim_y, device=device)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> _StoredActivations:
        if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
            raise ValueError("the layer's input or branch output contains NaN or inf")
        self.xs.append(x.detach().reshape(-1, self.dim_x).to("cpu"))
        self.ys.append(y.detach().reshape(-1, self.dim_y).to("cpu"))
        self.count += self.xs[-1].shape[0]
        return self

    def to_accumulator(self, device: torch.device) -> CovarianceAccumulator:
        """float64 ``torch.cov`` of the concatenation ``[X | A]`` on ``device``, as a CovarianceAccumulator
        (co-moments = covariance x (n - 1)), so that the same fit and scores run on it. Frees the chunks."""
        p = torch.cat([torch.cat(self.xs), torch.cat(self.ys)], dim=1).to(device=device, dtype=torch.float64)
        self.xs.clear()
        self.ys.clear()
        n, dx = p.shape[0], self.dim_x
        cov = torch.cov(p.T) * (n - 1)  # (dx + dy)^2: also the redundant X-A block, as the reference does
        mean = p.mean(dim=0)
        del p
        return CovarianceAccumulator.from_moments(
            Moments(n, mean[:dx], mean[dx:], cov[:dx, :dx], cov[dx:, :dx], cov[dx:, dx:])
        )


def store_all_bytes(model: nn.Module, num_samples: int, seq_len: int) -> int:
    """Host bytes the store-all approach keeps: every layer's X and A for every token, in the model dtype
    (:func:`calibration_cost`'s ``stored_activation_bytes``)."""
    return calibration_cost(
        Shape.of(model), num_samples=num_samples, seq_len=seq_len, dtype=next(model.parameters()).dtype
    )["stored_activation_bytes"]


def _calibrate_store_all(
    model: nn.Module, data: torch.Tensor, *, batch_size: int, ridge: float, progress: bool, phases: PhaseTimes
) -> CalibrationResult:
    """The reference code's approach on nbl_ext's layer-by-layer forward: every layer's (X, A) for all
    tokens kept on the host, then per layer float64 ``torch.cov`` of the concatenation and the same
    LMMSE fit and scores (``nbl_ext.engine.score_layer``) as :func:`nbl_ext.calibrate`, timed in the
    same ``phases`` (the host copies and the ``torch.cov`` count as "accumulate")."""
    adapter = get_adapter(model)
    device = model_device(model)
    n_layers = adapter.num_layers
    batches = -(-data.shape[0] // batch_size)
    pbar = progress_bar(n_layers * batches, progress, "store-all calibration")
    kept: list[tuple[_StoredActivations, torch.Tensor]] = []
    # Boundaries where streaming's activations="auto" puts them, so the two differ in the statistics only.
    in_memory = boundaries_fit(model, adapter, data)
    try:
        with tempfile.TemporaryDirectory(prefix="nbl-bench-spill-") as spill, eval_mode(model):
            runner = LayerwiseRunner(
                model,
                adapter,
                data,
                batch_size=batch_size,
                spill_dir=None if in_memory else Path(spill),
                pbar=pbar,
                accumulator_factory=_StoredActivations.factory,
                timer=phases,
            )
            for i in range(n_layers):
                if pbar is not None:
                    pbar.set_postfix_str(f"layer {i}/{n_layers}")
                stats = runner.run(i, score=True, write=i < n_layers - 1, token_stats=token_statistics())
                kept.append((stats.accumulator, stats.token_sums))
                runner.drop_boundary(i)
    finally:
        if pbar is not None:
            pbar.close()
    layers = []
    for i in range(n_layers):
        st, cos = kept[i]
        with phases("accumulate"):
            acc = st.to_accumulator(device)
        kept[i] = (None, cos)  # type: ignore[assignment]
        with phases("score"):
            layers.append(score_layer(LayerStats(i, acc, cos), ridge))
        del acc
    meta = {
        "model_type": adapter.model_type,
        "num_layers": n_layers,
        "hidden_size": adapter.hidden_size,
        "num_samples": int(data.shape[0]),
        "seq_len": int(data.shape[1]),
        "tokens": int(data.numel()),
        "batch_size": batch_size,
        "ridge": float(ridge),
        "method": "store_all (benchmark baseline)",
    }
    return CalibrationResult(layers, meta)


def time_calibration(
    model: nn.Module,
    data: torch.Tensor,
    *,
    method: str = "streaming",
    batch_size: int = 1,
    ridge: float = 0.0,
    progress: bool = False,
    ceilings: dict[str, Any] | None = None,
    check_memory: bool = True,
    warmup: bool = True,
    return_result: bool = False,
) -> dict[str, Any]:
    """Time and peak memory of calibrating every layer of ``model`` on ``data`` (token ids, (samples, seq_len)).

    ``method``:

    * ``"streaming"``: :func:`nbl_ext.calibrate` exactly as users run it (no ``output_dir``,
      ``activations="auto"``: boundary activations spill to a temporary directory, or stay on a GPU with
      room for them; statistics streamed into float64 accumulators);
    * ``"store_all"``: the reference code's approach, on the same layer-by-layer forward
      (``nbl_ext.engine.LayerwiseRunner``): every layer's X and A for all tokens kept on the host in the
      model dtype, then per layer float64 ``torch.cov`` of ``[X | A]`` on the model's device and the same
      fit and scores (``score_layer``). ``check_memory``: refuse (ValueError) when the activations would
      not fit in 90% of the host's available memory.

    Phases (the engine's ``timer`` phases, each timed at its boundaries with the device synced, which adds
    one sync per batch): ``statistics_s`` ("accumulate"; streaming: ``CovarianceAccumulator.update``;
    store_all: the host copies and the ``torch.cov``), ``fit_s`` ("score"; ``score_layer``: LMMSE solve,
    CCA bound, NMSE), and
    ``forward_s = total - both`` (the recorder and layer forwards, any boundary spill I/O, the cosine).

    ``warmup``: one untimed forward of 16 tokens first, so that the peak memory is not the first touch of
    lazily mapped weights (a safetensors checkpoint is mmapped) and the first call's kernel set-up.

    ``ceilings`` (:func:`measure_ceilings` in the model dtype, optionally with ``gram_flops_per_s``, the
    float32 rate of the Gram products) turn :func:`calibration_cost` into floors (:func:`calibration_floor`)
    and ``pct_of_floor = 100 floor_s / total_s``.

    Returns a JSON-able dict: method, tokens, total_s, tokens_per_s (tokens through all layers / total),
    the phases, peak_host_bytes (RSS growth; None where it cannot be measured), peak_cuda_bytes and
    peak_cuda_growth_bytes (CUDA only), stored_activation_bytes (store_all: what it actually held), the
    cost and floor; with ``return_result`` also ``result``, the :class:`~nbl_ext.CalibrationResult`.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"time_calibration: method must be one of {CALIBRATION_METHODS}, got {method!r}")
    check_count(batch_size, "batch_size", what="time_calibration")
    adapter = get_adapter(model)
    data = check_token_data(data, adapter.vocab_size, "time_calibration")
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    num_samples, seq_len = int(data.shape[0]), int(data.shape[1])
    need = store_all_bytes(model, num_samples, seq_len)
    if method == "store_all" and check_memory:
        avail = available_host_bytes()
        if avail is not None and need > 0.9 * avail:
            raise ValueError(
                f"time_calibration: store_all would keep {need / 2**30:.1f} GiB of activations on the host "
                f"({adapter.num_layers} layers x 2 x {num_samples * seq_len} tokens x {adapter.hidden_size} x "
                f"{dtype.itemsize} bytes) but only {avail / 2**30:.1f} GiB is available; use fewer tokens "
                "(its memory grows linearly with them; that is the point of streaming)"
            )
    if warmup:  # touch every weight once (lazily mmapped checkpoints count in RSS when first read), warm kernels
        with eval_mode(model):
            model(input_ids=data[:1, : min(seq_len, 16)].to(device), use_cache=False)
    phases = PhaseTimes(device)
    stored_bytes: list[int] = []
    with PeakMemory(device) as peak:
        sync(device)
        t0 = time.perf_counter()
        if method == "streaming":
            result = calibrate(model, data, batch_size=batch_size, progress=progress, ridge=ridge, timer=phases)
        else:
            result = _calibrate_store_all(
                model, data, batch_size=batch_size, ridge=ridge, progress=progress, phases=phases
            )
            stored_bytes.append(need)
        sync(device)
        total = time.perf_counter() - t0
    tokens = num_samples * seq_len
    cost = calibration_cost(
        Shape.of(model), num_samples=num_samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype
    )
    rates = ceilings or {}
    floor = calibration_floor(
        cost,
        matmul_flops_per_s=rates.get("matmul_flops_per_s"),
        gram_flops_per_s=rates.get("gram_flops_per_s")
        or (rates.get("matmul_flops_per_s") if dtype == torch.float32 else None),
        bandwidth_bytes_per_s=rates.get("bandwidth_bytes_per_s"),
    )
    out: dict[str, Any] = {
        "method": method,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "num_samples": num_samples,
        "seq_len": seq_len,
        "tokens": tokens,
        "batch_size": batch_size,
        "timer": "perf_counter (device synced)",
        "total_s": total,
        "tokens_per_s": tokens / total,
        "forward_s": max(0.0, total - phases.get("accumulate") - phases.get("score")),
        "statistics_s": phases.get("accumulate"),
        "fit_s": phases.get("score"),
        "peak_host_bytes": peak.host,
        "peak_cuda_bytes": peak.cuda,
        "peak_cuda_growth_bytes": peak.cuda_growth,
        "peak_memory_method": peak.method,
        "stored_activation_bytes": stored_bytes[0] if stored_bytes else 0,
        "cost": cost,
        "floor": floor,
        "ceilings": ceilings,
        "pct_of_floor": 100.0 * floor["floor_s"] / total if floor["floor_s"] else None,
        "bounds": result.bounds,
        "nmse": result.nmse,
        "cosines": result.cosines,
    }
    if return_result:
        out["result"] = result
    return out


def compare_calibration(
    model: nn.Module,
    sample_counts: Sequence[int],
    *,
    seq_len: int = 2048,
    methods: Sequence[str] = CALIBRATION_METHODS,
    batch_size: int = 1,
    ceilings: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`time_calibration` of each method at each number of samples (``seq_len`` tokens each), in one run.

    Random token ids (:func:`calibration_tokens`; the first ``s`` samples of one draw, so the counts nest).
    A store_all run that would not fit in host memory is recorded as skipped with the reason (its need
    grows linearly; see :func:`store_all_bytes`). Each run gains ``vs_streaming``: time and peak-memory
    ratios to the streaming run at the same token count. Returns ``{"settings", "ceilings", "runs"}``.
    """
    say = log or (lambda _msg: None)
    for m in methods:
        if m not in CALIBRATION_METHODS:
            raise ValueError(f"compare_calibration: method must be one of {CALIBRATION_METHODS}, got {m!r}")
    counts = [int(c) for c in sample_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"compare_calibration: sample_counts must be positive ints, got {list(sample_counts)}")
    vocab = get_adapter(model).vocab_size
    data = calibration_tokens(vocab, max(counts), seq_len, seed=seed)
    runs: list[dict[str, Any]] = []
    for count in counts:
        for m in methods:
            say(f"{m}: {count} x {seq_len} tokens")
            try:
                r = time_calibration(
                    model, data[:count], method=m, batch_size=batch_size, ceilings=ceilings, progress=progress
                )
            except ValueError as exc:
                if m != "store_all" or "would keep" not in str(exc):
                    raise
                runs.append(
                    {
                        "method": m,
                        "num_samples": count,
                        "seq_len": seq_len,
                        "tokens": count * seq_len,
                        "skipped": str(exc),
                    }
                )
                say(f"  skipped: {exc}")
                continue
            runs.append(r)
            say(f"  {r['total_s']:.1f} s, {r['tokens_per_s']:,.0f} tokens/s")
            free_memory(model_device(model))
    base = {r["tokens"]: r for r in runs if r["method"] == "streaming" and "skipped" not in r}
    for r in runs:
        o = base.get(r["tokens"])
        if o is None or "skipped" in r:
            continue
        r["vs_streaming"] = {
            "time_ratio": r["total_s"] / o["total_s"],
            "peak_host_ratio": (r["peak_host_bytes"] / o["peak_host_bytes"])
            if r["peak_host_bytes"] is not None and o["peak_host_bytes"]
            else None,
            "peak_cuda_ratio": (r["peak_cuda_bytes"] / o["peak_cuda_bytes"])
            if r["peak_cuda_bytes"] is not None and o["peak_cuda_bytes"]
            else None,
        }
    return {
        "settings": {
            "sample_counts": counts,
            "seq_len": seq_len,
            "methods": list(methods),
            "batch_size": batch_size,
            "seed": seed,
            "data": "random token ids",
        },
        "ceilings": ceilings,
        "runs": runs,
    }
