"""Self-contained, atomic checkpoints of linearized models (safetensors + JSON, no pickle).

Directory layout::

    config.json              the HF config, with the ``nbl`` section (method, layers, how)
    generation_config.json   if the model has one
    model.safetensors        every weight, including each linearized layer's W, b
    nbl_calibration.json     per-layer bound / nmse / cosine, when known
    tokenizer files          when a tokenizer is given

``load_pretrained`` rebuilds the architecture from config.json
(``AutoModelForCausalLM.from_config``, never remote code), applies the same
linearization structure and loads the weights strictly.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nbl_ext._io import atomic_directory, atomic_write_json, check_inside, read_json
from nbl_ext.adapters import get_adapter, supported_model_types
from nbl_ext.kvcache import KV_SHARING_ATTR
from nbl_ext.linearize import NBL_CONFIG_VERSION, REFIT_MODES, SUMMARY_ATTR, apply_structure
from nbl_ext.result import METHODS
from nbl_ext.validation import check_choice

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SUMMARY = "nbl_calibration.json"
#: What ``nbl compress`` writes next to the checkpoint: the run's NBLConfig and what it did.
RUN = "nbl_run.json"


def save_pretrained(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, *,
                    calibration: Any = None) -> None:
    """Write ``model`` (linearized or not) to directory ``path``, atomically.

    The directory is assembled next to ``path`` and renamed into place; an
    existing ``path`` is replaced only once the new one is complete.
    ``calibration`` (a CalibrationResult) overrides the summary recorded by
    :func:`nbl_ext.linearize`.
    """
    from safetensors.torch import save_model

    get_adapter(model)  # supported family (load_pretrained needs it)
    summary = calibration.summary() if calibration is not None else getattr(model, SUMMARY_ATTR, None)
    with atomic_directory(path) as tmp:
        config = copy.deepcopy(model.config)
        config.dtype = model.dtype  # the weights' dtype (model.to(dtype) does not update the config)
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if summary:
            atomic_write_json(tmp / SUMMARY, summary)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def _check_nbl_section(nbl: Any, num_layers: int, hidden_size: int, what: str) -> tuple[str, list[int], Any]:
    if not isinstance(nbl, dict):
        raise ValueError(f"{what}: config.json's 'nbl' section must be an object, got {type(nbl).__name__}")
    if nbl.get("version") != NBL_CONFIG_VERSION:
        raise ValueError(f"{what}: unsupported nbl section version {nbl.get('version')!r} (expected {NBL_CONFIG_VERSION})")
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
            raise ValueError(f"{what}: nbl.layers has index {v}, out of range for {num_layers} layers (0..{num_layers - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{what}: nbl.layers has repeated indices: {layers}")
    return method, sorted(layers), refit


def _check_run_config(nbl: dict, what: str) -> Any:
    """The NBLConfig a checkpoint written by nbl_ext.compress records (None for other checkpoints)."""
    from nbl_ext.config import NBLConfig

    if nbl.get("config") is None:
        return None
    try:
        return NBLConfig.from_dict(nbl["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: config.json's nbl.config is not a valid NBLConfig ({exc})") from None


def _check_weights_file(model: nn.Module, file: Path, what: str) -> None:
    """Clear errors for missing / unexpected / mis-shaped tensors (tied weights stored once)."""
    from safetensors import safe_open
    from safetensors.torch import _remove_duplicate_names

    state = model.state_dict()
    try:
        with safe_open(str(file), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # SafetensorError is not exported
        raise ValueError(f"{what}: {file.name} is not a valid safetensors file ({exc})") from None
    groups = _remove_duplicate_names(state)  # kept name -> names sharing its storage
    shared = {name: [kept, *others] for kept, others in groups.items() for name in [kept, *others]}
    missing = [k for k in state if not any(n in found for n in shared.get(k, [k]))]
    unexpected = sorted(k for k in found if k not in state)
    bad = [f"{k}: file {found[k]} vs model {tuple(state[k].shape)}" for k in found
           if k in state and found[k] != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if bad:
        problems.append(f"wrong shapes [{'; '.join(bad[:8])}]")
    if problems:
        raise ValueError(f"{what}: {file.name} does not match the architecture in config.json: " + ", ".join(problems))


def load_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained`; its logits equal the saved model's.

    ``kwargs`` go to ``AutoModelForCausalLM.from_config`` (e.g. ``dtype``,
    ``attn_implementation``); ``device`` (popped) moves the model afterwards.
    The default dtype is the saved one. Raises ValueError naming the problem
    for a directory that does not match (tampered config, missing tensors,
    wrong shapes).
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    root = Path(path)
    what = f"load_pretrained({str(root)!r})"
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: not a directory")
    config_file = check_inside(root, root / CONFIG, what)
    weights = check_inside(root, root / WEIGHTS, what)
    if not weights.is_file():
        raise FileNotFoundError(f"{what}: {WEIGHTS} is missing")
    raw = read_json(config_file, what)
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: config.json must be a JSON object")
    model_type = raw.get("model_type")
    if model_type not in supported_model_types():
        raise ValueError(f"{what}: model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}")
    if "auto_map" in raw:
        raise ValueError(f"{what}: config.json refers to remote code (auto_map); nbl_ext never runs remote code")
    config = AutoConfig.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
    text = config.get_text_config(decoder=True)
    num_layers, hidden = int(text.num_hidden_layers), int(text.hidden_size)
    nbl = raw.get("nbl")
    structure = _check_nbl_section(nbl, num_layers, hidden, what) if nbl is not None else None
    run_config = _check_run_config(nbl, what) if structure is not None else None
    if structure is None and getattr(text, KV_SHARING_ATTR, None) is not None:
        raise ValueError(f"{what}: config.json has kv_sharing_modes but no nbl section; it was not written by nbl_ext")
    # The structure is re-derived from the nbl section, not trusted from the file.
    setattr(text, KV_SHARING_ATTR, None)
    if hasattr(config, "nbl"):
        del config.nbl
    device = kwargs.pop("device", None)
    kwargs.setdefault("dtype", getattr(config, "dtype", None) or torch.float32)
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    adapter = get_adapter(model)
    if structure is not None:
        method, layers, refit = structure
        d = adapter.hidden_size
        placeholder = (torch.zeros(d, d), torch.zeros(d))
        apply_structure(model, adapter, method, layers, {i: placeholder for i in layers}, refit)
        if run_config is not None:
            model.config.nbl["config"] = run_config.to_dict()
    _check_weights_file(model, weights, what)
    load_model(model, str(weights), strict=True)
    if (root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(root), local_files_only=True)
    summary_file = root / SUMMARY
    if summary_file.is_file():
        setattr(model, SUMMARY_ATTR, read_json(check_inside(root, summary_file, what), what))
    model.eval()
    if device is not None:
        model.to(device)
    return model
