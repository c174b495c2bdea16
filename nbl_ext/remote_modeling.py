"""Linearized models for ``trust_remote_code=True``, without nbl-ext: pure PyTorch on top of transformers.

nbl_ext.save_pretrained(..., remote_code=True) copies this file verbatim into the checkpoint as
``modeling_nbl.py`` and points the config's ``auto_map`` at it, so tools that load models themselves
(the lm-eval CLI, other runners) can use the checkpoint where nbl-ext is not installed. It imports only
torch and transformers; nbl_ext never imports or runs it (its own classes use the compiled kernel and
the adapters). The classes mirror nbl_ext's: ``NBL<Base>Config`` (model_type ``"nbl_<family>"``) and
``NBL<Base>``, whose post_init replaces the attention of the layers in ``config.nbl`` by
``h + h @ W.T + b`` (method "nbl") or by nothing ("drop"), before the weights are loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DummyLayer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

#: family -> (attention-branch submodules, MLP-half submodules); the Gemma 3 families have sandwich norms.
_PLAIN = (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))
_SANDWICH = (
    ("input_layernorm", "self_attn", "post_attention_layernorm"),
    ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
)
FAMILIES = {
    "llama": _PLAIN,
    "mistral": _PLAIN,
    "qwen2": _PLAIN,
    "qwen3": _PLAIN,
    "gemma3_text": _SANDWICH,
    "gemma3": _SANDWICH,
}


class AffineResidual(nn.Module):
    """``h + h @ weight.T + bias``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, h.reshape(-1, h.shape[-1]), self.weight.t()).view_as(h) + h


def _release_kv_slot(cache: Any, index: int) -> None:
    """Slot ``index`` of a cache built without the config becomes a DummyLayer (no storage)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return
    if index < len(layers):
        if not isinstance(layers[index], DummyLayer):
            layers[index] = DummyLayer()
    elif getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(layers) < index:
            layers.append(cache.layer_class_to_replicate())
        layers.append(DummyLayer())


class LinearizedLayerMixin:
    nbl_family: str

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hidden_states is None:
            hidden_states = kwargs["hidden_states"]
        cache = kwargs.get("past_key_values")
        if cache is not None and self.nbl_release_kv:
            _release_kv_slot(cache, self.nbl_layer_idx)
        h = self.nbl_affine(hidden_states) if self.nbl_method == "nbl" else hidden_states
        if FAMILIES[self.nbl_family] is _SANDWICH:
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h + self.mlp(self.post_attention_layernorm(h))


_LAYER_CLASSES: dict[tuple[type, str], type] = {}


def _convert(model: nn.Module, family: str) -> None:
    config = model.config
    text = config.get_text_config(decoder=True)
    nbl = config.nbl
    if not isinstance(nbl, dict) or nbl.get("version") != 1 or nbl.get("method") not in ("nbl", "drop"):
        raise ValueError(f"modeling_nbl: unsupported nbl section {nbl!r} (version 1, method nbl or drop expected)")
    n, d = int(text.num_hidden_layers), int(text.hidden_size)
    chosen = sorted(nbl["layers"])
    if nbl.get("num_hidden_layers") != n or nbl.get("hidden_size") != d or any(not 0 <= i < n for i in chosen):
        raise ValueError(f"modeling_nbl: the nbl section {nbl!r} does not match the model ({n} layers, hidden {d})")
    keep_slot0 = len(chosen) == n
    text.kv_sharing_modes = (
        ["reuse" if i in chosen and not (keep_slot0 and i == 0) else None for i in range(n)] if chosen else None
    )
    branch, mlp = FAMILIES[family]
    layers = model.get_decoder().layers
    for i in chosen:
        layer = layers[i]
        if isinstance(layer, LinearizedLayerMixin):
            continue
        ref = next(p for name in mlp for p in getattr(layer, name).parameters() if p.is_floating_point())
        for name in branch:
            delattr(layer, name)
        key = (type(layer), family)
        if key not in _LAYER_CLASSES:
            _LAYER_CLASSES[key] = type(
                f"NBL{type(layer).__name__}", (LinearizedLayerMixin, type(layer)), {"nbl_family": family}
            )
        layer.__class__ = _LAYER_CLASSES[key]
        layer.nbl_method, layer.nbl_layer_idx, layer.nbl_release_kv = nbl["method"], i, not (keep_slot0 and i == 0)
        if nbl["method"] == "nbl":
            layer.nbl_affine = AffineResidual(
                torch.zeros(d, d, dtype=ref.dtype, device=ref.device),
                torch.zeros(d, dtype=ref.dtype, device=ref.device),
            )


def _classes(family: str) -> tuple[type, type]:
    base_config = CONFIG_MAPPING[family]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    config_cls = type(
        f"NBL{base_config.__name__}",
        (base_config,),
        {"__module__": __name__, "model_type": "nbl_" + family, "nbl_base_model_type": family},
    )

    def post_init(self: Any) -> None:
        _convert(self, family)
        super(model_cls, self).post_init()

    names = list(getattr(base_model, "_no_split_modules", None) or [])
    model_cls = type(
        f"NBL{base_model.__name__}",
        (base_model,),
        {
            "__module__": __name__,
            "config_class": config_cls,
            "post_init": post_init,
            "_no_split_modules": names + [f"NBL{name}" for name in names],
        },
    )
    return config_cls, model_cls


def __getattr__(name: str) -> type:
    """``NBL<Base>Config`` / ``NBL<Base>`` of a family, built on first access (imports only that family)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for family in FAMILIES:
        if name in (f"NBL{CONFIG_MAPPING_NAMES[family]}", f"NBL{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]}"):
            for cls in _classes(family):
                globals()[cls.__name__] = cls
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
