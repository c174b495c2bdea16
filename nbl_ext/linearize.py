"""Replace (or drop) attention branches of a Hugging Face causal LM, in place.

A linearized decoder layer stays the *same object*: its class becomes a
subclass of the original one (so ``isinstance`` checks, output capture hooks
and state-dict key names keep working), its attention-branch submodules
(pre-norm, self-attention, post-attention norm where the family has one) are
deleted, and its forward becomes

    h = X + X @ W^T + b      (replacement "affine", via nbl_ext.ops.affine_residual)
    h = X                    (replacement "remove")
    out = adapter.mlp_half(layer, h)

The KV-cache rules (no storage for linearized layers) are in :mod:`nbl_ext.kvcache`.
Which layers to replace is chosen by a criterion (:meth:`CalibrationResult.select`); what replaces
them is this module's ``replacement``. The older ``method`` names still work: "nbl" is the affine
map, "drop" the removal; ``config.nbl["method"]`` records the replacement under those names.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from nbl_ext import ops
from nbl_ext.adapters import Adapter, get_adapter
from nbl_ext.criteria import token_statistics
from nbl_ext.crossval import check_fold_settings
from nbl_ext.engine import (
    LayerwiseRunner,
    all_reduce_stats,
    check_token_data,
    dist_info,
    eval_mode,
    progress_bar,
    score_layer,
    shard,
)
from nbl_ext.kvcache import KV_CACHE_NOTE, KV_SHARING_ATTR, keeps_kv_slot, kv_sharing_modes, release_kv_slot
from nbl_ext.result import METHODS, CalibrationResult, LayerCalibration, check_layer_list
from nbl_ext.validation import check_choice, check_count

NBL_CONFIG_VERSION = 1
REFIT_MODES = (None, "sequential")
#: What replaces a chosen attention branch: the fitted affine map, or nothing.
REPLACEMENTS = ("affine", "remove")
#: The older method names of the replacements (the ``method`` key of ``config.nbl``).
_METHOD_OF = {"affine": "nbl", "remove": "drop"}
_REPLACEMENT_OF = {method: replacement for replacement, method in _METHOD_OF.items()}
#: Attribute of a linearized model holding the JSON-able calibration summary (for save_pretrained).
SUMMARY_ATTR = "_nbl_calibration_summary"


class AffineResidual(nn.Linear):
    """``h + h @ weight.T + bias``: the linear map replacing an attention branch (with its residual).

    An ``nn.Linear`` (d -> d) whose forward adds its input back: the residual is part of the
    module, ``weight`` and ``bias`` are the fitted W and b (state-dict keys ``weight``/``bias``).
    Being an ``nn.Linear`` lets peft target it: ``peft.tuners.lora.Linear`` computes
    ``base_layer(x) + B A x = h + (W + BA) h + b``, and merging adds ``BA`` to W exactly.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no random initialization to throw away
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return ops.affine_residual(h, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, dtype={self.weight.dtype}"


def resolve_replacement(replacement: str | None, method: str | None, what: str) -> str:
    """The replacement ("affine" or "remove") from ``replacement`` and/or the older ``method`` ("nbl", "drop")."""
    if method is not None:
        check_choice(method, METHODS, "method", what=what)
    if replacement is not None:
        check_choice(replacement, REPLACEMENTS, "replacement", what=what)
    if method is not None and replacement is not None and _REPLACEMENT_OF[method] != replacement:
        raise ValueError(
            f"{what}: method={method!r} means replacement={_REPLACEMENT_OF[method]!r}, "
            f"but replacement={replacement!r} was given; pass one of them"
        )
    if replacement is not None:
        return replacement
    return _REPLACEMENT_OF[method] if method is not None else "affine"


def method_name(replacement: str) -> str:
    """The older method name ("nbl" / "drop") of a replacement."""
    return _METHOD_OF[replacement]


class LinearizedLayerMixin:
    """Forward of a decoder layer whose attention branch was linearized ("nbl": the affine map) or removed ("drop")."""

    _nbl_adapter: ClassVar[type[Adapter]]
    nbl_method: str
    nbl_layer_idx: int
    nbl_release_kv: bool

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if hidden_states is None:
            hidden_states = kwargs["hidden_states"]
        cache = kwargs.get("past_key_values")
        if cache is not None and self.nbl_release_kv:
            release_kv_slot(cache, self.nbl_layer_idx)
        h = self.nbl_affine(hidden_states) if self.nbl_method == "nbl" else hidden_states
        return self._nbl_adapter.mlp_half(self, h)


_CLASSES: dict[tuple[type, type], type] = {}


def _linearized_class(base: type, adapter_cls: type[Adapter]) -> type:
    key = (base, adapter_cls)
    if key not in _CLASSES:
        _CLASSES[key] = type(
            f"NBL{base.__name__}", (LinearizedLayerMixin, base), {"_nbl_adapter": adapter_cls, "__module__": __name__}
        )
    return _CLASSES[key]


def is_linearized(layer: nn.Module) -> bool:
    return isinstance(layer, LinearizedLayerMixin)


def _layer_dtype_device(layer: nn.Module, adapter: Adapter) -> tuple[torch.dtype, torch.device]:
    for name in adapter.mlp_modules:
        for p in getattr(layer, name).parameters():
            if p.is_floating_point():
                return p.dtype, p.device
    raise ValueError("cannot determine the dtype/device of a decoder layer's MLP (no float parameters)")


def convert_layer(
    adapter: Adapter,
    index: int,
    replacement: str,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    release_kv: bool = True,
    structure_only: bool = False,
) -> nn.Module:
    """Replace the attention branch of decoder layer ``index`` by its affine map, or remove it, in place.

    ``structure_only``: give the layer a zero map (W = 0, b = 0) of the model's dtype on the layer's device
    (free on the meta device) instead of ``weight``, ``bias``: the real map is loaded next (from_pretrained).
    """
    layer = adapter.layers()[index]
    if is_linearized(layer):
        raise ValueError(f"decoder layer {index} is already linearized ({layer.nbl_method})")
    dtype, device = _layer_dtype_device(layer, adapter)
    affine = None
    if replacement == "affine" and structure_only:
        d = adapter.hidden_size
        affine = AffineResidual(
            torch.zeros(d, d, dtype=dtype, device=device), torch.zeros(d, dtype=dtype, device=device)
        )
    elif replacement == "affine":
        d = adapter.hidden_size
        if weight is None or bias is None or tuple(weight.shape) != (d, d) or tuple(bias.shape) != (d,):
            raise ValueError(f"decoder layer {index}: W must be ({d}, {d}) and b ({d},)")
        if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())):
            raise ValueError(f"decoder layer {index}: W or b contains NaN or inf")
        # Own copies: never alias the caller's tensors (or one placeholder across layers).
        affine = AffineResidual(
            weight.detach().to(device=device, dtype=dtype, copy=True).contiguous(),
            bias.detach().to(device=device, dtype=dtype, copy=True).contiguous(),
        )
    for name in adapter.branch_modules:
        delattr(layer, name)  # the attention weights are freed here
    layer.__class__ = _linearized_class(type(layer), type(adapter))
    layer.nbl_method = method_name(replacement)
    layer.nbl_layer_idx = index
    layer.nbl_release_kv = release_kv
    if affine is not None:
        layer.nbl_affine = affine
    return layer


def _check_result(result: Any, adapter: Adapter) -> CalibrationResult:
    if not isinstance(result, CalibrationResult):
        raise TypeError(
            f"linearize: result must be a CalibrationResult (from nbl_ext.calibrate), got {type(result).__name__}"
        )
    mismatch = [
        f"{k}: result {result.metadata.get(k)!r} vs model {v!r}"
        for k, v in (
            ("model_type", adapter.model_type),
            ("num_layers", adapter.num_layers),
            ("hidden_size", adapter.hidden_size),
        )
        if result.metadata.get(k) != v
    ]
    if mismatch:
        raise ValueError(f"linearize: the calibration result does not match the model ({'; '.join(mismatch)})")
    return result


def nbl_config(replacement: str, layers: list[int], refit: str | None, adapter: Adapter) -> dict[str, Any]:
    """The ``config.nbl`` section describing a linearization."""
    return {
        "version": NBL_CONFIG_VERSION,
        "method": method_name(replacement),
        "layers": list(layers),
        "target": "attn",
        "refit": refit,
        "num_hidden_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "removed_modules": list(adapter.branch_modules),
        "replacement": (
            "out = mlp_half(h + h @ nbl_affine.weight.T + nbl_affine.bias)"
            if replacement == "affine"
            else "out = mlp_half(h)"
        ),
        "kv_cache": KV_CACHE_NOTE,
    }


def apply_structure(
    model: nn.Module,
    adapter: Adapter,
    replacement: str,
    layers: list[int],
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]] | None,
    refit: str | None,
    *,
    structure_only: bool = False,
) -> None:
    """Convert ``layers`` and record the linearization on the config (shared with load_pretrained).

    ``replacement``: "affine" or "remove" (or the older names "nbl", "drop"). ``structure_only``: zero maps
    that the caller loads next (see :func:`convert_layer`); ``weights`` unused.
    """
    replacement = _REPLACEMENT_OF.get(replacement, replacement)
    n = adapter.num_layers
    if replacement == "affine" and not structure_only:  # validate every map before touching the model
        d = adapter.hidden_size
        for i in layers:
            w, b = weights[i] if weights is not None and i in weights else (None, None)
            if w is None or b is None or tuple(w.shape) != (d, d) or tuple(b.shape) != (d,):
                raise ValueError(f"linearize: layer {i} needs W of shape ({d}, {d}) and b of shape ({d},)")
            if not (bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())):
                raise ValueError(f"linearize: the map of layer {i} contains NaN or inf")
    for i in layers:
        w, b = weights[i] if weights is not None and i in weights else (None, None)
        if not is_linearized(adapter.layers()[i]):
            convert_layer(
                adapter, i, replacement, w, b, release_kv=not keeps_kv_slot(i, layers, n), structure_only=structure_only
            )
    finalize_config(adapter, replacement, layers, refit)


def finalize_config(adapter: Adapter, replacement: str, layers: list[int], refit: str | None) -> None:
    """Record a linearization of ``layers`` on the model's config: cache slots and the ``nbl`` section."""
    if layers:
        setattr(adapter.text_config, KV_SHARING_ATTR, kv_sharing_modes(layers, adapter.num_layers))
    adapter.config.nbl = nbl_config(replacement, layers, refit, adapter)
    as_nbl_model(adapter.model)


def linearize(
    model: nn.Module,
    result: CalibrationResult | None,
    layers: Any,
    method: str | None = None,
    refit: str | None = None,
    *,
    replacement: str | None = None,
    data: torch.Tensor | None = None,
    batch_size: int = 1,
    progress: bool = False,
    ridge: float = 0.0,
    folds: int = 1,
    ridges: Any = None,
) -> nn.Module:
    """Replace the attention of the given decoder layers by fitted affine maps, or remove it, in place.

    Args:
        model: the original (not yet linearized) Hugging Face causal LM.
        result: its :class:`CalibrationResult` (needed for "affine" without refit;
            checked against the model's shape).
        layers: explicit layer indices (e.g. ``result.select(k, criterion=...)``).
        method: the older name of ``replacement``: "nbl" (affine) or "drop" (remove).
        replacement: "affine" (the map fitted in closed form; default) or "remove"
            (branch removed, DROP).
        refit: None, or "sequential": re-fit each chosen layer's W, b in order on
            the partially linearized model, so each map sees the inputs it will
            get at inference. Needs ``data`` (token ids, as for calibrate).
        data, batch_size, progress, ridge, folds, ridges: calibration settings for refit (as for
            :func:`nbl_ext.calibrate`: with ``folds`` and a ``ridges`` grid each re-fitted map gets its
            cross-validated ridge).

    Returns the model. ``model.config.nbl`` records what was done. Arguments
    are validated before the model is touched; an error *during* a sequential
    refit (e.g. NaN activations) leaves the model partially linearized.
    """
    adapter = get_adapter(model)
    replacement = resolve_replacement(replacement, method, "linearize")
    check_choice(refit, REFIT_MODES, "refit", what="linearize")
    if getattr(adapter.config, "nbl", None) or any(is_linearized(layer) for layer in adapter.layers()):
        raise ValueError(
            "linearize: this model is already linearized (config.nbl is set); linearize the original model, "
            "choosing all layers in one call"
        )
    chosen = check_layer_list(layers, adapter.num_layers, "linearize")
    summary: dict[str, Any] = {}
    if result is not None:
        summary["calibration"] = _check_result(result, adapter).summary()
    if refit is not None:
        if replacement != "affine":
            raise ValueError(
                "linearize: refit applies to method='nbl' only (replacement='affine'; removed layers have no map)"
            )
        if data is None:
            raise ValueError(
                "linearize: refit='sequential' needs calibration token ids: linearize(..., data=token_ids)"
            )
        summary["refit"] = [
            lc.summary()
            for lc in _refit_sequential(model, adapter, chosen, data, batch_size, progress, ridge, folds, ridges)
        ]
        finalize_config(adapter, replacement, chosen, refit)
    else:
        weights = None
        if replacement == "affine":
            if result is None:
                raise ValueError("linearize: method='nbl' needs the CalibrationResult (W, b) from nbl_ext.calibrate")
            weights = {i: (result.layers[i].weight, result.layers[i].bias) for i in chosen}
        apply_structure(model, adapter, replacement, chosen, weights, refit)
    setattr(model, SUMMARY_ATTR, summary or None)
    return model


def _refit_sequential(
    model: nn.Module,
    adapter: Adapter,
    chosen: list[int],
    data: torch.Tensor,
    batch_size: int,
    progress: bool,
    ridge: float,
    folds: int = 1,
    ridges: Any = None,
) -> list[LayerCalibration]:
    """Fit chosen layers in order, each on the model with the earlier ones already linearized."""
    check_count(batch_size, "batch_size", what="linearize")
    data = check_token_data(data, adapter.vocab_size, "linearize(refit)")
    folds, ridges = check_fold_settings(folds, ridges, ridge, int(data.shape[0]), "linearize(refit)")
    local, offset = shard(data)
    rank, _ = dist_info()
    out: list[LayerCalibration] = []
    if not chosen:
        return out
    last = chosen[-1]
    n = adapter.num_layers
    steps = (len(chosen) + last) * -(-local.shape[0] // batch_size)  # score passes + propagation passes
    pbar = progress_bar(steps, progress and rank == 0, "NBL sequential refit")
    try:
        with tempfile.TemporaryDirectory(prefix="nbl-refit-") as spill, eval_mode(model):
            runner = LayerwiseRunner(
                model,
                adapter,
                local,
                batch_size=batch_size,
                spill_dir=Path(spill),
                sample_offset=offset,
                pbar=pbar,
                folds=folds,
            )
            stream = token_statistics()
            for i in range(last + 1):
                if i in chosen:
                    stats = runner.run(i, score=True, write=False, token_stats=stream)
                    all_reduce_stats(stats)
                    lc = score_layer(stats, ridge, ridges=ridges)
                    out.append(lc)
                    convert_layer(adapter, i, "affine", lc.weight, lc.bias, release_kv=not keeps_kv_slot(i, chosen, n))
                if i < last:
                    runner.run(i, score=False, write=True)
                runner.drop_boundary(i)
    finally:
        if pbar is not None:
            pbar.close()
    return out


# --- the model-level classes of a linearized model -------------------------------------------------------
#
# A linearized model is an instance of ``NBL<Base>`` (e.g. NBLLlamaForCausalLM, a subclass of LlamaForCausalLM)
# with an ``NBL<Base>Config`` (model_type "nbl_llama"). Linearizing in place swaps both classes; constructing the
# class from a config (what transformers' from_pretrained does, on the meta device) builds the base architecture
# and converts the layers listed in ``config.nbl`` before transformers' own bookkeeping runs (post_init), so the
# weights that are loaded next land in the right modules. Plain transformers does not know the "nbl_*" model
# types: without nbl_ext a checkpoint fails to load at once instead of loading random attention.

#: ``model_type`` of a linearized model's config: this prefix + the base family's model_type.
NBL_MODEL_TYPE_PREFIX = "nbl_"
_CONFIG_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}


def parse_nbl_section(nbl: Any, num_layers: int, hidden_size: int, what: str) -> tuple[str, list[int], Any]:
    """Validate a config's ``nbl`` section against the model shape: (method, sorted layers, refit)."""
    if not isinstance(nbl, dict):
        raise ValueError(f"{what}: config.json's 'nbl' section must be an object, got {type(nbl).__name__}")
    if nbl.get("version") != NBL_CONFIG_VERSION:
        raise ValueError(
            f"{what}: unsupported nbl section version {nbl.get('version')!r} (expected {NBL_CONFIG_VERSION})"
        )
    method = check_choice(nbl.get("method"), METHODS, "nbl.method", what=what)
    refit = check_choice(nbl.get("refit"), REFIT_MODES, "nbl.refit", what=what)
    for key, expected in (("num_hidden_layers", num_layers), ("hidden_size", hidden_size)):
        if nbl.get(key) != expected:
            raise ValueError(f"{what}: nbl.{key} is {nbl.get(key)!r} but the model config says {expected}")
    layers = nbl.get("layers")
    if not isinstance(layers, list):
        raise ValueError(f"{what}: nbl.layers must be a list of layer indices, got {layers!r}")
    for v in layers:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{what}: nbl.layers must hold ints, got {v!r}")
        if not 0 <= v < num_layers:
            raise ValueError(
                f"{what}: nbl.layers has index {v}, out of range for {num_layers} layers (0..{num_layers - 1})"
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"{what}: nbl.layers has repeated indices: {layers}")
    return method, sorted(layers), refit


def nbl_config_class(base: type) -> type:
    """The config class of a linearized model of the family of config class ``base`` (cached)."""
    if getattr(base, "nbl_base_model_type", None):
        return base
    if base not in _CONFIG_CLASSES:
        _CONFIG_CLASSES[base] = type(
            f"NBL{base.__name__}",
            (base,),
            {
                "__module__": __name__,
                "__doc__": f"{base.__name__} of a model linearized by nbl_ext (layers listed in ``nbl``).",
                "model_type": NBL_MODEL_TYPE_PREFIX + base.model_type,
                "nbl_base_model_type": base.model_type,
            },
        )
    return _CONFIG_CLASSES[base]


class NBLModelMixin:
    """A Hugging Face model whose decoder layers listed in ``config.nbl`` are linearized (or dropped)."""

    def post_init(self) -> None:
        # Runs at the end of the base class's __init__: the architecture exists (on the meta device under
        # from_pretrained), nothing is tied or initialized yet.
        if not any(is_linearized(layer) for layer in get_adapter(self).layers()):
            build_structure(self)
        super().post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' from_pretrained, strict: every tensor of the structure in config.json must be in the file."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = [
            f"{key.replace('_', ' ')} {sorted(map(str, info[key]))[:8]}"
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if info.get(key)
        ]
        if problems:
            raise ValueError(
                f"{cls.__name__}.from_pretrained({str(pretrained_model_name_or_path)!r}): the weights do not match "
                f"the linearized structure in config.json ({'; '.join(problems)}); the checkpoint is damaged or "
                "was edited. Re-save it with nbl_ext.save_pretrained"
            )
        return (model, info) if want_info else model


def nbl_model_class(base: type) -> type:
    """``NBL<base>``: the class of a linearized model of class ``base`` (a transformers model class; cached)."""
    if issubclass(base, NBLModelMixin):
        return base
    if base not in _MODEL_CLASSES:
        layer_names = list(getattr(base, "_no_split_modules", None) or [])
        _MODEL_CLASSES[base] = type(
            f"NBL{base.__name__}",
            (NBLModelMixin, base),
            {
                "__module__": __name__,
                "__doc__": f"{base.__name__} with the attention of the layers in ``config.nbl`` linearized (nbl_ext).",
                "config_class": nbl_config_class(base.config_class),
                # accelerate's device_map="auto" keeps a linearized layer (class NBL<Layer>) on one device too
                "_no_split_modules": layer_names + [f"NBL{name}" for name in layer_names],
            },
        )
    return _MODEL_CLASSES[base]


def as_nbl_config(config: Any) -> Any:
    """Swap a family's config object to its ``NBL<Base>Config`` class, in place (no-op when done)."""
    config.__class__ = nbl_config_class(type(config))
    if "model_type" in vars(config):  # configs read from a file carry the model_type as an instance attribute
        config.model_type = type(config).model_type
    return config


def as_nbl_model(model: nn.Module) -> nn.Module:
    """Swap a model linearized in place to its ``NBL<Base>`` class and ``NBL<Base>Config`` (no-op when done)."""
    as_nbl_config(model.config)
    model.__class__ = nbl_model_class(type(model))
    return model


def build_structure(model: nn.Module) -> None:
    """Convert the layers listed in ``model.config.nbl`` (zero maps, to be loaded next) and set the KV slots."""
    adapter = get_adapter(model)
    config = adapter.config
    what = f"{type(model).__name__}({str(getattr(config, '_name_or_path', '') or 'config')!r})"
    nbl = getattr(config, "nbl", None)
    if nbl is None:
        raise ValueError(
            f"{what}: the config has no 'nbl' section (which layers are linearized); "
            "linearize a model with nbl_ext.linearize or load a checkpoint written by nbl_ext"
        )
    method, layers, refit = parse_nbl_section(nbl, adapter.num_layers, adapter.hidden_size, what)
    setattr(adapter.text_config, KV_SHARING_ATTR, None)  # re-derived from the nbl section, not trusted from the file
    apply_structure(model, adapter, method, layers, None, refit, structure_only=True)
    if nbl.get("config") is not None:  # the NBLConfig of the run (nbl_ext.compress), checked by load_pretrained
        config.nbl["config"] = nbl["config"]
