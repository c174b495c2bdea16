"""Checkpoints load through transformers' own from_pretrained after ``import nbl_ext``, and loudly never without.

Every family on a tiny config: identical logits and exact cached generation after
AutoModelForCausalLM.from_pretrained (meta-device construction, dtype, sharded safetensors, device_map
with CPU and disk offload); the plain-transformers failure and the remote-code load each in a fresh
process where nbl_ext cannot be imported; checkpoints of the earlier format; calibration of an
offloaded model.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nbl_ext
from hf_tiny import FAMILIES, cache_slot_bytes, greedy_generate, greedy_recompute, tiny_model, token_data

linearize_mod = importlib.import_module("nbl_ext.linearize")  # the module (nbl_ext.linearize is the function)

N_LAYERS = 4
_CACHE: dict = {}


def _checkpoint(tmp_path_factory, family: str, layers=(0, N_LAYERS - 1), method: str = "nbl", **save_kwargs):
    """(linearized model, its checkpoint directory); calibrated once per (family, layers, method, save options)."""
    key = (family, tuple(layers), method, tuple(sorted(save_kwargs.items())))
    if key not in _CACHE:
        model = tiny_model(family, N_LAYERS)
        result = nbl_ext.calibrate(model, token_data(3, 40), batch_size=3, progress=False)
        nbl_ext.linearize(model, result if method == "nbl" else None, list(layers), method=method)
        path = tmp_path_factory.mktemp(f"ckpt-{family}") / "ckpt"
        nbl_ext.save_pretrained(model, path, **save_kwargs)
        _CACHE[key] = (model, path)
    return _CACHE[key]


def _logits(model, ids=None):
    with torch.no_grad():
        return model(token_data(2, 16, seed=11) if ids is None else ids, use_cache=False).logits


def _assert_generation_exact(model, removed):
    prompt = token_data(1, 6, seed=5)
    ref_tokens, ref_logits = greedy_recompute(model, prompt, 10)
    for impl in ("dynamic", "static"):
        tokens, logits, cache = greedy_generate(model, prompt, 10, cache_implementation=impl)
        assert torch.equal(tokens, ref_tokens), impl
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        kv = cache_slot_bytes(cache)
        assert [kv[i] == 0 for i in range(N_LAYERS)] == [i in removed for i in range(N_LAYERS)], (impl, kv)


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_builds_on_meta_and_gives_identical_logits(family, tmp_path_factory, monkeypatch):
    from transformers import AutoModelForCausalLM

    model, path = _checkpoint(tmp_path_factory, family)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == f"nbl_{family}" and config["architectures"] == [type(model).__name__]
    if config.get("tie_word_embeddings"):  # stored once, under the name transformers keeps (loaded in place)
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            assert "model.embed_tokens.weight" in f.keys() and "lm_head.weight" not in f.keys()
    built_on = []
    original = linearize_mod.build_structure

    def spy(m):
        built_on.append(next(m.parameters()).device.type)
        return original(m)

    monkeypatch.setattr(linearize_mod, "build_structure", spy)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert built_on == ["meta"]  # constructed on the meta device: no random init of weights loaded next
    assert type(loaded) is type(model) and type(loaded).__module__ == "nbl_ext.linearize" and not loaded.training
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.config.nbl == model.config.nbl
    text, text0 = loaded.config.get_text_config(decoder=True), model.config.get_text_config(decoder=True)
    assert text.kv_sharing_modes == text0.kv_sharing_modes
    _assert_generation_exact(loaded, {0, N_LAYERS - 1})


def test_multimodal_gemma3_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from hf_tiny import tiny_config

    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(
        Gemma3Config(
            text_config=tiny_config("gemma3_text", 2).to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
        )
    ).eval()
    result = nbl_ext.calibrate(model, token_data(3, 40) % 200, progress=False)
    nbl_ext.linearize(model, result, [0])
    nbl_ext.save_pretrained(model, tmp_path / "mm")
    assert json.loads((tmp_path / "mm" / "config.json").read_text())["model_type"] == "nbl_gemma3"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mm")
    assert isinstance(loaded, Gemma3ForConditionalGeneration) and type(loaded) is type(model)
    prompt = token_data(1, 6, seed=5) % 200
    assert torch.equal(_logits(loaded, prompt), _logits(model, prompt))
    ref, _ = greedy_recompute(loaded, prompt, 8)
    tokens, _, cache = greedy_generate(loaded, prompt, 8, cache_implementation="static")
    assert torch.equal(tokens, ref) and cache_slot_bytes(cache)[0] == 0


def test_dtype_and_drop(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model, path = _checkpoint(tmp_path_factory, "qwen2", layers=(1, 2), method="drop")
    as_bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and not hasattr(as_bf16.model.layers[1], "self_attn")
    reference = nbl_ext.load_pretrained(path, dtype=torch.bfloat16)
    assert torch.equal(_logits(as_bf16), _logits(reference))
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(path, low_cpu_mem_usage=True)), _logits(model))


def test_sharded_save_and_reload(tmp_path_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _checkpoint(tmp_path_factory, "llama")
    path = tmp_path / "sharded"
    nbl_ext.save_pretrained(model, path, max_shard_size="40KB")
    shards = sorted(p.name for p in path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] > 0
    for loaded in (AutoModelForCausalLM.from_pretrained(path), nbl_ext.load_pretrained(path)):
        assert torch.equal(_logits(loaded), _logits(model))
    os.remove(path / shards[1])
    with pytest.raises(FileNotFoundError, match=f"shard {shards[1]} listed in model.safetensors.index.json is missing"):
        nbl_ext.load_pretrained(path)


def test_device_map_with_cpu_and_disk_offload(tmp_path_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    model, path = _checkpoint(tmp_path_factory, "gemma3_text")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
        "model.layers.0": "disk",
        "model.layers.1": "cpu",
        "model.layers.2": "disk",
        "model.layers.3": "cpu",
    }
    loaded = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path / "off"))
    assert loaded.hf_device_map == device_map
    assert loaded.model.layers[0].nbl_affine.weight.device.type == "meta"  # on disk until its hook loads it
    assert torch.equal(_logits(loaded), _logits(model))
    ref, _ = greedy_recompute(model, token_data(1, 6, seed=5), 6)
    assert torch.equal(greedy_generate(loaded, token_data(1, 6, seed=5), 6)[0], ref)
    auto = nbl_ext.load_pretrained(path, device_map="auto")
    assert torch.equal(_logits(auto), _logits(model))


def test_calibration_of_an_offloaded_model_gives_the_same_statistics(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", N_LAYERS)
    model.save_pretrained(tmp_path / "plain")
    data = token_data(3, 40)
    in_memory = nbl_ext.calibrate(model, data, batch_size=3, progress=False)
    device_map = {
        "model.embed_tokens": "disk",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "disk",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.layers.3": "disk",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "plain", device_map=device_map, offload_folder=str(tmp_path / "off")
    )
    result = nbl_ext.calibrate(offloaded, data, batch_size=3, progress=False)
    assert result.bounds == in_memory.bounds
    for a, b in zip(result.layers, in_memory.layers):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.cosine == b.cosine


def test_strict_loading_refuses_a_damaged_checkpoint(tmp_path_factory, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    _, path = _checkpoint(tmp_path_factory, "llama")
    damaged = Path(shutil.copytree(path, tmp_path / "damaged"))
    tensors = load_file(damaged / "model.safetensors")
    del tensors["model.layers.3.nbl_affine.weight"]
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.3.nbl_affine.weight'\].*damaged"):
        AutoModelForCausalLM.from_pretrained(damaged)


def _fresh_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter where ``import nbl_ext`` fails (as if it were not installed)."""
    prelude = "import sys\nsys.modules['nbl_ext'] = None  # any import of nbl_ext raises ImportError\n"
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), PYTHONPATH="", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def test_plain_transformers_refuses_the_checkpoint_in_a_fresh_process(tmp_path_factory, tmp_path):
    _, path = _checkpoint(tmp_path_factory, "llama")
    proc = _fresh_python(
        f"""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(path)!r})
        print("LOADED")
    """,
        tmp_path,
    )
    assert proc.returncode != 0 and "LOADED" not in proc.stdout
    assert "model type `nbl_llama`" in proc.stderr and "does not recognize this architecture" in proc.stderr
    card = (path / "README.md").read_text()
    assert "pip install nbl-ext" in card and "import nbl_ext" in card


def test_remote_code_loads_without_nbl_ext(tmp_path_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    prompt = token_data(1, 6, seed=5)
    expected = {}
    for family in ("llama", "gemma3_text"):
        model, path = _checkpoint(tmp_path_factory, family, remote_code=True)
        assert (path / "modeling_nbl.py").is_file()
        assert (
            json.loads((path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
            == f"modeling_nbl.{type(model).__name__}"
        )
        # nbl_ext's own loaders accept its own auto_map and never run the remote file
        for loaded in (
            AutoModelForCausalLM.from_pretrained(path),
            nbl_ext.load_pretrained(path),
            AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True),
        ):
            assert type(loaded) is type(model)
        assert not [m for m in sys.modules if m.endswith("modeling_nbl")]
        expected[str(path)] = (_logits(model).tolist(), greedy_recompute(model, prompt, 8)[0].tolist())
    proc = _fresh_python(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        ids = torch.tensor({token_data(2, 16, seed=11).tolist()})
        prompt = torch.tensor({prompt.tolist()})
        out = {{}}
        for path in {list(expected)!r}:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
            assert type(model).__module__.endswith("modeling_nbl"), type(model)
            with torch.no_grad():
                logits = model(ids, use_cache=False).logits
            model.generation_config.eos_token_id = None
            seqs = {{impl: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                          do_sample=False, pad_token_id=0, cache_implementation=impl).tolist()
                    for impl in ("dynamic", "static")}}
            out[path] = [logits.tolist(), seqs]
        print(json.dumps(out))
    """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, (logits, ref_tokens) in expected.items():
        torch.testing.assert_close(torch.tensor(got[path][0]), torch.tensor(logits), rtol=1e-5, atol=1e-5)
        assert got[path][1] == {"dynamic": ref_tokens, "static": ref_tokens}


def test_checkpoints_of_the_earlier_format_still_load(tmp_path_factory, tmp_path):
    """Written before the nbl_* model types: model_type of the family, the nbl section, no architectures."""
    import shutil

    from transformers import AutoModelForCausalLM

    model, path = _checkpoint(tmp_path_factory, "gemma3_text", layers=(1, 2))
    old = Path(shutil.copytree(path, tmp_path / "old"))
    config = json.loads((old / "config.json").read_text())
    config["model_type"] = "gemma3_text"
    del config["architectures"]
    (old / "config.json").write_text(json.dumps(config))
    os.remove(old / "README.md")
    loaded = nbl_ext.load_pretrained(old)
    assert type(loaded) is type(model) and loaded.config.model_type == "nbl_gemma3_text"
    assert torch.equal(_logits(loaded), _logits(model))
    nbl_ext.save_pretrained(loaded, tmp_path / "resaved")  # re-saving writes the current format
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")), _logits(model))


def test_model_card_says_what_was_done_and_how_to_load(tmp_path_factory, tmp_path):
    model, _ = _checkpoint(tmp_path_factory, "mistral")
    nbl_ext.save_pretrained(model, tmp_path / "card", quality={"wikitext2_ppl": 12.5})
    card = (tmp_path / "card" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"the attention of 2 of {N_LAYERS} decoder layers, [0, {N_LAYERS - 1}] (method `nbl`" in card
    assert "lowest CCA bound" in card and "3 sequences x 40 tokens (120 tokens" in card
    assert "wikitext2_ppl = 12.5" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert card.count("| yes |") == 2 and f"| {N_LAYERS - 1} | yes |" in card


def test_compressed_checkpoint_keeps_its_run_config_and_names_the_criterion(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", N_LAYERS)
    config = nbl_ext.NBLConfig(criterion="cosine", k=2, replacement="remove", num_samples=3, seq_len=40, batch_size=3)
    model, result = nbl_ext.compress(model, token_data(3, 40), config)
    nbl_ext.save_pretrained(model, tmp_path / "c", calibration=result)
    card = (tmp_path / "c" / "README.md").read_text()
    assert "criterion `cosine`, higher first: mean cosine(X, X + A)" in card and "(method `drop`" in card
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "c"), nbl_ext.load_pretrained(tmp_path / "c")):
        assert loaded.config.nbl == model.config.nbl and loaded.config.nbl["config"]["criterion"] == "cosine"
        assert torch.equal(_logits(loaded), _logits(model))
