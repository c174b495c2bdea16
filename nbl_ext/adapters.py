"""Model-family adapters: the only place that knows how a decoder layer is built.

Every family NBL supports gets one small adapter class, registered under the
``config.model_type`` values it handles (SliceGPT's layout). The rest of the
package (calibration, linearization, serialization) talks to layers only
through an adapter, so a new family is one class here.

The contract, for decoder layer ``i`` computing ``out = X + A + MLP-half``:

* ``X`` is the layer's input: the residual stream entering the attention
  branch, *before* the pre-attention norm (the first argument of the layer's
  forward in every supported family);
* ``A`` is the attention branch output *before* the residual add, after
  ``o_proj`` and after any post-attention norm (Gemma 3);
* :meth:`Adapter.branch_output` names the submodule whose forward output is
  ``A`` (plus how to pick ``A`` out of that output), so calibration can hook it
  while the original layer runs unchanged;
* :meth:`Adapter.mlp_half` computes the rest of the layer from the
  post-attention residual stream ``h = X + A``;
* :attr:`Adapter.branch_modules` are the submodules that exist only for the
  attention branch: linearization deletes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

_REGISTRY: dict[str, type[Adapter]] = {}


def register_adapter(*model_types: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: register an adapter for the given ``config.model_type`` values."""

    def wrap(cls: type[Adapter]) -> type[Adapter]:
        for model_type in model_types:
            if model_type in _REGISTRY:
                raise ValueError(f"an adapter for model_type {model_type!r} is already registered")
            _REGISTRY[model_type] = cls
        cls.model_types = tuple(model_types)
        return cls

    return wrap


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values that have an adapter."""
    return sorted(_REGISTRY)


def base_model_type(config: Any) -> Any:
    """``config.model_type``; for a linearized model's config (model_type ``"nbl_<family>"``) the family's."""
    return getattr(config, "nbl_base_model_type", None) or getattr(config, "model_type", None)


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class Adapter:
    """Base adapter: a pre-norm decoder layer ``X + attn(norm(X))`` then ``h + mlp(norm(h))``.

    Holds a reference to the model; methods that only touch one layer are
    class methods so linearized layers can use them without the model.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    #: Submodules of a decoder layer used only by the attention branch.
    branch_modules: ClassVar[tuple[str, ...]] = ("input_layernorm", "self_attn")
    #: Submodules of a decoder layer used by the MLP half (kept by linearization).
    mlp_modules: ClassVar[tuple[str, ...]] = ("post_attention_layernorm", "mlp")

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- model level ---------------------------------------------------------
    @property
    def config(self) -> Any:
        """The model's top-level config (where the ``nbl`` section is recorded)."""
        return self.model.config

    @property
    def text_config(self) -> Any:
        """The decoder's config: layer count, hidden size, layer types; caches are built from it."""
        return self.model.config.get_text_config(decoder=True)

    @property
    def model_type(self) -> str:
        return str(base_model_type(self.model.config))

    def decoder(self) -> nn.Module:
        """The decoder stack (the module that owns ``layers``)."""
        return self.model.get_decoder()

    def layers(self) -> nn.ModuleList:
        return self.decoder().layers

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    # --- layer level ---------------------------------------------------------
    @classmethod
    def branch_output(cls, layer: nn.Module) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
        """(module, pick): ``pick(module's forward output)`` is the branch output A."""
        return layer.self_attn, _first_output

    @classmethod
    def mlp_half(cls, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """The rest of the layer, from the post-attention residual stream h."""
        return h + layer.mlp(layer.post_attention_layernorm(h))


@register_adapter("llama")
class LlamaAdapter(Adapter):
    """Llama 2/3.x, SmolLM2, DeepSeek-R1-Distill-Llama."""


@register_adapter("mistral")
class MistralAdapter(Adapter):
    """Mistral (optional uniform sliding window; the model's own masks handle it)."""


@register_adapter("qwen2")
class Qwen2Adapter(Adapter):
    """Qwen2 / Qwen2.5 (q/k/v biases, optional sliding-window layers)."""


@register_adapter("qwen3")
class Qwen3Adapter(Adapter):
    """Qwen3 dense (q/k norms inside the attention module)."""


@register_adapter("gemma3_text", "gemma3")
class Gemma3Adapter(Adapter):
    """Gemma 3 (text-only ``Gemma3ForCausalLM`` and the multimodal model's language model).

    Sandwich norms: ``A = post_attention_layernorm(attn(input_layernorm(X)))``
    and ``out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``.
    Sliding-window and full layers differ only in masks and RoPE, which the
    model computes; q/k norms live inside the attention module.
    """

    branch_modules = ("input_layernorm", "self_attn", "post_attention_layernorm")
    mlp_modules = ("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm")

    @classmethod
    def branch_output(cls, layer: nn.Module) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
        return layer.post_attention_layernorm, _first_output

    @classmethod
    def mlp_half(cls, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a Hugging Face causal LM, chosen by ``model.config.model_type``.

    Raises ValueError for an unsupported family, listing the supported ones.
    """
    config = getattr(model, "config", None)
    model_type = base_model_type(config)
    if model_type is None:
        raise TypeError(
            f"get_adapter: expected a Hugging Face model with a config (model.config.model_type), "
            f"got {type(model).__name__}"
        )
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise ValueError(
            f"nbl_ext does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    adapter = cls(model)
    try:
        layers = adapter.layers()
    except AttributeError as exc:
        raise ValueError(
            f"nbl_ext: {type(model).__name__} (model_type {model_type!r}) has no decoder layer list "
            f"where the {cls.__name__} expects it ({exc}); pass a causal LM such as AutoModelForCausalLM"
        ) from None
    if not isinstance(layers, nn.ModuleList) or len(layers) != adapter.num_layers:
        raise ValueError(
            f"nbl_ext: {type(model).__name__} has {len(layers)} decoder layers but its config says "
            f"num_hidden_layers={adapter.num_layers}"
        )
    return adapter
