"""save_pretrained / load_pretrained: self-contained, atomic, strict, identical logits, clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

import nbl_ext
from hf_tiny import VOCAB, greedy_generate, greedy_recompute, tiny_model, token_data


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")


def _linearized(family, layers, method="nbl"):
    model = tiny_model(family, 4)
    result = nbl_ext.calibrate(model, token_data(3, 40), batch_size=3, progress=False)
    return nbl_ext.linearize(model, result if method == "nbl" else None, layers, method=method), result


def _logits(model):
    with torch.no_grad():
        return model(token_data(2, 16, seed=11), use_cache=False).logits


@pytest.mark.parametrize(
    "family,layers,method", [("llama", [0, 2], "nbl"), ("gemma3_text", [0, 3], "nbl"), ("qwen2", [1], "drop")]
)
def test_save_load_gives_identical_logits(family, layers, method, tmp_path):
    model, result = _linearized(family, layers, method)
    path = tmp_path / "ckpt"
    nbl_ext.save_pretrained(model, path, tokenizer=_tokenizer())
    names = sorted(p.name for p in path.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]  # no pickle
    config = json.loads((path / "config.json").read_text())
    assert config["nbl"]["method"] == method and config["nbl"]["layers"] == layers
    if method == "nbl":
        summary = json.loads((path / "nbl_calibration.json").read_text())
        assert [r["bound"] for r in summary["calibration"]["layers"]] == result.bounds

    loaded = nbl_ext.load_pretrained(path)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.config.nbl == model.config.nbl
    assert (
        loaded.config.get_text_config(decoder=True).kv_sharing_modes
        == model.config.get_text_config(decoder=True).kv_sharing_modes
    )
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    if family == "gemma3_text":  # tied embeddings stay tied
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # cached generation of the reloaded model is still exact
    prompt = token_data(1, 6, seed=5)
    ref, _ = greedy_recompute(loaded, prompt, 8)
    assert torch.equal(greedy_generate(loaded, prompt, 8, cache_implementation="static")[0], ref)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(path)).convert_tokens_to_ids("w7") == 7


def test_load_keeps_dtype_and_accepts_overrides(tmp_path):
    model = tiny_model("llama", 2, dtype=torch.bfloat16)
    result = nbl_ext.calibrate(model, token_data(3, 40), progress=False)
    nbl_ext.linearize(model, result, [1])
    nbl_ext.save_pretrained(model, tmp_path / "bf16")
    loaded = nbl_ext.load_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16 and loaded.model.layers[1].nbl_affine.weight.dtype == torch.bfloat16
    assert torch.equal(_logits(loaded), _logits(model))
    as32 = nbl_ext.load_pretrained(tmp_path / "bf16", dtype=torch.float32, attn_implementation="eager")
    assert as32.dtype == torch.float32 and as32.config._attn_implementation == "eager"


def test_overwrite_is_atomic(tmp_path, monkeypatch):
    model, _ = _linearized("llama", [1])
    path = tmp_path / "ckpt"
    nbl_ext.save_pretrained(model, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    nbl_ext.save_pretrained(model, path)  # overwrite an existing checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    import safetensors.torch

    def fail(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)  # the weight writer (save_pretrained shards with it)
    with pytest.raises(OSError, match="disk full"):
        nbl_ext.save_pretrained(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written directory left behind
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # the old checkpoint is intact


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, _ = _linearized("llama", [0, 2])
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    nbl_ext.save_pretrained(model, path)
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "edit,msg",
    [
        (lambda n: n.update(layers=[0, 9]), r"nbl.layers has index 9, out of range for 4 layers"),
        (lambda n: n.update(layers=[0, 0]), r"repeated"),
        (lambda n: n.update(layers=["0"]), r"must hold ints"),
        (lambda n: n.update(method="prune"), r"nbl.method must be one of"),
        (lambda n: n.update(version=7), r"unsupported nbl section version"),
        (lambda n: n.update(num_hidden_layers=5), r"nbl.num_hidden_layers is 5"),
        (lambda n: n.update(refit="magic"), r"nbl.refit"),
        (lambda n: n.update(layers=[0]), r"unexpected tensors \['model.layers.2.nbl_affine"),
        (lambda n: n.update(layers=[0, 1, 2]), r"missing tensors \['model.layers.1.self_attn|missing tensors .*"),
    ],
)
def test_tampered_config_is_a_clear_error(saved, tmp_path, edit, msg):
    path = _copy(saved, tmp_path / "t")
    config = json.loads((path / "config.json").read_text())
    edit(config["nbl"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=msg):
        nbl_ext.load_pretrained(path)


def test_damaged_weights_are_clear_errors(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(saved, tmp_path / "missing")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.2.nbl_affine.bias"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2.nbl_affine.bias'\]"):
        nbl_ext.load_pretrained(path)

    path = _copy(saved, tmp_path / "shape")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.nbl_affine.weight"] = torch.zeros(16, 32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"wrong shapes \[model.layers.0.nbl_affine.weight: file \(16, 32\)"):
        nbl_ext.load_pretrained(path)

    path = _copy(saved, tmp_path / "garbage")
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        nbl_ext.load_pretrained(path)

    path = _copy(saved, tmp_path / "nofile")
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        nbl_ext.load_pretrained(path)


def test_refuses_paths_outside_the_directory_and_foreign_configs(saved, tmp_path):
    path = _copy(saved, tmp_path / "link")
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(path / "model.safetensors", outside)
    os.symlink(outside, path / "model.safetensors")
    with pytest.raises(ValueError, match="outside the directory"):
        nbl_ext.load_pretrained(path)

    path = _copy(saved, tmp_path / "remote")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="remote code"):
        nbl_ext.load_pretrained(path)

    path = _copy(saved, tmp_path / "gpt2")
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        nbl_ext.load_pretrained(path)

    path = _copy(saved, tmp_path / "nonbl")
    config = json.loads((path / "config.json").read_text())
    del config["nbl"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="kv_sharing_modes but no nbl section"):
        nbl_ext.load_pretrained(path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_modes_follow_the_umask(tmp_path, umask):
    # tempfile makes 0700 directories and 0600 files whatever the umask: colleagues on a shared
    # machine could not read a checkpoint. The directory and every file now get the umask's modes.
    model, result = _linearized("llama", [1])
    old = os.umask(umask)
    try:
        path = tmp_path / "ckpt"
        nbl_ext.save_pretrained(model, path, tokenizer=_tokenizer(), calibration=result)
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o777 & ~umask
    files = [f for f in path.iterdir() if f.is_file()]
    assert {"config.json", "model.safetensors"} <= {f.name for f in files}
    for f in files:
        assert (f.stat().st_mode & 0o777) == 0o666 & ~umask, f.name


def test_load_model_routes_an_nbl_checkpoint_to_load_pretrained(tmp_path):
    # from_pretrained on a checkpoint builds the original architecture and drops the linear maps
    # silently; load_model recognises the directory from its config and loads it as saved.
    from nbl_ext.models import nbl_checkpoint, peek_config

    model, result = _linearized("llama", [0, 2])
    path = tmp_path / "ckpt"
    nbl_ext.save_pretrained(model, path, tokenizer=_tokenizer(), calibration=result)
    assert nbl_checkpoint(path)["layers"] == [0, 2]
    peek = peek_config(path)
    assert peek["nbl"]["layers"] == [0, 2] and peek["num_hidden_layers"] == 4
    loaded, tok = nbl_ext.load_model(path)
    assert loaded.config.nbl["layers"] == [0, 2] and tok is not None
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    plain = tmp_path / "plain"
    tiny_model("llama", 2).save_pretrained(plain)
    assert nbl_checkpoint(plain) is None and peek_config(plain)["nbl"] is None
