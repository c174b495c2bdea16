"""Tiny random-weight Hugging Face models of every supported family, and generation oracles."""

from __future__ import annotations

import contextlib
import importlib

import torch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
VOCAB = 256


def tiny_config(family: str, num_layers: int = 3, **overrides):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        attn_implementation="sdpa",
    )
    if family == "llama":
        cfg = dict(common)
    elif family == "mistral":  # uniform sliding window, smaller than the generated length
        cfg = dict(common, sliding_window=7, head_dim=8)
    elif family == "qwen2":  # sliding window on layers >= max_window_layers: full and sliding layers mixed
        cfg = dict(common, use_sliding_window=True, sliding_window=7, max_window_layers=1)
    elif family == "qwen3":
        cfg = dict(common, head_dim=8)
    elif family == "gemma3_text":  # sliding + full layers, q/k norms, sandwich norms, tied embeddings
        types = (["sliding_attention", "full_attention", "sliding_attention", "full_attention"] * 4)[:num_layers]
        cfg = dict(
            common,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=6,
            layer_types=types,
        )
    else:
        raise ValueError(family)
    cfg.update(overrides)
    cls = {
        "llama": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
        "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config,
        "gemma3_text": tf.Gemma3TextConfig,
    }[family]
    return cls(**cfg)


def tiny_model(family: str, num_layers: int = 3, seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # dtype through from_config (not .to()): like from_pretrained, RoPE buffers stay float32
    return AutoModelForCausalLM.from_config(tiny_config(family, num_layers, **overrides), dtype=dtype).eval()


def token_data(num_samples: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (num_samples, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_recompute(model, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax decoding re-running the full sequence every step without a cache: (tokens, step logits)."""
    seq, logits = prompt, []
    for _ in range(steps):
        last = model(seq, use_cache=False).logits[:, -1]
        logits.append(last)
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq, torch.stack(logits, 1)


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, steps: int, **kwargs):
    """model.generate (greedy, with its cache): (tokens, step logits, the cache).

    EOS is disabled (not suppressed: min_new_tokens would mask the EOS logit,
    which the recompute oracle does not) so exactly ``steps`` tokens come out.
    """
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=steps,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
            **kwargs,
        )
    finally:
        model.generation_config.eos_token_id = eos
    assert out.sequences.shape[1] == prompt.shape[1] + steps
    return out.sequences, torch.stack(out.logits, 1), out.past_key_values


def cache_slot_bytes(cache) -> list[int]:
    """Bytes held by each slot of an HF cache (keys + values tensors)."""
    out = []
    for layer in cache.layers:
        n = 0
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
        out.append(n)
    return out


@contextlib.contextmanager
def spy_updates():
    """Record every (x, y) chunk that calibration streams into its accumulators, in order."""
    mod = importlib.import_module("nbl_ext.calibrate")  # the module (nbl_ext.calibrate is the function)
    seen: list = []
    original = mod.CovarianceAccumulator

    class Spy(original):
        def update(self, x, y):
            seen.append((x.detach().clone(), y.detach().clone()))
            return super().update(x, y)

    mod.CovarianceAccumulator = Spy
    try:
        yield seen
    finally:
        mod.CovarianceAccumulator = original
