"""Synthetic models for speed measurements: named real-model shapes with random weights, random affine maps.

Speed does not depend on weight values, so the speed claims use real model shapes with random weights
(:func:`random_model`) and random affine maps (:func:`synthetic_linearize`, no calibration); real weights
(``nbl_ext.models.load_model``) work the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from nbl_ext.adapters import get_adapter
from nbl_ext.linearize import SUMMARY_ATTR, apply_structure, is_linearized
from nbl_ext.result import METHODS, check_layer_list
from nbl_ext.validation import check_count, parse_dtype

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

#: Named model shapes for random-weight models: Hugging Face config arguments (model_type first).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        model_type="llama",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters=_LLAMA3_ROPE,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "mistral-7b": dict(  # Mistral-7B-v0.3
        model_type="mistral",
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=32768,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        sliding_window=None,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    ),
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, what: str) -> torch.dtype:
    """``dtype`` as a floating-point torch.dtype (:func:`nbl_ext.validation.parse_dtype`); None: bfloat16 on
    CUDA, float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype, what=what)


def shape_config(shape: str, num_layers: int | None = None):
    """The Hugging Face config of a named shape (see :data:`SHAPES`), optionally with fewer layers."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[shape])
    if num_layers is not None:
        kwargs["num_hidden_layers"] = check_count(num_layers, "num_layers")
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, attn_implementation="sdpa", **kwargs)


def random_model(
    shape: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    num_layers: int | None = None,
    seed: int = 0,
) -> nn.Module:
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
    torch_dtype = resolve_dtype(dtype, dev, "random_model")
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    wrong = {p.device for p in model.parameters() if p.device.type != dev.type}
    if wrong:  # pragma: no cover - a transformers change that allocates elsewhere first
        raise RuntimeError(f"random_model: parameters landed on {wrong}, not {dev}")
    model.config.nbl_source = {
        "kind": "random",
        "shape": shape,
        "num_layers": config.num_hidden_layers,
        "seed": seed,
        "description": f"random weights, {shape} shape",
    }
    return model.eval()


def last_layers(num_layers: int, k: int) -> list[int]:
    """The default layers to linearize for speed runs: the last ``k`` (deep layers are the ones NBL picks
    most often; for speed which layers does not matter)."""
    return list(range(num_layers - k, num_layers))


def synthetic_maps(
    hidden_size: int, layers: Iterable[int], *, seed: int = 0, scale: float = 0.01
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Random affine maps ``{layer: (W, b)}``: ``W ~ N(0, scale^2 / d)`` (spectral norm ~ 2 scale),
    ``b ~ N(0, scale^2)``.

    float32 on the CPU, from a generator seeded per layer: the same maps on every device.
    """
    out = {}
    for i in layers:
        g = torch.Generator().manual_seed(seed * 100_003 + int(i))
        w = torch.randn(hidden_size, hidden_size, generator=g) * (scale / math.sqrt(hidden_size))
        b = torch.randn(hidden_size, generator=g) * scale
        out[int(i)] = (w, b)
    return out


def synthetic_linearize(
    model: nn.Module, layers: Any, method: str = "nbl", *, seed: int = 0, scale: float = 0.01
) -> nn.Module:
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
    if getattr(adapter.config, "nbl", None) or any(is_linearized(layer) for layer in adapter.layers()):
        raise ValueError("synthetic_linearize: this model is already linearized; start from the original model")
    chosen = check_layer_list(layers, adapter.num_layers, "synthetic_linearize")
    weights = synthetic_maps(adapter.hidden_size, chosen, seed=seed, scale=scale) if method == "nbl" else None
    apply_structure(model, adapter, method, chosen, weights, None)
    setattr(
        model,
        SUMMARY_ATTR,
        {
            "synthetic_maps": {
                "method": method,
                "layers": chosen,
                "seed": seed,
                "scale": scale if method == "nbl" else None,
                "note": "random maps for speed measurements, not calibrated",
            }
        },
    )
    return model
