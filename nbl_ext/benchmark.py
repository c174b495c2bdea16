"""Generation latency of original vs NBL-linearized vs DROP models: prefill, decode, KV memory, floors.

Speed does not depend on weight values, so the speed claims use real model
shapes with random weights (:func:`random_model`) and random affine maps
(:func:`synthetic_linearize`, no calibration); real weights (``load_model``)
work the same way. The measurement follows pytorch-labs/gpt-fast: prefill and
decode are timed separately, decode as a median per-token step, and each
variant is set against its floor (bytes per step / memory bandwidth)::

    model = random_model("llama-3.1-8b", dtype="bfloat16", device="cuda")
    synthetic_linearize(model, [24, 25, 26, 27], "nbl")
    time_generation(model, batch=1, prompt_len=2048, new_tokens=2048, mode="static")

    compare(lambda: random_model("llama-3.1-8b", device="cuda"), [("nbl", 8), ("drop", 8)],
            modes=("eager", "static"))    # original, NBL-8, DROP-8 in one run, with ratios

Modes (:func:`time_generation`):

* ``"eager"``: what a user of Hugging Face gets out of the box:
  ``model.generate`` (greedy, dynamic cache, ``min_new_tokens = max_new_tokens``
  so every run has the same length). Decode steps are timed *inside* that
  generate call by a logits processor appended to generate's own list: it
  marks the clock (a CUDA event, or ``perf_counter`` on CPU) once per
  generated token, at the same point of every step, so the interval between
  two marks is one whole step of generate's loop (token selection, stopping
  check, input preparation, the forward). Prefill is timed separately, as the
  forward of the prompt into a fresh ``DynamicCache`` with ``logits_to_keep=1``
  (what generate's prefill runs).
* ``"static"``: the gpt-fast fast path: a ``StaticCache`` allocated once for
  prompt + new tokens, the prefill run eagerly, and a decode step (forward of
  one token + greedy selection) compiled with ``torch.compile``
  (``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA; inductor's default
  on CPU), called in a Python loop with no host synchronization; the clock is
  marked between steps.

Both modes are greedy and mask the EOS logit(s) exactly as generate's
``min_new_tokens`` does, so they produce the same tokens as plain
``model.generate(..., do_sample=False, min_new_tokens=n, max_new_tokens=n)``.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from nbl_ext.adapters import get_adapter
from nbl_ext.linearize import SUMMARY_ATTR, apply_structure, is_linearized
from nbl_ext.result import METHODS, check_layer_list

__all__ = [
    "CALIBRATION_METHODS", "MODES", "SHAPES", "Shape", "calibration_cost", "calibration_floor", "calibration_tokens",
    "compare", "compare_calibration", "decode_cost", "floors", "last_layers", "measure_ceilings", "random_model",
    "run_info", "store_all_bytes", "synthetic_linearize", "synthetic_maps", "time_calibration", "time_call", "time_generation",
]

MODES = ("eager", "static")
#: New tokens of a warm-up run (its prefill is full length): enough to compile, capture CUDA graphs
#: and warm the kernels; decode shapes do not depend on the position (the static cache is full size).
WARMUP_TOKENS = 8

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

#: Named model shapes for random-weight models: Hugging Face config arguments (model_type first).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
        rope_parameters=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001),
    "mistral-7b": dict(  # Mistral-7B-v0.3
        model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=32768, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, sliding_window=None, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2),
}


# --- models ----------------------------------------------------------------------------------


def _torch_dtype(dtype: str | torch.dtype | None, device: torch.device, what: str) -> torch.dtype:
    from nbl_ext.validation import DTYPE_NAMES as _DTYPES

    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.strip().lower().removeprefix("torch.")]
    raise ValueError(f"{what}: unknown dtype {dtype!r}; use 'float32', 'bfloat16', 'float16' or a torch.dtype")


def shape_config(shape: str, num_layers: int | None = None):
    """The Hugging Face config of a named shape (see :data:`SHAPES`), optionally with fewer layers."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[shape])
    if num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        kwargs["num_hidden_layers"] = num_layers
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, attn_implementation="sdpa", **kwargs)


def random_model(shape: str, *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
                 num_layers: int | None = None, seed: int = 0) -> nn.Module:
    """A causal LM of a named shape (:data:`SHAPES`) with random weights, built from its config (no download).

    The parameters are allocated directly on ``device`` (a ``torch.device``
    context around the constructor), so an 8B model on a GPU never exists on
    the CPU; ``device="meta"`` builds it without any memory. Weights are
    transformers' own initialization: linear and embedding weights
    N(0, 0.02^2), norms 1; RoPE buffers stay float32 as with ``from_pretrained``.
    ``dtype``: default bfloat16 on CUDA, float32 elsewhere. Returns the model
    in eval mode; ``config.nbl_source`` records the shape.
    """
    from transformers import AutoModelForCausalLM

    config = shape_config(shape, num_layers)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"random_model: device={str(device)!r} but CUDA is not available here")
    torch_dtype = _torch_dtype(dtype, dev, "random_model")
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    wrong = {p.device for p in model.parameters() if p.device.type != dev.type}
    if wrong:  # pragma: no cover - a transformers change that allocates elsewhere first
        raise RuntimeError(f"random_model: parameters landed on {wrong}, not {dev}")
    model.config.nbl_source = {"kind": "random", "shape": shape, "num_layers": config.num_hidden_layers,
                               "seed": seed, "description": f"random weights, {shape} shape"}
    return model.eval()


def last_layers(num_layers: int, k: int) -> list[int]:
    """The default layers to linearize for speed runs: the last ``k`` (deep layers are the ones NBL picks
    most often; for speed which layers does not matter)."""
    return list(range(num_layers - k, num_layers))


def synthetic_maps(hidden_size: int, layers: Iterable[int], *, seed: int = 0, scale: float = 0.01
                   ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Random affine maps ``{layer: (W, b)}``: ``W ~ N(0, scale^2 / d)`` (spectral norm ~ 2 scale), ``b ~ N(0, scale^2)``.

    float32 on the CPU, from a generator seeded per layer: the same maps on every device.
    """
    out = {}
    for i in layers:
        g = torch.Generator().manual_seed(seed * 100_003 + int(i))
        w = torch.randn(hidden_size, hidden_size, generator=g) * (scale / math.sqrt(hidden_size))
        b = torch.randn(hidden_size, generator=g) * scale
        out[int(i)] = (w, b)
    return out


def synthetic_linearize(model: nn.Module, layers: Any, method: str = "nbl", *, seed: int = 0,
                        scale: float = 0.01) -> nn.Module:
    """Linearize (``"nbl"``) or drop (``"drop"``) ``layers`` in place *without calibration*.

    Same structure as :func:`nbl_ext.linearize` (it goes through
    ``nbl_ext.linearize.apply_structure``: attention weights freed, KV slots
    released, ``config.nbl`` recorded) with the maps of :func:`synthetic_maps`
    instead of fitted ones: for speed measurements only; the model's outputs
    mean nothing. The model's ``nbl_ext`` summary says the maps are synthetic.
    """
    adapter = get_adapter(model)
    if method not in METHODS:
        raise ValueError(f"synthetic_linearize: method must be one of {METHODS}, got {method!r}")
    if getattr(adapter.config, "nbl", None) or any(is_linearized(l) for l in adapter.layers()):
        raise ValueError("synthetic_linearize: this model is already linearized; start from the original model")
    chosen = check_layer_list(layers, adapter.num_layers, "synthetic_linearize")
    weights = synthetic_maps(adapter.hidden_size, chosen, seed=seed, scale=scale) if method == "nbl" else None
    apply_structure(model, adapter, method, chosen, weights, None)
    setattr(model, SUMMARY_ATTR, {"synthetic_maps": {"method": method, "layers": chosen, "seed": seed,
                                                     "scale": scale if method == "nbl" else None,
                                                     "note": "random maps for speed measurements, not calibrated"}})
    return model


# --- timing ------------------------------------------------------------------------------------


class _Clock:
    """Marks on one device's timeline: CUDA events (no host sync) or perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Each mark's time after the first, in seconds (waits for the device)."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.marks[0].elapsed_time(e) / 1e3 for e in self.marks]
        return [t - self.marks[0] for t in self.marks]


def time_call(device: str | torch.device, fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes on ``device``'s timeline (CUDA events, waited for; perf_counter on CPU)."""
    clock = _Clock(torch.device(device))
    clock.mark()
    fn()
    clock.mark()
    return clock.seconds()[-1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock_processor(clock: _Clock):
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        """Marks the clock once per generated token (after generate's own logits processors)."""

        def __call__(self, input_ids, scores):
            clock.mark()
            return scores

    return StepClock()


def cache_bytes(cache: Any) -> int:
    """Bytes of the key/value tensors an HF cache actually holds (DummyLayer slots hold none)."""
    n = 0
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
    return n


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _eos_ids(model: nn.Module) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _greedy(logits: torch.Tensor, eos: torch.Tensor | None) -> torch.Tensor:
    """Greedy token of each row, the EOS logits masked as generate's min_new_tokens does: (batch, 1)."""
    scores = logits.float()
    if eos is not None:
        scores = scores.index_fill(-1, eos, float("-inf"))
    return scores.argmax(-1, keepdim=True)


def _prefill(model: nn.Module, prompt: torch.Tensor, cache: Any, chunk: int | None) -> torch.Tensor:
    """Forward of the prompt into ``cache`` (in chunks of ``chunk`` tokens if given): last-position logits."""
    logits = None
    step = chunk or prompt.shape[1]
    for s in range(0, prompt.shape[1], step):
        logits = model(prompt[:, s:s + step], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1]


class _PeakMemory:
    """Peak memory over a block, for the generation and the calibration measurements alike.

    ``host``: the process's peak RSS growth (VmHWM, reset at the start, minus VmRSS at the
    start); ``cuda``: ``torch.cuda.max_memory_allocated`` (weights included) and
    ``cuda_growth`` over the start, on CUDA devices. ``value`` is the one number a
    generation run reports: ``cuda`` on CUDA, ``host`` elsewhere.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host: int | None = None
        self.cuda: int | None = None
        self.cuda_growth: int | None = None

    def __enter__(self) -> "_PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda0 = torch.cuda.memory_allocated(self.device)
        self._rss0 = _proc_status("VmRSS")
        self._reset = _reset_peak_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.cuda = int(torch.cuda.max_memory_allocated(self.device))
            self.cuda_growth = self.cuda - self._cuda0
        hwm = _proc_status("VmHWM")
        if self._reset and self._rss0 is not None and hwm is not None:
            self.host = max(0, hwm - self._rss0)

    @property
    def value(self) -> int | None:
        return self.cuda if self.device.type == "cuda" else self.host

    @property
    def method(self) -> str:
        host = ("host: peak RSS (VmHWM, reset at the start) minus RSS at the start: the growth over the loaded "
                "model; a lower bound where the allocator reuses memory kept from earlier work"
                if self.host is not None else "host: unavailable (the RSS high-water mark cannot be reset here)")
        if self.device.type == "cuda":
            host += "; CUDA: torch.cuda.max_memory_allocated (weights included) and its growth over the start"
        return host


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so that the peak is measured
    from here on and not the import-time peak. False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _check_int(name: str, value: Any, low: int, where: str = "time_generation") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{where}: {name} must be {what}, got {value!r}")
    return value


def _model_device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


@torch.no_grad()
def time_generation(model: nn.Module, *, batch: int = 1, prompt_len: int = 256, new_tokens: int = 32,
                    mode: str = "eager", warmup: int = 1, repeats: int = 3, compile: bool | str = True,
                    prefill_chunk: int | None = None, seed: int = 0, prompt: torch.Tensor | None = None,
                    return_tokens: bool = False) -> dict[str, Any]:
    """Time greedy generation of ``new_tokens`` tokens after a ``prompt_len``-token prompt, ``batch`` sequences.

    ``mode``: "eager" (HF generate, dynamic cache) or "static" (static cache +
    compiled decode step); see the module docstring for what each times.
    ``warmup`` untimed runs (each a full prefill and :data:`WARMUP_TOKENS` new
    tokens) precede ``repeats`` timed runs. ``compile`` (static mode): True =
    ``torch.compile(mode="reduce-overhead")`` on CUDA, the default inductor
    compile elsewhere; False = no compile; a string = that ``torch.compile``
    backend (e.g. "eager" to check graph capture quickly). ``prefill_chunk``:
    prefill in chunks of that many tokens (long contexts at large batch).
    The prompt is random token ids (``seed``) unless ``prompt`` is given.

    Returns (times in seconds, medians over the timed runs):
      prefill_s          forward of the prompt into the cache (static: plus the first token's selection)
      ttft_s             start of the run to the first generated token (eager: includes generate's set-up)
      decode_step_s      median over every decode step of every timed run (new_tokens - 1 steps per run)
      decode_tokens_per_s  batch / decode_step_s
      e2e_s, e2e_tokens_per_s  whole run; batch * new_tokens / e2e_s
      peak_memory_bytes  CUDA: max_memory_allocated over the warm-up and timed runs (weights included);
                         CPU: the process's peak RSS growth over them (a lower bound: memory the allocator
                         kept from earlier work is reused unseen), or None where it cannot be measured
                         (``peak_memory_method`` says which)
      kv_cache_bytes     key/value tensors the cache holds at the end (eager: prompt + new - 1 positions;
                         static: the allocated prompt + new); linearized layers hold none
      weights_bytes, decode_steps, timer, and the settings.
    With ``return_tokens`` also ``tokens``: the last run's sequences (prompt + new tokens), a tensor.
    """
    if mode not in MODES:
        raise ValueError(f"time_generation: mode must be one of {MODES}, got {mode!r}")
    _check_int("batch", batch, 1)
    _check_int("prompt_len", prompt_len, 1)
    _check_int("new_tokens", new_tokens, 2)
    _check_int("warmup", warmup, 0)
    _check_int("repeats", repeats, 1)
    if prefill_chunk is not None:
        _check_int("prefill_chunk", prefill_chunk, 1)
    device = _model_device(model)
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    if prompt is None:
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    elif tuple(prompt.shape) != (batch, prompt_len):
        raise ValueError(f"time_generation: prompt has shape {tuple(prompt.shape)}, expected ({batch}, {prompt_len})")
    prompt = prompt.to(device)
    eos_list = _eos_ids(model)
    eos = torch.tensor(eos_list, device=device) if eos_list else None
    was_training = model.training
    model.eval()
    try:
        run = _EagerRunner(model, prompt, eos_list, prefill_chunk) if mode == "eager" else \
            _StaticRunner(model, prompt, eos, new_tokens, compile, prefill_chunk)
        prefill, ttft, e2e, steps = [], [], [], []
        with _PeakMemory(device) as peak:  # warm-up included: its first allocations are this run's own
            for _ in range(warmup):
                run(min(new_tokens, WARMUP_TOKENS))
            for _ in range(repeats):
                r = run(new_tokens)
                prefill.append(r["prefill_s"])
                ttft.append(r["ttft_s"])
                e2e.append(r["e2e_s"])
                steps.extend(r["steps"])
    finally:
        model.train(was_training)
    decode_step = statistics.median(steps)
    e2e_med = statistics.median(e2e)
    out: dict[str, Any] = {
        "mode": mode, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "warmup": warmup, "repeats": repeats, "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "compile": run.compile_desc if mode == "static" else None, "prefill_chunk": prefill_chunk,
        "timer": "cuda_events" if device.type == "cuda" else "perf_counter",
        "prefill_s": statistics.median(prefill),
        "ttft_s": statistics.median(ttft),
        "decode_step_s": decode_step,
        "decode_step_min_s": min(steps),
        "decode_step_max_s": max(steps),
        "decode_steps": len(steps),
        "decode_tokens_per_s": batch / decode_step,
        "e2e_s": e2e_med,
        "e2e_tokens_per_s": batch * new_tokens / e2e_med,
        "peak_memory_bytes": peak.value,
        "peak_memory_method": peak.method,
        "kv_cache_bytes": r["kv_cache_bytes"],
        "weights_bytes": _model_bytes(model),
    }
    if return_tokens:
        out["tokens"] = r["tokens"]
    return out


class _EagerRunner:
    """model.generate with the dynamic cache; the step clock inside generate, the prefill timed apart."""

    def __init__(self, model, prompt, eos_list, prefill_chunk):
        from transformers import GenerationConfig

        self.model, self.prompt, self.chunk = model, prompt, prefill_chunk
        self.device = prompt.device
        self.mask = torch.ones_like(prompt)
        pad = eos_list[0] if eos_list else 0
        self.config = lambda n: GenerationConfig(
            max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=eos_list or None,
            pad_token_id=pad, return_dict_in_generate=True, disable_compile=True, prefill_chunk_size=prefill_chunk)

    def __call__(self, n: int) -> dict[str, Any]:
        from transformers import DynamicCache, LogitsProcessorList

        # 1. prefill: the prompt's forward into a fresh dynamic cache (what generate's prefill runs)
        _sync(self.device)
        clock = _Clock(self.device)
        clock.mark()
        cache = DynamicCache(config=self.model.config)
        _prefill(self.model, self.prompt, cache, self.chunk)
        clock.mark()
        prefill_s = clock.seconds()[-1]
        del cache
        # 2. generate, its steps marked from inside
        _sync(self.device)
        clock = _Clock(self.device)
        clock.mark()
        out = self.model.generate(self.prompt, attention_mask=self.mask, generation_config=self.config(n),
                                  logits_processor=LogitsProcessorList([_clock_processor(clock)]))
        clock.mark()
        t = clock.seconds()  # start, one mark per generated token, end
        if len(t) != n + 2 or out.sequences.shape[1] != self.prompt.shape[1] + n:
            raise RuntimeError(f"time_generation: generate produced {out.sequences.shape[1] - self.prompt.shape[1]} "
                               f"tokens with {len(t) - 2} clock marks, expected {n}")
        return {"prefill_s": prefill_s, "ttft_s": t[1], "e2e_s": t[-1],
                "steps": [b - a for a, b in zip(t[1:-2], t[2:-1])],
                "kv_cache_bytes": cache_bytes(out.past_key_values), "tokens": out.sequences}


class _StaticRunner:
    """gpt-fast style: one StaticCache (reset per run), eager prefill, compiled decode step in a loop."""

    def __init__(self, model, prompt, eos, new_tokens, compile, prefill_chunk):
        from transformers import StaticCache

        self.model, self.prompt, self.eos, self.chunk = model, prompt, eos, prefill_chunk
        self.device = prompt.device
        self.cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)
        cache = self.cache

        def step(tok: torch.Tensor) -> torch.Tensor:
            logits = model(tok, past_key_values=cache, use_cache=True).logits[:, -1]
            return _greedy(logits, eos)

        self.cudagraphs = False
        if compile is False:
            self.step, self.compile_desc = step, "none"
        else:
            torch._dynamo.reset()  # a fresh compile per model (guards and CUDA graph pools of earlier ones dropped)
            if isinstance(compile, str):
                self.step = torch.compile(step, backend=compile, fullgraph=True)
                self.compile_desc = f"torch.compile(backend={compile!r}, fullgraph=True)"
            elif self.device.type == "cuda":
                self.step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
                self.compile_desc = "torch.compile(mode='reduce-overhead', fullgraph=True)"
                self.cudagraphs = True
            else:
                self.step = torch.compile(step, fullgraph=True)
                self.compile_desc = "torch.compile(fullgraph=True)"

    def __call__(self, n: int) -> dict[str, Any]:
        self.cache.reset()
        _sync(self.device)
        clock = _Clock(self.device)
        clock.mark()
        tok = _greedy(_prefill(self.model, self.prompt, self.cache, self.chunk), self.eos)
        clock.mark()
        tokens = [tok]
        for _ in range(n - 1):
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
                tok = self.step(tok).clone()  # the graph's output buffer is reused by the next replay
            else:
                tok = self.step(tok)
            tokens.append(tok)
            clock.mark()
        t = clock.seconds()
        return {"prefill_s": t[1], "ttft_s": t[1], "e2e_s": t[-1], "steps": [b - a for a, b in zip(t[1:], t[2:])],
                "kv_cache_bytes": cache_bytes(self.cache), "tokens": torch.cat([self.prompt, *tokens], dim=1)}


# --- floors -------------------------------------------------------------------------------------


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
    def of(cls, obj: Any) -> "Shape":
        """From a shape name (:data:`SHAPES`), a Hugging Face config, or a model."""
        if isinstance(obj, Shape):
            return obj
        if isinstance(obj, str):
            obj = shape_config(obj)
        config = getattr(obj, "config", obj)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        d, h = int(text.hidden_size), int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or d // h
        return cls(hidden=d, layers=int(text.num_hidden_layers), heads=h,
                   kv_heads=int(getattr(text, "num_key_value_heads", None) or h), head_dim=int(head_dim),
                   intermediate=int(text.intermediate_size), vocab=int(text.vocab_size))


def _element_size(dtype: str | torch.dtype) -> int:
    dt = _torch_dtype(dtype, torch.device("cpu"), "floors") if not isinstance(dtype, torch.dtype) else dtype
    return torch.empty((), dtype=dt).element_size()


def decode_cost(shape: Any, *, k: int = 0, method: str = "nbl", batch: int = 1, context: int = 1,
                dtype: str | torch.dtype = torch.bfloat16) -> dict[str, int]:
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
    flops = (2 * batch * (n * mlp_mat + kept * attn_mat + sh.vocab * d)
             + (k * 2 * batch * d * d if method == "nbl" else 0) + kept * 4 * batch * q * context)
    return {"weight_bytes": weights * s, "kv_bytes": kv_elems * s, "bytes": (weights + kv_elems) * s, "flops": flops}


def floors(shape: Any, *, k: int = 0, method: str = "nbl", batch: int = 1, context: int = 1,
           dtype: str | torch.dtype = torch.bfloat16, bandwidth: float | None = None,
           peak_flops: float | None = None) -> dict[str, Any]:
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
        c["bound"] = (None if len(given) < 2 else "memory" if c["memory_s"] >= c["compute_s"] else "compute")
        return c

    orig, lin = variant(0), variant(k)
    return {
        "shape": asdict(Shape.of(shape)), "k": k, "method": method, "batch": batch, "context": context,
        "dtype": str(dtype).removeprefix("torch."), "bandwidth": bandwidth, "peak_flops": peak_flops,
        "original": orig, "linearized": lin,
        "ideal_speedup": orig["bytes"] / lin["bytes"],
        "floor_speedup": (orig["floor_s"] / lin["floor_s"]) if orig["floor_s"] and lin["floor_s"] else None,
    }


@torch.no_grad()
def measure_ceilings(device: str | torch.device, dtype: str | torch.dtype | None = None, *,
                     copy_mib: int | None = None, matmul_n: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Same-run attainable rates: memory bandwidth (a device-to-device copy, bytes read + written) and the
    matmul rate (an n x n x n product in ``dtype``); medians after a warm-up. Defaults: 1 GiB and n = 8192
    on CUDA, 256 MiB and n = 2048 on CPU."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dt = _torch_dtype(dtype, dev, "measure_ceilings")
    mib = copy_mib or (1024 if cuda else 256)
    n = matmul_n or (8192 if cuda else 2048)

    def timed(fn) -> float:
        fn()
        _sync(dev)
        return statistics.median(time_call(dev, fn) for _ in range(repeats))

    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=dev)
    src.fill_(1)
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(n, n, device=dev).to(dt)
    b = torch.randn(n, n, device=dev).to(dt)
    t_mm = timed(lambda: torch.mm(a, b))
    del a, b
    return {"bandwidth_bytes_per_s": 2 * mib * 2**20 / t_copy, "matmul_flops_per_s": 2 * n**3 / t_mm,
            "method": f"median of {repeats}: copy of {mib} MiB (read + write counted); {n}^3 matmul in "
                      f"{str(dt).removeprefix('torch.')}", "device": str(dev)}


# --- comparison -----------------------------------------------------------------------------------


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def compare(model_factory: Callable[[], nn.Module], methods_and_ks: Sequence[tuple[str, int]], *,
            modes: Sequence[str] = ("eager",), batch: int = 1, prompt_len: int = 256, new_tokens: int = 32,
            warmup: int = 1, repeats: int = 3, compile: bool | str = True, prefill_chunk: int | None = None,
            layers_for: Callable[[int, int], list[int]] = last_layers, ceilings: dict[str, Any] | None = None,
            seed: int = 0, log: Callable[[str], None] | None = None, interleave: bool = False) -> dict[str, Any]:
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
        raise ValueError("compare: interleave=True times eager mode only (a static run compiles its own decode "
                         "step, which one round at a time would re-time); run static mode without interleaving")
    original = model_factory()
    adapter = get_adapter(original)
    n = adapter.num_layers
    variants: list[tuple[str, str | None, int]] = [("original", None, 0)]
    for method, k in methods_and_ks:
        if method not in METHODS:
            raise ValueError(f"compare: method must be one of {METHODS}, got {method!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"compare: k must be a positive int, got {k!r}")
        if k > n:
            raise ValueError(f"k={k} is larger than the model's {n} decoder layers")
        variants.append((f"{method}-k{k}", method, k))
    shape = Shape.of(original)
    dtype = next(original.parameters()).dtype
    device = _model_device(original)
    context = prompt_len + new_tokens // 2
    bw = ceilings.get("bandwidth_bytes_per_s") if ceilings else None
    peak = ceilings.get("matmul_flops_per_s") if ceilings else None
    runs: list[dict[str, Any]] = []

    def finish(r: dict[str, Any], name: str, method: str | None, k: int, layers: list[int]) -> dict[str, Any]:
        fl = floors(shape, k=k, method=method or "nbl", batch=batch, context=context, dtype=dtype,
                    bandwidth=bw, peak_flops=peak)
        floor = fl["linearized"]
        r.update(variant=name, method=method, k=k, layers=layers, floor=dict(floor, context=context),
                 ideal_decode_speedup=fl["ideal_speedup"],
                 achieved_bandwidth_bytes_per_s=floor["bytes"] / r["decode_step_s"],
                 pct_of_floor=(100.0 * floor["floor_s"] / r["decode_step_s"]) if floor["floor_s"] else None)
        say(f"  {name} ({r['mode']}): decode {1e3 * r['decode_step_s']:.2f} ms/step, "
            f"prefill {1e3 * r['prefill_s']:.1f} ms")
        return r

    timing = dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, compile=compile,
                  prefill_chunk=prefill_chunk, seed=seed)
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
                    rounds[(name, mode)].append(time_generation(
                        m, mode=mode, warmup=warmup if rnd == 0 else 0, repeats=1, **timing))
        for name, method, k, layers, _ in built:
            for mode in modes:
                runs.append(finish(_merge_rounds(rounds[(name, mode)]), name, method, k, layers))
        del built, original
        _free(device)
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
            _free(device)
    base = {r["mode"]: r for r in runs if r["variant"] == "original"}
    for r in runs:
        o = base[r["mode"]]
        r["vs_original"] = {
            "decode_speedup": o["decode_step_s"] / r["decode_step_s"],
            "prefill_speedup": o["prefill_s"] / r["prefill_s"],
            "e2e_speedup": r["e2e_tokens_per_s"] / o["e2e_tokens_per_s"],
            "kv_cache_ratio": (r["kv_cache_bytes"] / o["kv_cache_bytes"]) if o["kv_cache_bytes"] else None,
            "peak_memory_ratio": (r["peak_memory_bytes"] / o["peak_memory_bytes"])
            if r["peak_memory_bytes"] is not None and o["peak_memory_bytes"] else None,
            "weights_ratio": r["weights_bytes"] / o["weights_bytes"],
        }
    return {
        "settings": {"modes": list(modes), "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                     "warmup": warmup, "repeats": repeats, "prefill_chunk": prefill_chunk, "seed": seed,
                     "interleave": interleave,
                     "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                     "variants": [v[0] for v in variants]},
        "shape": asdict(shape), "num_layers": n, "ceilings": ceilings, "runs": runs,
    }


# --- provenance -----------------------------------------------------------------------------------


def run_info(device: str | torch.device) -> dict[str, Any]:
    """Device, versions and git commit to stamp a benchmark result with."""
    import importlib.metadata

    import nbl_ext

    dev = torch.device(device)
    info: dict[str, Any] = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": {"type": dev.type},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "nbl_ext": nbl_ext.__version__},
        "extension": nbl_ext.extension_info(),
        "git": _git_info(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    for dist in ("transformers", "accelerate"):
        try:
            info["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info["versions"][dist] = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["device"].update(name=props.name, capability=f"{props.major}.{props.minor}",
                              total_memory_bytes=props.total_memory, sm_count=props.multi_processor_count)
    else:
        info["device"].update(name=_cpu_name(), threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_info() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


# --- calibration cost -------------------------------------------------------------------------------
#
# What calibrating costs: time (total and per phase), tokens/s, peak host RSS and peak CUDA memory, of
# ``nbl_ext.calibrate`` (streaming float64 statistics, constant memory in the token count) against the
# reference code's approach (keep every layer's X and A for all tokens on the host, then torch.cov),
# with the floor of the work both do: the forward FLOPs and the Gram FLOPs at same-run rates.

CALIBRATION_METHODS = ("streaming", "store_all")


def calibration_tokens(vocab_size: int, num_samples: int, seq_len: int, *, seed: int = 0) -> torch.Tensor:
    """Random calibration token ids ``(num_samples, seq_len)`` in ``[0, vocab_size)``: the cost of a forward
    does not depend on which tokens it sees (real text is for quality, not for timing)."""
    for name, v in (("vocab_size", vocab_size), ("num_samples", num_samples), ("seq_len", seq_len)):
        _check_int(name, v, 1, "calibration_tokens")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_samples, seq_len), generator=g)


def calibration_cost(shape: Any, *, num_samples: int, seq_len: int, batch_size: int = 1,
                     dtype: str | torch.dtype = torch.bfloat16) -> dict[str, int]:
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
        _check_int(name, v, 1, "calibration_cost")
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
        "tokens": n, "forward_flops": linear + attention, "linear_flops": linear, "attention_flops": attention,
        "gram_flops": gram, "weight_bytes": L * batches * s * (layer_mat + 2 * d),
        "activation_bytes": L * 2 * n * d * s, "bytes": L * batches * s * (layer_mat + 2 * d) + L * 2 * n * d * s,
        "stored_activation_bytes": L * 2 * n * d * s, "state_bytes": 8 * (3 * d * d + 2 * d),
    }


def calibration_floor(cost: dict[str, int], *, matmul_flops_per_s: float | None = None,
                      gram_flops_per_s: float | None = None,
                      bandwidth_bytes_per_s: float | None = None) -> dict[str, Any]:
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
    return {"forward_s": fwd, "gram_s": gram, "compute_s": compute, "memory_s": mem,
            "floor_s": max(known) if known else None,
            "bound": None if len(known) < 2 else ("compute" if compute >= mem else "memory")}


class _PhaseTimes:
    """Seconds spent in the statistics and in the scoring/fit, timed at their boundaries (device synced)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.statistics_s = 0.0
        self.fit_s = 0.0

    @contextlib.contextmanager
    def timing(self, phase: str):
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            setattr(self, phase, getattr(self, phase) + time.perf_counter() - t0)


def _calibrate_module():
    """The module nbl_ext.calibrate (the attribute ``nbl_ext.calibrate`` is the function)."""
    import importlib

    return importlib.import_module("nbl_ext.calibrate")


class _StoredActivations:
    """Stands in for the CovarianceAccumulator inside ``LayerwiseRunner.run``: keeps every (X, A) chunk on
    the host (what the reference code does) instead of folding it into statistics."""

    def __init__(self, dim_x: int, dim_y: int, *, device: torch.device | str | None = None) -> None:
        self.dim_x, self.dim_y = dim_x, dim_y
        self.xs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.count = 0
        self.phases: _PhaseTimes | None = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> "_StoredActivations":
        with self.phases.timing("statistics_s") if self.phases else contextlib.nullcontext():
            if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
                raise ValueError("the layer's input or branch output contains NaN or inf")
            self.xs.append(x.detach().reshape(-1, self.dim_x).to("cpu"))
            self.ys.append(y.detach().reshape(-1, self.dim_y).to("cpu"))
            self.count += self.xs[-1].shape[0]
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.xs, *self.ys))

    def to_accumulator(self, device: torch.device):
        """float64 ``torch.cov`` of the concatenation ``[X | A]`` on ``device``, as a CovarianceAccumulator
        (co-moments = covariance x (n - 1)), so that the same fit and scores run on it. Frees the chunks."""
        from nbl_ext.stats import CovarianceAccumulator

        p = torch.cat([torch.cat(self.xs), torch.cat(self.ys)], dim=1).to(device=device, dtype=torch.float64)
        self.xs.clear()
        self.ys.clear()
        n, dx = p.shape[0], self.dim_x
        cov = torch.cov(p.T) * (n - 1)  # (dx + dy)^2: also the redundant X-A block, as the reference does
        mean = p.mean(dim=0)
        del p
        acc = CovarianceAccumulator(dx, self.dim_y, device=device)
        acc.load_state_dict({"mean_x": mean[:dx], "mean_y": mean[dx:], "m_xx": cov[:dx, :dx],
                             "m_yx": cov[dx:, :dx], "m_yy": cov[dx:, dx:],
                             "count": torch.tensor(n), "dims": torch.tensor([dx, self.dim_y])})
        return acc


def store_all_bytes(model: nn.Module, num_samples: int, seq_len: int) -> int:
    """Host bytes the store-all approach keeps: every layer's X and A for every token, in the model dtype
    (:func:`calibration_cost`'s ``stored_activation_bytes``)."""
    return calibration_cost(Shape.of(model), num_samples=num_samples, seq_len=seq_len,
                            dtype=next(model.parameters()).dtype)["stored_activation_bytes"]


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _calibrate_store_all(model: nn.Module, data: torch.Tensor, *, batch_size: int, ridge: float, progress: bool,
                         phases: _PhaseTimes) -> Any:
    """The reference code's approach on nbl_ext's layer-by-layer forward: every layer's (X, A) for all
    tokens kept on the host, then per layer float64 ``torch.cov`` of the concatenation and the same
    LMMSE fit and scores (``nbl_ext.calibrate.score_layer``) as :func:`nbl_ext.calibrate`."""
    import tempfile

    cal = _calibrate_module()
    from nbl_ext.result import CalibrationResult

    adapter = get_adapter(model)
    device = _model_device(model)
    n_layers = adapter.num_layers

    def stored(dim_x: int, dim_y: int, *, device=None, precision: str = "float32") -> _StoredActivations:
        # store_all keeps the activations and computes float64 covariances at the end:
        # there are no Gram products whose precision could be chosen.
        st = _StoredActivations(dim_x, dim_y, device=device)
        st.phases = phases
        return st

    batches = -(-data.shape[0] // batch_size)
    from nbl_ext.criteria import token_statistics
    from nbl_ext.engine import LayerStats, progress_bar

    pbar = progress_bar(n_layers * batches, progress, "store-all calibration")
    kept: list[tuple[_StoredActivations, torch.Tensor]] = []
    # Boundaries where streaming's activations="auto" puts them, so the two differ in the statistics only.
    in_memory = cal._boundaries_fit(model, adapter, data)
    try:
        with tempfile.TemporaryDirectory(prefix="nbl-bench-spill-") as spill, cal.eval_mode(model):
            runner = cal.LayerwiseRunner(model, adapter, data, batch_size=batch_size,
                                         spill_dir=None if in_memory else Path(spill), pbar=pbar,
                                         accumulator_factory=stored)
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
        with phases.timing("statistics_s"):
            acc = st.to_accumulator(device)
        kept[i] = (None, cos)  # type: ignore[assignment]
        with phases.timing("fit_s"):
            layers.append(cal.score_layer(LayerStats(i, acc, cos), ridge))
        del acc
    meta = {"model_type": adapter.model_type, "num_layers": n_layers, "hidden_size": adapter.hidden_size,
            "num_samples": int(data.shape[0]), "seq_len": int(data.shape[1]), "tokens": int(data.numel()),
            "batch_size": batch_size, "ridge": float(ridge), "method": "store_all (benchmark baseline)"}
    return CalibrationResult(layers, meta)


def time_calibration(model: nn.Module, data: torch.Tensor, *, method: str = "streaming", batch_size: int = 1,
                     ridge: float = 0.0, progress: bool = False, ceilings: dict[str, Any] | None = None,
                     check_memory: bool = True, warmup: bool = True, return_result: bool = False) -> dict[str, Any]:
    """Time and peak memory of calibrating every layer of ``model`` on ``data`` (token ids, (samples, seq_len)).

    ``method``:

    * ``"streaming"``: :func:`nbl_ext.calibrate` exactly as users run it (no ``output_dir``,
      ``activations="auto"``: boundary activations spill to a temporary directory, or stay on a GPU with
      room for them; statistics streamed into float64 accumulators);
    * ``"store_all"``: the reference code's approach, on the same layer-by-layer forward
      (``nbl_ext.calibrate.LayerwiseRunner``): every layer's X and A for all tokens kept on the host in the
      model dtype, then per layer float64 ``torch.cov`` of ``[X | A]`` on the model's device and the same
      fit and scores (``score_layer``). ``check_memory``: refuse (ValueError) when the activations would
      not fit in 90% of the host's available memory.

    Phases (each timed at its boundaries with the device synced, which adds one sync per batch):
    ``statistics_s`` (streaming: ``CovarianceAccumulator.update``; store_all: the host copies and the
    ``torch.cov``), ``fit_s`` (``score_layer``: LMMSE solve, CCA bound, NMSE), and
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
    cal = _calibrate_module()

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"time_calibration: method must be one of {CALIBRATION_METHODS}, got {method!r}")
    _check_int("batch_size", batch_size, 1, "time_calibration")
    adapter = get_adapter(model)
    data = cal.check_token_data(data, adapter.vocab_size, "time_calibration")
    device = _model_device(model)
    dtype = next(model.parameters()).dtype
    num_samples, seq_len = int(data.shape[0]), int(data.shape[1])
    need = store_all_bytes(model, num_samples, seq_len)
    if method == "store_all" and check_memory:
        avail = _available_host_bytes()
        if avail is not None and need > 0.9 * avail:
            raise ValueError(
                f"time_calibration: store_all would keep {need / 2**30:.1f} GiB of activations on the host "
                f"({adapter.num_layers} layers x 2 x {num_samples * seq_len} tokens x {adapter.hidden_size} x "
                f"{dtype.itemsize} bytes) but only {avail / 2**30:.1f} GiB is available; use fewer tokens "
                "(its memory grows linearly with them; that is the point of streaming)")
    if warmup:  # touch every weight once (lazily mmapped checkpoints count in RSS when first read), warm kernels
        with cal.eval_mode(model):
            model(input_ids=data[:1, : min(seq_len, 16)].to(device), use_cache=False)
    phases = _PhaseTimes(device)
    stored_bytes: list[int] = []
    with _PeakMemory(device) as peak:
        _sync(device)
        t0 = time.perf_counter()
        if method == "streaming":
            from unittest import mock

            from nbl_ext.stats import CovarianceAccumulator

            class TimedAccumulator(CovarianceAccumulator):
                def update(self, x, y):
                    with phases.timing("statistics_s"):
                        return super().update(x, y)

            real_score = cal.score_layer

            def timed_score(*args, **kwargs):
                with phases.timing("fit_s"):
                    return real_score(*args, **kwargs)

            with mock.patch.object(cal, "CovarianceAccumulator", TimedAccumulator), \
                    mock.patch.object(cal, "score_layer", timed_score):
                result = cal.calibrate(model, data, batch_size=batch_size, progress=progress, ridge=ridge)
        else:
            result = _calibrate_store_all(model, data, batch_size=batch_size, ridge=ridge, progress=progress,
                                          phases=phases)
            stored_bytes.append(need)
        _sync(device)
        total = time.perf_counter() - t0
    tokens = num_samples * seq_len
    cost = calibration_cost(Shape.of(model), num_samples=num_samples, seq_len=seq_len, batch_size=batch_size,
                            dtype=dtype)
    rates = ceilings or {}
    floor = calibration_floor(cost, matmul_flops_per_s=rates.get("matmul_flops_per_s"),
                              gram_flops_per_s=rates.get("gram_flops_per_s") or (
                                  rates.get("matmul_flops_per_s") if dtype == torch.float32 else None),
                              bandwidth_bytes_per_s=rates.get("bandwidth_bytes_per_s"))
    out: dict[str, Any] = {
        "method": method, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "num_layers": adapter.num_layers, "hidden_size": adapter.hidden_size, "num_samples": num_samples,
        "seq_len": seq_len, "tokens": tokens, "batch_size": batch_size, "timer": "perf_counter (device synced)",
        "total_s": total, "tokens_per_s": tokens / total,
        "forward_s": max(0.0, total - phases.statistics_s - phases.fit_s),
        "statistics_s": phases.statistics_s, "fit_s": phases.fit_s,
        "peak_host_bytes": peak.host, "peak_cuda_bytes": peak.cuda, "peak_cuda_growth_bytes": peak.cuda_growth,
        "peak_memory_method": peak.method,
        "stored_activation_bytes": stored_bytes[0] if stored_bytes else 0,
        "cost": cost, "floor": floor, "ceilings": ceilings,
        "pct_of_floor": 100.0 * floor["floor_s"] / total if floor["floor_s"] else None,
        "bounds": result.bounds, "nmse": result.nmse, "cosines": result.cosines,
    }
    if return_result:
        out["result"] = result
    return out


def calibration_ceilings(device: str | torch.device, dtype: str | torch.dtype | None = None) -> dict[str, Any]:
    """:func:`measure_ceilings` in the model dtype plus ``gram_flops_per_s``: the float32 matmul rate (the
    statistics' Gram products are float32 GEMMs whatever the model dtype)."""
    dev = torch.device(device)
    c = measure_ceilings(dev, dtype)
    dt = _torch_dtype(dtype, dev, "calibration_ceilings")
    c["gram_flops_per_s"] = c["matmul_flops_per_s"] if dt == torch.float32 else \
        measure_ceilings(dev, torch.float32)["matmul_flops_per_s"]
    c["method"] += "; gram rate: the same matmul in float32"
    return c


def compare_calibration(model: nn.Module, sample_counts: Sequence[int], *, seq_len: int = 2048,
                        methods: Sequence[str] = CALIBRATION_METHODS, batch_size: int = 1,
                        ceilings: dict[str, Any] | None = None, seed: int = 0, progress: bool = False,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
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
                r = time_calibration(model, data[:count], method=m, batch_size=batch_size, ceilings=ceilings,
                                     progress=progress)
            except ValueError as exc:
                if m != "store_all" or "would keep" not in str(exc):
                    raise
                runs.append({"method": m, "num_samples": count, "seq_len": seq_len, "tokens": count * seq_len,
                             "skipped": str(exc)})
                say(f"  skipped: {exc}")
                continue
            runs.append(r)
            say(f"  {r['total_s']:.1f} s, {r['tokens_per_s']:,.0f} tokens/s")
            _free(_model_device(model))
    base = {r["tokens"]: r for r in runs if r["method"] == "streaming" and "skipped" not in r}
    for r in runs:
        o = base.get(r["tokens"])
        if o is None or "skipped" in r:
            continue
        r["vs_streaming"] = {
            "time_ratio": r["total_s"] / o["total_s"],
            "peak_host_ratio": (r["peak_host_bytes"] / o["peak_host_bytes"])
            if r["peak_host_bytes"] is not None and o["peak_host_bytes"] else None,
            "peak_cuda_ratio": (r["peak_cuda_bytes"] / o["peak_cuda_bytes"])
            if r["peak_cuda_bytes"] is not None and o["peak_cuda_bytes"] else None,
        }
    return {"settings": {"sample_counts": counts, "seq_len": seq_len, "methods": list(methods),
                         "batch_size": batch_size, "seed": seed, "data": "random token ids"},
            "ceilings": ceilings, "runs": runs}
