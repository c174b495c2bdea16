"""Checkpoints and calibration directories in the format the first release wrote still load, exactly.

The files here are written by hand (safetensors + JSON, as nbl_ext 0.1.0 wrote them), not by today's
save functions, so a change of the writers cannot hide a change of the readers.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import nbl_ext
from hf_tiny import tiny_model, token_data
from nbl_ext.result import CalibrationResult, LayerCalibration

D = 32


def _maps(layers, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {
        i: (
            0.05 * torch.randn(D, D, generator=gen, dtype=torch.float64),
            0.05 * torch.randn(D, generator=gen, dtype=torch.float64),
        )
        for i in layers
    }


def _v1_nbl_section(method, layers, num_layers, removed):
    """config.json's ``nbl`` section exactly as nbl_ext 0.1.0's nbl_config() wrote it."""
    return {
        "version": 1,
        "method": method,
        "layers": layers,
        "target": "attn",
        "refit": None,
        "num_hidden_layers": num_layers,
        "hidden_size": D,
        "removed_modules": removed,
        "replacement": (
            "out = mlp_half(h + h @ nbl_affine.weight.T + nbl_affine.bias)" if method == "nbl" else "out = mlp_half(h)"
        ),
        "kv_cache": "linearized layers have kv_sharing_modes='reuse' (DummyLayer, no KV storage)",
    }


def _write_v1_checkpoint(path, family, method, layers, maps):
    """A checkpoint of ``family`` with ``layers`` linearized, in the 0.1.0 layout, from the original weights."""
    model = tiny_model(family, 4)
    removed = ["input_layernorm", "self_attn"] + (["post_attention_layernorm"] if family == "gemma3_text" else [])
    path.mkdir()
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["nbl"] = _v1_nbl_section(method, layers, 4, removed)
    config["kv_sharing_modes"] = ["reuse" if i in layers else None for i in range(4)]
    (path / "config.json").write_text(json.dumps(config))
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if not any(k.startswith(f"model.layers.{i}.{m}.") for i in layers for m in removed)
    }
    if family == "gemma3_text":
        state.pop("lm_head.weight")  # tied to the embeddings: stored once
    if method == "nbl":
        for i in layers:
            state[f"model.layers.{i}.nbl_affine.weight"] = maps[i][0].float()
            state[f"model.layers.{i}.nbl_affine.bias"] = maps[i][1].float()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return model


@pytest.mark.parametrize(
    "family,method,layers", [("llama", "nbl", [0, 2]), ("gemma3_text", "nbl", [1, 3]), ("qwen2", "drop", [1])]
)
def test_a_v1_checkpoint_loads_with_identical_logits(tmp_path, family, method, layers):
    maps = _maps(layers)
    original = _write_v1_checkpoint(tmp_path / "ckpt", family, method, layers, maps)
    loaded = nbl_ext.load_pretrained(tmp_path / "ckpt")
    # the same model, linearized in memory with the same maps
    rows = [
        LayerCalibration(i, {"cca_bound": 0.0, "nmse": 0.0, "cosine": 1.0}, 1, *maps.get(i, _maps([i])[i]))
        for i in range(4)
    ]
    meta = {"model_type": original.config.model_type, "num_layers": 4, "hidden_size": D}
    reference = nbl_ext.linearize(copy.deepcopy(original), CalibrationResult(rows, meta), layers, method=method)
    ids = token_data(2, 16, seed=11)
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, reference(ids, use_cache=False).logits)
    assert loaded.config.nbl["layers"] == layers and loaded.config.nbl["method"] == method
    text = loaded.config.get_text_config(decoder=True)
    assert text.kv_sharing_modes == ["reuse" if i in layers else None for i in range(4)]


def test_a_v1_calibration_directory_loads(tmp_path):
    path = tmp_path / "calibration"
    path.mkdir()
    maps = _maps(range(3))
    rows = [
        {"layer": i, "bound": b, "nmse": n, "cosine": c, "tokens": 120}
        for i, (b, n, c) in enumerate([(3.0, 0.2, 0.9), (1.0, 0.4, 0.5), (2.0, 0.1, 0.7)])
    ]
    meta = {"model_type": "llama", "num_layers": 3, "hidden_size": D, "tokens": 120, "target": "attn"}
    (path / "calibration.json").write_text(
        json.dumps({"format": "nbl-ext-calibration", "version": 1, "metadata": meta, "layers": rows})
    )
    tensors = {f"layers.{i}.{name}": t for i, (w, b) in maps.items() for name, t in (("weight", w), ("bias", b))}
    save_file(tensors, str(path / "calibration.safetensors"), metadata={"format": "nbl-ext-calibration"})
    r = CalibrationResult.load(path)
    assert r.bounds == [3.0, 1.0, 2.0] and r.nmse == [0.2, 0.4, 0.1] and r.cosines == [0.9, 0.5, 0.7]
    assert r.select(1) == [1] and r.select(1, "drop") == [0] and r.select(1, "nmse") == [2]
    assert torch.equal(r.layers[2].weight, maps[2][0])
    assert r.summary()["layers"] == rows  # rewritten in the same shape
