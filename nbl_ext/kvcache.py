"""The KV-cache rules of a linearized model, in one place (used by linearize and serialization).

Hugging Face builds caches from the config (generate, the model's own forward,
``DynamicCache(config=...)``, ``StaticCache(config=...)``) and turns a layer whose
``config.kv_sharing_modes`` entry is ``"reuse"`` into a ``DummyLayer`` that stores nothing.
Linearized layers are marked that way (:func:`kv_sharing_modes`), so they allocate no KV memory.
``Cache.get_seq_length()`` and the mask builders skip dummy slots (they read the first real
attention slot), which keeps generation exact when layer 0 is linearized. A cache built *without* a
config (``DynamicCache()``) is patched on the fly: a linearized layer turns its own slot into a
``DummyLayer`` the first time it sees the cache (:func:`release_kv_slot`). When no attention is left
at all, slot 0 stays an ordinary (never written, so never allocated) layer (:func:`keeps_kv_slot`):
nothing depends on positions any more, and generation keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: The text-config attribute Hugging Face reads to build dummy (storage-free) cache slots.
KV_SHARING_ATTR = "kv_sharing_modes"
#: What the ``nbl`` config section says about the cache.
KV_CACHE_NOTE = "linearized layers have kv_sharing_modes='reuse' (DummyLayer, no KV storage)"


def keeps_kv_slot(index: int, layers: Sequence[int], num_layers: int) -> bool:
    """Whether linearized layer ``index`` keeps its cache slot: slot 0 when no attention is left at all."""
    return index == 0 and len(layers) == num_layers


def kv_sharing_modes(layers: Sequence[int], num_layers: int) -> list[str | None]:
    """The ``kv_sharing_modes`` list of a model whose ``layers`` are linearized ("reuse" = no KV storage)."""
    removed = set(layers)
    return ["reuse" if i in removed and not keeps_kv_slot(i, layers, num_layers) else None for i in range(num_layers)]


def release_kv_slot(cache: Any, index: int) -> None:
    """Make slot ``index`` of an HF cache a ``DummyLayer`` (no storage, skipped for lengths and masks)."""
    from transformers.cache_utils import DummyLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return
    if index < len(layers):
        if not isinstance(layers[index], DummyLayer):
            layers[index] = DummyLayer()
    elif getattr(cache, "layer_class_to_replicate", None) is not None:  # lazily grown DynamicCache()
        while len(layers) < index:
            layers.append(cache.layer_class_to_replicate())
        layers.append(DummyLayer())
