"""Costs and floors: bytes and FLOPs of a decode step and of a calibration, and the same-run rates
(memory bandwidth, matmul rate) that turn them into the fastest a run could be.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch

from nbl_ext.benchmark.models import resolve_dtype, shape_config
from nbl_ext.benchmark.timing import sync, time_call
from nbl_ext.result import METHODS
from nbl_ext.validation import check_count


@dataclass(frozen=True)
class Shape:
    """What a decode step's cost depends on: the sizes of a Llama-layout decoder."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, obj: Any) -> Shape:
        """From a shape name (:data:`SHAPES`), a Hugging Face config, or a model."""
        if isinstance(obj, Shape):
            return obj
        if isinstance(obj, str):
            obj = shape_config(obj)
        config = getattr(obj, "config", obj)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        d, h = int(text.hidden_size), int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or d // h
        return cls(
            hidden=d,
            layers=int(text.num_hidden_layers),
            heads=h,
            kv_heads=int(getattr(text, "num_key_value_heads", None) or h),
            head_dim=int(head_dim),
            intermediate=int(text.intermediate_size),
            vocab=int(text.vocab_size),
        )


def _element_size(dtype: str | torch.dtype) -> int:
    dt = resolve_dtype(dtype, torch.device("cpu"), "floors") if not isinstance(dtype, torch.dtype) else dtype
    return torch.empty((), dtype=dt).element_size()


def decode_cost(
    shape: Any,
    *,
    k: int = 0,
    method: str = "nbl",
    batch: int = 1,
    context: int = 1,
    dtype: str | torch.dtype = torch.bfloat16,
) -> dict[str, int]:
    """Bytes read and FLOPs of one decode step (one new token per sequence), ``k`` attention blocks replaced.

    With ``d`` hidden, ``n`` layers, ``q = heads * head_dim``, ``kv = kv_heads * head_dim``,
    ``I`` intermediate, ``V`` vocab, ``B`` batch, ``L`` context (cached positions each
    new token attends to, itself included), ``s`` bytes per element:

    * attention branch weights per layer: ``A = d q + 2 d kv + q d`` (q, k, v, o
      projections) ``+ d`` (its norm); MLP half: ``M = 3 d I + d``; head ``V d + d``
      (lm_head + final norm; a tied embedding is the same matrix, read once) and
      the ``B`` embedding rows of the new tokens;
    * an NBL layer replaces ``A`` by ``d^2 + d`` (W, b); a DROP layer by nothing;
    * ``weight_bytes = s (n M + (n-k) A + k R + V d + d + B d)``, ``R = d^2 + d`` (nbl) or 0 (drop);
    * ``kv_bytes = s (n-k) 2 B kv L``: keys and values of every remaining attention layer;
    * ``flops = 2 B (n 3 d I + (n-k)(d q + 2 d kv + q d) + V d) + k 2 B d^2 [nbl] + (n-k) 4 B q L``
      (matmuls; the last term is the attention scores and the weighted sum).

    Activations (O(B d) per layer) and norms' arithmetic are left out. The
    Llama/Mistral layout; other families (q/k/v biases, extra norms) differ by
    O(d) per layer. A static cache of length ``Lmax`` makes attention read
    ``Lmax`` positions whatever the live context: pass ``context=Lmax`` for that.
    """
    sh = Shape.of(shape)
    if method not in METHODS:
        raise ValueError(f"decode_cost: method must be one of {METHODS}, got {method!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= sh.layers:
        raise ValueError(f"decode_cost: k must be an int in [0, {sh.layers}], got {k!r}")
    s = _element_size(dtype)
    d, n = sh.hidden, sh.layers
    q, kv = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    attn_mat = d * q + 2 * d * kv + q * d
    mlp_mat = 3 * d * sh.intermediate
    replacement = d * d + d if method == "nbl" else 0
    kept = n - k
    weights = n * (mlp_mat + d) + kept * (attn_mat + d) + k * replacement + sh.vocab * d + d + batch * d
    kv_elems = kept * 2 * batch * kv * context
    flops = (
        2 * batch * (n * mlp_mat + kept * attn_mat + sh.vocab * d)
        + (k * 2 * batch * d * d if method == "nbl" else 0)
        + kept * 4 * batch * q * context
    )
    return {"weight_bytes": weights * s, "kv_bytes": kv_elems * s, "bytes": (weights + kv_elems) * s, "flops": flops}


def floors(
    shape: Any,
    *,
    k: int = 0,
    method: str = "nbl",
    batch: int = 1,
    context: int = 1,
    dtype: str | torch.dtype = torch.bfloat16,
    bandwidth: float | None = None,
    peak_flops: float | None = None,
) -> dict[str, Any]:
    """Decode-step floors of the original model and of NBL-k / DROP-k, and the ideal speedup.

    For each variant (:func:`decode_cost`): ``memory_s = bytes / bandwidth``
    (weights read once per step + the KV cache read), ``compute_s = flops /
    peak_flops``, ``floor_s = max`` of those given, ``bound`` which term wins.

    ``ideal_speedup = original bytes / linearized bytes``: the decode speedup
    NBL-k can give where decode is memory-bound (small batch), i.e.

        (W + K) / (W - k s (A - R) + K (n - k) / n)

    with ``W``, ``K`` the original weight and KV bytes per step, ``A`` a layer's
    attention-branch weights and ``R`` its replacement (``d^2 + d`` for nbl, 0
    for drop): each replaced layer saves ``s (A - R)`` weight bytes and its
    ``1/n`` share of the KV reads. ``floor_speedup``: the same ratio of floors
    (None without bandwidth and peak_flops).
    """

    def variant(kk: int) -> dict[str, Any]:
        c: dict[str, Any] = dict(decode_cost(shape, k=kk, method=method, batch=batch, context=context, dtype=dtype))
        c["memory_s"] = c["bytes"] / bandwidth if bandwidth else None
        c["compute_s"] = c["flops"] / peak_flops if peak_flops else None
        given = [t for t in (c["memory_s"], c["compute_s"]) if t is not None]
        c["floor_s"] = max(given) if given else None
        c["bound"] = None if len(given) < 2 else "memory" if c["memory_s"] >= c["compute_s"] else "compute"
        return c

    orig, lin = variant(0), variant(k)
    return {
        "shape": asdict(Shape.of(shape)),
        "k": k,
        "method": method,
        "batch": batch,
        "context": context,
        "dtype": str(dtype).removeprefix("torch."),
        "bandwidth": bandwidth,
        "peak_flops": peak_flops,
        "original": orig,
        "linearized": lin,
        "ideal_speedup": orig["bytes"] / lin["bytes"],
        "floor_speedup": (orig["floor_s"] / lin["floor_s"]) if orig["floor_s"] and lin["floor_s"] else None,
    }


@torch.no_grad()
def measure_ceilings(
    device: str | torch.device,
    dtype: str | torch.dtype | None = None,
    *,
    copy_mib: int | None = None,
    matmul_n: int | None = None,
    repeats: int = 10,
) -> dict[str, Any]:
    """Same-run attainable rates: memory bandwidth (a device-to-device copy, bytes read + written) and the
    matmul rate (an n x n x n product in ``dtype``); medians after a warm-up. Defaults: 1 GiB and n = 8192
    on CUDA, 256 MiB and n = 2048 on CPU."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dt = resolve_dtype(dtype, dev, "measure_ceilings")
    mib = copy_mib or (1024 if cuda else 256)
    n = matmul_n or (8192 if cuda else 2048)

    def timed(fn) -> float:
        fn()
        sync(dev)
        return statistics.median(time_call(dev, fn) for _ in range(repeats))

    def copy_rate() -> float:  # each buffer is freed when its function returns
        src = torch.empty(mib * 2**20, dtype=torch.uint8, device=dev)
        src.fill_(1)
        dst = torch.empty_like(src)
        return timed(lambda: dst.copy_(src))

    def matmul_rate() -> float:
        a = torch.randn(n, n, device=dev).to(dt)
        b = torch.randn(n, n, device=dev).to(dt)
        return timed(lambda: torch.mm(a, b))

    t_copy = copy_rate()
    t_mm = matmul_rate()
    return {
        "bandwidth_bytes_per_s": 2 * mib * 2**20 / t_copy,
        "matmul_flops_per_s": 2 * n**3 / t_mm,
        "method": f"median of {repeats}: copy of {mib} MiB (read + write counted); {n}^3 matmul in "
        f"{str(dt).removeprefix('torch.')}",
        "device": str(dev),
    }


def calibration_ceilings(device: str | torch.device, dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """:func:`measure_ceilings` in the model dtype plus ``gram_flops_per_s``: the float32 matmul rate (the
    statistics' Gram products are float32 GEMMs whatever the model dtype)."""
    dev = torch.device(device)
    c = measure_ceilings(dev, dtype)
    dt = resolve_dtype(dtype, dev, "calibration_ceilings")
    c["gram_flops_per_s"] = (
        c["matmul_flops_per_s"] if dt == torch.float32 else measure_ceilings(dev, torch.float32)["matmul_flops_per_s"]
    )
    c["method"] += "; gram rate: the same matmul in float32"
    return c


def calibration_cost(
    shape: Any, *, num_samples: int, seq_len: int, batch_size: int = 1, dtype: str | torch.dtype = torch.bfloat16
) -> dict[str, int]:
    """FLOPs and bytes of calibrating every decoder layer on ``num_samples x seq_len`` tokens.

    With ``n = num_samples * seq_len`` tokens, ``L`` layers, ``d`` hidden, ``q = heads * head_dim``,
    ``kv = kv_heads * head_dim``, ``I`` intermediate, ``s`` bytes per element, ``B`` batches
    (``ceil(num_samples / batch_size)``):

    * ``forward_flops = 2 n L (d q + 2 d kv + q d + 3 d I)`` (the layers' matmuls; no lm_head:
      calibration never runs it) ``+ 4 q L num_samples seq_len (seq_len + 1) / 2`` (causal attention
      scores and weighted sum: position t attends t + 1 keys);
    * ``gram_flops = L 2 n (d^2 + d^2 + d^2)``: the three Gram products (X X^T, A X^T, A A^T) of the
      statistics, per layer (see ``bench/workloads.gram_flops``);
    * ``bytes = L B s (d q + 2 d kv + q d + 3 d I + 2 d)`` (every layer's weights read once per batch)
      ``+ L 2 n d s`` (each layer reads its input and writes its output once);
    * ``stored_activation_bytes = L 2 n d s``: what keeping every layer's X and A needs (the
      store-all approach), against ``state_bytes = 8 (3 d^2 + 2 d)`` of one layer's float64 statistics.
    """
    sh = Shape.of(shape)
    for name, v in (("num_samples", num_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        check_count(v, name, what="calibration_cost")
    s = _element_size(dtype)
    d, L = sh.hidden, sh.layers
    q, kv = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    layer_mat = d * q + 2 * d * kv + q * d + 3 * d * sh.intermediate
    n = num_samples * seq_len
    batches = -(-num_samples // batch_size)
    linear = 2 * n * L * layer_mat
    attention = 4 * q * L * num_samples * (seq_len * (seq_len + 1) // 2)
    gram = L * 2 * n * 3 * d * d
    return {
        "tokens": n,
        "forward_flops": linear + attention,
        "linear_flops": linear,
        "attention_flops": attention,
        "gram_flops": gram,
        "weight_bytes": L * batches * s * (layer_mat + 2 * d),
        "activation_bytes": L * 2 * n * d * s,
        "bytes": L * batches * s * (layer_mat + 2 * d) + L * 2 * n * d * s,
        "stored_activation_bytes": L * 2 * n * d * s,
        "state_bytes": 8 * (3 * d * d + 2 * d),
    }


def calibration_floor(
    cost: dict[str, int],
    *,
    matmul_flops_per_s: float | None = None,
    gram_flops_per_s: float | None = None,
    bandwidth_bytes_per_s: float | None = None,
) -> dict[str, Any]:
    """Seconds the work of :func:`calibration_cost` needs at the given rates (None where a rate is missing).

    ``forward_s = forward_flops / matmul rate`` (model dtype), ``gram_s = gram_flops / gram rate`` (float32:
    the statistics' Gram products are float32 GEMMs of centered chunks), ``compute_s`` their sum,
    ``memory_s = bytes / bandwidth``, ``floor_s = max(compute_s, memory_s)`` of those known, ``bound``
    which term wins.
    """
    fwd = cost["forward_flops"] / matmul_flops_per_s if matmul_flops_per_s else None
    gram = cost["gram_flops"] / gram_flops_per_s if gram_flops_per_s else None
    compute = fwd + gram if fwd is not None and gram is not None else None
    mem = cost["bytes"] / bandwidth_bytes_per_s if bandwidth_bytes_per_s else None
    known = [t for t in (compute, mem) if t is not None]
    return {
        "forward_s": fwd,
        "gram_s": gram,
        "compute_s": compute,
        "memory_s": mem,
        "floor_s": max(known) if known else None,
        "bound": None if len(known) < 2 else ("compute" if compute >= mem else "memory"),
    }
