"""linearize(): exact generation with dynamic/static caches, no KV for linearized layers, errors, compile, refit."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import nbl_ext
from hf_tiny import (
    FAMILIES,
    cache_slot_bytes,
    greedy_generate,
    greedy_recompute,
    tiny_model,
    token_data,
)
from nbl_ext.engine import record_layer_call

N_LAYERS = 4
STEPS = 10  # prompt 6 + 10 new tokens: longer than every sliding window in hf_tiny
_CALIBRATED: dict = {}


def calibrated(family: str):
    """(model, result) per family, calibrated once per session; tests work on deep copies."""
    if family not in _CALIBRATED:
        model = tiny_model(family, N_LAYERS)
        _CALIBRATED[family] = (model, nbl_ext.calibrate(model, token_data(3, 40), batch_size=3, progress=False))
    return _CALIBRATED[family]


def linearized(family: str, layers, method: str = "nbl"):
    model, result = calibrated(family)
    return nbl_ext.linearize(copy.deepcopy(model), result, layers, method=method)


def _prompt():
    return token_data(1, 6, seed=5)


def assert_generation_exact(model, removed):
    """Greedy generate with a dynamic and a static cache == argmax of full recomputes; no KV for removed layers."""
    prompt = _prompt()
    ref_tokens, ref_logits = greedy_recompute(model, prompt, STEPS)
    for impl in ("dynamic", "static"):
        tokens, logits, cache = greedy_generate(model, prompt, STEPS, cache_implementation=impl)
        assert torch.equal(tokens, ref_tokens), impl
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        kv = cache_slot_bytes(cache)
        assert len(kv) == N_LAYERS
        for i in range(N_LAYERS):
            if i in removed:
                assert kv[i] == 0, (impl, i, kv)
            else:
                assert kv[i] > 0, (impl, i, kv)


@pytest.mark.parametrize(
    "layers", [[0], [0, N_LAYERS - 1], list(range(N_LAYERS - 1))], ids=["first", "first+last", "all-but-one"]
)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_full_recompute(family, layers):
    model = linearized(family, layers)
    assert_generation_exact(model, set(layers))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_drop_generation_is_exact(family):
    model = linearized(family, [0, 2], method="drop")
    assert_generation_exact(model, {0, 2})


@pytest.mark.parametrize("method", ["nbl", "drop"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_all_layers_linearized_still_generates(family, method):
    """No attention left: nothing is cached anywhere, and cached generation still equals recompute."""
    model = linearized(family, list(range(N_LAYERS)), method=method)
    prompt = _prompt()
    ref_tokens, ref_logits = greedy_recompute(model, prompt, STEPS)
    for impl in ("dynamic", "static"):
        tokens, logits, cache = greedy_generate(model, prompt, STEPS, cache_implementation=impl)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert sum(cache_slot_bytes(cache)) == 0
    tokens, _, _ = greedy_generate(model, prompt, STEPS, use_cache=False)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("with_config", [True, False], ids=["DynamicCache(config)", "DynamicCache()"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_manual_decoding_with_a_user_cache(family, with_config):
    """The model's own forward (positions from cache.get_seq_length()) with layer 0 linearized."""
    from transformers import DynamicCache

    model = linearized(family, [0, 2])
    prompt = _prompt()
    ref_tokens, ref_logits = greedy_recompute(model, prompt, STEPS)
    cache = DynamicCache(config=model.config) if with_config else DynamicCache()
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1]
        for step in range(STEPS):
            torch.testing.assert_close(logits, ref_logits[:, step], rtol=1e-4, atol=1e-4)
            nxt = ref_tokens[:, prompt.shape[1] + step : prompt.shape[1] + step + 1]
            logits = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    assert cache.get_seq_length() == prompt.shape[1] + STEPS
    kv = cache_slot_bytes(cache)
    assert kv[0] == 0 and kv[2] == 0 and kv[1] > 0 and kv[3] > 0


def test_kv_memory_is_only_for_live_layers():
    original, _ = calibrated("llama")
    model = linearized("llama", [0, 3])
    for impl in ("dynamic", "static"):
        _, _, full = greedy_generate(original, _prompt(), STEPS, cache_implementation=impl)
        _, _, lin = greedy_generate(model, _prompt(), STEPS, cache_implementation=impl)
        full_kv, lin_kv = cache_slot_bytes(full), cache_slot_bytes(lin)
        assert lin_kv == [0, full_kv[1], full_kv[2], 0], impl
        assert sum(lin_kv) == sum(full_kv) // 2


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_linearized_layer_math_and_bookkeeping(family):
    original, result = calibrated(family)
    model = linearized(family, [1])
    adapter = nbl_ext.get_adapter(model)
    layer = adapter.layers()[1]
    assert isinstance(layer, type(nbl_ext.get_adapter(original).layers()[1]))  # still the HF class (hooks, isinstance)
    for name in adapter.branch_modules:
        assert not hasattr(layer, name)
    assert layer.nbl_affine.weight.dtype == torch.float32
    assert "model.layers.1.nbl_affine.weight" in model.state_dict()
    assert not any(k.startswith("model.layers.1.self_attn") for k in model.state_dict())
    n_orig = sum(p.numel() for p in original.parameters())
    n_lin = sum(p.numel() for p in model.parameters())
    attn = sum(
        p.numel()
        for n in adapter.branch_modules
        for p in getattr(nbl_ext.get_adapter(original).layers()[1], n).parameters()
    )
    assert n_lin == n_orig - attn + 32 * 32 + 32
    ids = token_data(1, 12, seed=4)
    x = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(0))
    _, kwargs = record_layer_call(model, adapter, ids, 1)
    w, b = result.layers[1].weight.float(), result.layers[1].bias.float()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, **kwargs), adapter.mlp_half(layer, x + x @ w.T + b))
    with torch.no_grad():  # HF's output capture still sees every decoder layer (isinstance-based hooks)
        assert len(model(ids, output_hidden_states=True).hidden_states) == N_LAYERS + 1
    nbl = model.config.nbl
    assert nbl["method"] == "nbl" and nbl["layers"] == [1] and nbl["refit"] is None
    assert model.config.get_text_config(decoder=True).kv_sharing_modes == [None, "reuse", None, None]
    assert nbl_ext.get_adapter(original).layers()[1].self_attn is not None  # the copy, not the original, changed

    dropped = linearized(family, [2], method="drop")
    dl = nbl_ext.get_adapter(dropped).layers()[2]
    assert not hasattr(dl, "nbl_affine")
    with torch.no_grad():
        torch.testing.assert_close(dl(x, **kwargs), adapter.mlp_half(dl, x))


def test_bad_arguments_are_clear_errors():
    original, result = calibrated("llama")
    m = copy.deepcopy(original)
    for layers, exc, msg in (
        ([4], ValueError, "out of range.*4 layers"),
        ([-1], ValueError, "out of range"),
        ([1, 1], ValueError, "unique"),
        ([1.0], TypeError, "ints"),
        (2, TypeError, "list of layer"),
        ("0", TypeError, "list of layer"),
    ):
        with pytest.raises(exc, match=msg):
            nbl_ext.linearize(m, result, layers)
    with pytest.raises(ValueError, match="method"):
        nbl_ext.linearize(m, result, [0], method="prune")
    with pytest.raises(ValueError, match="needs the CalibrationResult"):
        nbl_ext.linearize(m, None, [0])
    with pytest.raises(ValueError, match="refit"):
        nbl_ext.linearize(m, result, [0], refit="parallel")
    with pytest.raises(ValueError, match="needs calibration token ids"):
        nbl_ext.linearize(m, result, [0], refit="sequential")
    with pytest.raises(ValueError, match="method='nbl' only"):
        nbl_ext.linearize(m, result, [0], method="drop", refit="sequential", data=token_data(2, 40))
    _, other = calibrated("qwen3")
    with pytest.raises(ValueError, match="does not match the model.*model_type"):
        nbl_ext.linearize(m, other, [0])
    broken = copy.copy(result)
    broken.layers = list(result.layers)
    broken.layers[3] = copy.copy(result.layers[3])
    broken.layers[3].weight = torch.full((32, 32), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="map of layer 3 contains NaN"):
        nbl_ext.linearize(m, broken, [0, 3])
    assert not hasattr(m.config, "nbl")  # nothing was changed by the failed calls
    nbl_ext.linearize(m, result, [0])
    with pytest.raises(ValueError, match="already linearized"):
        nbl_ext.linearize(m, result, [1])
    with pytest.raises(ValueError, match="already linearized; calibrate the original model"):
        nbl_ext.calibrate(m, token_data(2, 40), progress=False)
    assert nbl_ext.linearize(copy.deepcopy(original), None, [1], method="drop").config.nbl["method"] == "drop"


def test_torch_compile_matches_eager():
    """Dynamo captures the linearized model in one graph (aot_eager keeps the test fast on CPU).

    Set NBL_TEST_INDUCTOR=1 to also compile with inductor (about a minute on 2 cores).
    """
    model = linearized("llama", [0, 2])
    ids = token_data(2, 16, seed=3)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, eager, rtol=1e-5, atol=1e-5)
        # compiled decoding with a static cache (DummyLayer slots for the linearized layers 0 and 2)
        from transformers import StaticCache

        compiled = torch.compile(model, backend="eager", fullgraph=True)  # dynamo capture; aot tracing is slow
        cache = StaticCache(config=model.config, max_cache_len=32)
        compiled(ids[:1, :8], past_key_values=cache, use_cache=True)
        for p in range(8, 12):
            step = compiled(ids[:1, p : p + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(step, eager[:1, p], rtol=1e-4, atol=1e-4)
        assert cache_slot_bytes(cache)[0] == cache_slot_bytes(cache)[2] == 0
        if os.environ.get("NBL_TEST_INDUCTOR") == "1":
            compiled = torch.compile(model)
            torch.testing.assert_close(compiled(ids, use_cache=False).logits, eager, rtol=1e-4, atol=1e-4)


def _branch_oracle(model, adapter, data, i):
    """Least-squares (W, b) of layer i's branch output on its input, by a full forward + manual branch."""
    xs, as_ = [], []
    with torch.no_grad():
        for s in range(data.shape[0]):
            ids = data[s : s + 1]
            x = model(ids, output_hidden_states=True, use_cache=False).hidden_states[i]
            _, kwargs = record_layer_call(model, adapter, ids, i)
            layer = adapter.layers()[i]
            a = layer.self_attn(
                hidden_states=layer.input_layernorm(x),
                position_embeddings=kwargs["position_embeddings"],
                attention_mask=kwargs.get("attention_mask"),
            )[0]
            xs.append(x.reshape(-1, x.shape[-1]))
            as_.append(a.reshape(-1, a.shape[-1]))
    x, a = torch.cat(xs).double(), torch.cat(as_).double()
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    coef = torch.linalg.lstsq(design, a).solution
    return coef[:-1].T, coef[-1]


def test_sequential_refit():
    """Each refitted map is the least-squares fit on the inputs the partially linearized model produces."""
    original = tiny_model("llama", N_LAYERS, dtype=torch.float64)
    data = token_data(3, 40)
    result = nbl_ext.calibrate(original, data, batch_size=3, progress=False)
    model = nbl_ext.linearize(copy.deepcopy(original), result, [1, 3], refit="sequential", data=data, batch_size=2)
    assert model.config.nbl["refit"] == "sequential" and model.config.nbl["layers"] == [1, 3]
    layers = nbl_ext.get_adapter(model).layers()
    # Layer 1 sees the same inputs as in calibration: same map.
    torch.testing.assert_close(layers[1].nbl_affine.weight, result.layers[1].weight, rtol=1e-9, atol=1e-10)
    # Layer 3's map is fitted on the model whose layer 1 is linearized, not on the original.
    partial = copy.deepcopy(original)
    refit_l1 = copy.copy(result)
    refit_l1.layers = list(result.layers)
    nbl_ext.linearize(partial, refit_l1, [1])
    w3, b3 = _branch_oracle(partial, nbl_ext.get_adapter(partial), data, 3)
    torch.testing.assert_close(layers[3].nbl_affine.weight, w3, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(layers[3].nbl_affine.bias, b3, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(layers[3].nbl_affine.weight, result.layers[3].weight, atol=1e-6)
    prompt = _prompt()
    ref_tokens, _ = greedy_recompute(model, prompt, STEPS)
    tokens, _, _ = greedy_generate(model, prompt, STEPS)
    assert torch.equal(tokens, ref_tokens)
