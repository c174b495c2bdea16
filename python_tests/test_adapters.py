"""Adapters: family lookup, and calibration capturing exactly X and A for every family."""

from __future__ import annotations

import pytest
import torch

import nbl_ext
from hf_tiny import (
    FAMILIES,
    cache_slot_bytes,
    greedy_generate,
    greedy_recompute,
    spy_updates,
    tiny_model,
    token_data,
)
from nbl_ext import adapters
from nbl_ext.engine import record_layer_call

EXPECTED = {
    "llama": adapters.LlamaAdapter,
    "mistral": adapters.MistralAdapter,
    "qwen2": adapters.Qwen2Adapter,
    "qwen3": adapters.Qwen3Adapter,
    "gemma3_text": adapters.Gemma3Adapter,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_get_adapter_by_model_type(family):
    model = tiny_model(family, 2)
    adapter = nbl_ext.get_adapter(model)
    assert type(adapter) is EXPECTED[family]
    assert adapter.num_layers == 2 and len(adapter.layers()) == 2 and adapter.hidden_size == 32


def test_unknown_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*supported model types: .*gemma3_text.*llama"):
        nbl_ext.get_adapter(model)
    with pytest.raises(ValueError, match="does not support model_type 'gpt2'"):
        nbl_ext.calibrate(model, torch.zeros(1, 4, dtype=torch.long), progress=False)
    with pytest.raises(TypeError, match="Hugging Face model"):
        nbl_ext.get_adapter(torch.nn.Linear(2, 2))


def _manual_branch(family, layer, x, kwargs):
    """A computed by hand from the layer's submodules (independent of the adapter)."""
    attn = layer.self_attn(
        hidden_states=layer.input_layernorm(x),
        position_embeddings=kwargs["position_embeddings"],
        attention_mask=kwargs.get("attention_mask"),
        position_ids=kwargs.get("position_ids"),
    )[0]
    return layer.post_attention_layernorm(attn) if family == "gemma3_text" else attn


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_captures_exactly_x_and_a(family):
    """X = the residual stream entering layer i (HF's hidden_states[i]); A = the branch output before the add."""
    model = tiny_model(family, 3)
    data = token_data(2, 40)  # 80 tokens > hidden size 32: a well-posed fit
    with spy_updates() as seen:
        nbl_ext.calibrate(model, data, batch_size=1, progress=False)
    assert len(seen) == 3 * 2  # layers x batches, in that order
    adapter = nbl_ext.get_adapter(model)
    with torch.no_grad():
        for b in range(2):
            ids = data[b : b + 1]
            hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
            for i in range(3):
                x, a = seen[i * 2 + b]
                torch.testing.assert_close(x, hidden[i], rtol=1e-6, atol=1e-6)
                _, kwargs = record_layer_call(model, adapter, ids, i)
                layer = adapter.layers()[i]
                torch.testing.assert_close(a, _manual_branch(family, layer, x, kwargs), rtol=1e-6, atol=1e-6)
                # The adapter's MLP half completes the layer: out = mlp_half(X + A).
                out = layer(x, **kwargs)
                torch.testing.assert_close(adapter.mlp_half(layer, x + a), out, rtol=1e-6, atol=1e-6)


def test_multimodal_gemma3_uses_its_language_model(tmp_path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from hf_tiny import tiny_config

    text = tiny_config("gemma3_text", 2).to_dict()
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(
        Gemma3Config(text_config=text, vision_config=vision.to_dict(), mm_tokens_per_image=4)
    ).eval()
    adapter = nbl_ext.get_adapter(model)
    assert type(adapter) is adapters.Gemma3Adapter
    assert adapter.layers() is model.model.language_model.layers
    assert adapter.hidden_size == 32 and adapter.num_layers == 2
    # text-only calibration, linearization of layer 0, exact cached generation, round trip
    result = nbl_ext.calibrate(model, token_data(3, 40) % 200, progress=False)
    nbl_ext.linearize(model, result, [0])
    assert model.config.text_config.kv_sharing_modes == ["reuse", None] and model.config.nbl["layers"] == [0]
    prompt = token_data(1, 6, seed=5) % 200
    ref, _ = greedy_recompute(model, prompt, 8)
    tokens, _, cache = greedy_generate(model, prompt, 8, cache_implementation="static")
    assert torch.equal(tokens, ref) and cache_slot_bytes(cache)[0] == 0
    nbl_ext.save_pretrained(model, tmp_path / "mm")
    loaded = nbl_ext.load_pretrained(tmp_path / "mm")
    assert (
        isinstance(loaded, Gemma3ForConditionalGeneration)
        and type(loaded).__name__ == "NBLGemma3ForConditionalGeneration"
    )
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, model(prompt).logits)
