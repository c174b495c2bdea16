"""Generation latency of a model (original, NBL-linearized or DROP): prefill, decode, KV memory.

The measurement follows pytorch-labs/gpt-fast: prefill and decode are timed separately, decode as a
median per-token step (:func:`nbl_ext.benchmark.compare` sets each variant against its floor)::

    time_generation(model, batch=1, prompt_len=2048, new_tokens=2048, mode="static")

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

import statistics
from typing import Any

import torch
from torch import nn

from nbl_ext.benchmark.timing import Clock, PeakMemory, model_device, sync
from nbl_ext.validation import check_count

MODES = ("eager", "static")
#: New tokens of a warm-up run (its prefill is full length): enough to compile, capture CUDA graphs
#: and warm the kernels; decode shapes do not depend on the position (the static cache is full size).
WARMUP_TOKENS = 8


def _clock_processor(clock: Clock):
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
        logits = model(prompt[:, s : s + step], past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    return logits[:, -1]


@torch.no_grad()
def time_generation(
    model: nn.Module,
    *,
    batch: int = 1,
    prompt_len: int = 256,
    new_tokens: int = 32,
    mode: str = "eager",
    warmup: int = 1,
    repeats: int = 3,
    compile: bool | str = True,
    prefill_chunk: int | None = None,
    seed: int = 0,
    prompt: torch.Tensor | None = None,
    return_tokens: bool = False,
) -> dict[str, Any]:
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
    check_count(batch, "batch", 1, what="time_generation")
    check_count(prompt_len, "prompt_len", 1, what="time_generation")
    check_count(new_tokens, "new_tokens", 2, what="time_generation")
    check_count(warmup, "warmup", 0, what="time_generation")
    check_count(repeats, "repeats", 1, what="time_generation")
    if prefill_chunk is not None:
        check_count(prefill_chunk, "prefill_chunk", 1, what="time_generation")
    device = model_device(model)
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
        run = (
            _EagerRunner(model, prompt, eos_list, prefill_chunk)
            if mode == "eager"
            else _StaticRunner(model, prompt, eos, new_tokens, compile, prefill_chunk)
        )
        prefill, ttft, e2e, steps = [], [], [], []
        with PeakMemory(device) as peak:  # warm-up included: its first allocations are this run's own
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
        "mode": mode,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "repeats": repeats,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "compile": run.compile_desc if mode == "static" else None,
        "prefill_chunk": prefill_chunk,
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
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_list or None,
            pad_token_id=pad,
            return_dict_in_generate=True,
            disable_compile=True,
            prefill_chunk_size=prefill_chunk,
        )

    def __call__(self, n: int) -> dict[str, Any]:
        from transformers import DynamicCache, LogitsProcessorList

        # 1. prefill: the prompt's forward into a fresh dynamic cache (what generate's prefill runs)
        sync(self.device)
        clock = Clock(self.device)
        clock.mark()
        cache = DynamicCache(config=self.model.config)
        _prefill(self.model, self.prompt, cache, self.chunk)
        clock.mark()
        prefill_s = clock.seconds()[-1]
        del cache
        # 2. generate, its steps marked from inside
        sync(self.device)
        clock = Clock(self.device)
        clock.mark()
        out = self.model.generate(
            self.prompt,
            attention_mask=self.mask,
            generation_config=self.config(n),
            logits_processor=LogitsProcessorList([_clock_processor(clock)]),
        )
        clock.mark()
        t = clock.seconds()  # start, one mark per generated token, end
        if len(t) != n + 2 or out.sequences.shape[1] != self.prompt.shape[1] + n:
            raise RuntimeError(
                f"time_generation: generate produced {out.sequences.shape[1] - self.prompt.shape[1]} "
                f"tokens with {len(t) - 2} clock marks, expected {n}"
            )
        return {
            "prefill_s": prefill_s,
            "ttft_s": t[1],
            "e2e_s": t[-1],
            "steps": [b - a for a, b in zip(t[1:-2], t[2:-1])],
            "kv_cache_bytes": cache_bytes(out.past_key_values),
            "tokens": out.sequences,
        }


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
        sync(self.device)
        clock = Clock(self.device)
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
        return {
            "prefill_s": t[1],
            "ttft_s": t[1],
            "e2e_s": t[-1],
            "steps": [b - a for a, b in zip(t[1:], t[2:])],
            "kv_cache_bytes": cache_bytes(self.cache),
            "tokens": torch.cat([self.prompt, *tokens], dim=1),
        }
