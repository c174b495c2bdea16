"""Self-contained, atomic checkpoints of linearized models (safetensors + JSON, no pickle).

Directory layout (what ``transformers`` writes, plus the nbl files)::

    config.json                   the HF config: model_type "nbl_<family>" and the ``nbl`` section
                                  (method, layers, how); plain transformers refuses the unknown model type
    generation_config.json        if the model has one
    model.safetensors             every weight, including each linearized layer's W, b; or, above
    model-0000i-of-0000n.safetensors + model.safetensors.index.json   max_shard_size, as transformers shards
    nbl_calibration.json          per-layer bound / nmse / cosine, when known
    README.md                     the model card (base model, replaced layers, criterion, data, how to load)
    modeling_nbl.py               with remote_code=True: pure-PyTorch classes for trust_remote_code=True
    tokenizer files               when a tokenizer is given

Loading is transformers' own ``from_pretrained`` (meta-device construction, sharded safetensors, dtype,
device_map and offload) through the classes ``import nbl_ext`` registers (:mod:`nbl_ext.hf`).
:func:`load_pretrained` checks the directory first (tampered config, missing or mis-shaped tensors,
truncated files, paths outside it, foreign remote code) and then takes that path; it also loads
checkpoints written before the "nbl_*" model types (model_type of the base family + ``nbl`` section).
It never runs remote code.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nbl_ext._io import atomic_directory, atomic_write_json, atomic_write_text, check_inside, read_json
from nbl_ext.adapters import get_adapter, supported_model_types
from nbl_ext.kvcache import KV_SHARING_ATTR
from nbl_ext.linearize import (
    NBL_MODEL_TYPE_PREFIX,
    SUMMARY_ATTR,
    as_nbl_config,
    is_linearized,
    nbl_model_class,
    parse_nbl_section,
)
from nbl_ext.modelcard import model_card

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
SUMMARY = "nbl_calibration.json"
#: What ``nbl compress`` writes next to the checkpoint: the run's NBLConfig and what it did.
RUN = "nbl_run.json"
MODEL_CARD = "README.md"
#: The pure-PyTorch modeling file written with remote_code=True (its source: nbl_ext/remote_modeling.py).
REMOTE_CODE = "modeling_nbl.py"
#: transformers' default shard size.
DEFAULT_MAX_SHARD_SIZE = "50GB"


def remote_auto_map(model_type: str) -> dict[str, str]:
    """The ``auto_map`` that save_pretrained(remote_code=True) writes for family ``model_type``."""
    from nbl_ext.hf import family_classes

    config_cls, model_cls = family_classes(model_type)
    stem = REMOTE_CODE.removesuffix(".py")
    return {"AutoConfig": f"{stem}.{config_cls.__name__}", "AutoModelForCausalLM": f"{stem}.{model_cls.__name__}"}


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    calibration: Any = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    remote_code: bool = False,
    quality: dict[str, Any] | None = None,
) -> None:
    """Write ``model`` (linearized or not) to directory ``path``, atomically.

    The directory is assembled next to ``path`` and renamed into place; an
    existing ``path`` is replaced only once the new one is complete.
    ``calibration`` (a CalibrationResult) overrides the summary recorded by
    :func:`nbl_ext.linearize`. Weights above ``max_shard_size`` (bytes or a
    string such as ``"5GB"``) are split into shards with transformers' index
    file. ``remote_code=True`` also writes :data:`REMOTE_CODE` and the config's
    ``auto_map``, so ``from_pretrained(path, trust_remote_code=True)`` loads the
    model where nbl_ext is not installed. ``quality`` (e.g. ``{"wikitext2_ppl":
    12.3}``) goes into the model card.
    """
    adapter = get_adapter(model)  # supported family (load_pretrained needs it)
    linearized = any(is_linearized(layer) for layer in adapter.layers())
    if remote_code and not linearized:
        raise ValueError(
            "save_pretrained: remote_code=True is for linearized models (nbl_ext.linearize); "
            "a plain model loads with transformers alone"
        )
    meta = [k for k, v in model.state_dict().items() if v.device.type == "meta"]
    if meta:
        raise ValueError(
            f"save_pretrained: {len(meta)} tensors are offloaded (on the meta device, e.g. "
            f"{meta[0]}); load the model without disk offload to save it"
        )
    summary = calibration.summary() if calibration is not None else getattr(model, SUMMARY_ATTR, None)
    with atomic_directory(path) as tmp:
        config = copy.deepcopy(model.config)
        config.dtype = model.dtype  # the weights' dtype (model.to(dtype) does not update the config)
        config.architectures = [type(model).__name__]
        if remote_code:
            config.auto_map = remote_auto_map(adapter.model_type)
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        _write_weights(model, tmp, max_shard_size)
        if summary:
            atomic_write_json(tmp / SUMMARY, summary)
        if remote_code:
            atomic_write_text(tmp / REMOTE_CODE, (Path(__file__).parent / "remote_modeling.py").read_text("utf-8"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        atomic_write_text(
            tmp / MODEL_CARD,
            model_card(
                json.loads((tmp / CONFIG).read_text("utf-8")), summary, quality=quality, remote_code=remote_code
            ),
        )


def _write_weights(model: nn.Module, directory: Path, max_shard_size: int | str) -> None:
    """model.safetensors, or shards + the index file, as transformers writes them.

    Tied weights are stored once under the name transformers keeps (the source, e.g.
    ``model.embed_tokens.weight``, not ``lm_head.weight``): from_pretrained then loads it in place, where a
    checkpoint holding only the tied target makes it materialize the source first (+ its size in host memory).
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for shard, names in split.filename_to_tensors.items():
        save_file(
            {k: state[k].detach().contiguous().cpu() for k in names}, str(directory / shard), metadata={"format": "pt"}
        )
    if split.is_sharded:
        atomic_write_json(
            directory / WEIGHTS_INDEX,
            {
                "metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                "weight_map": split.tensor_to_filename,
            },
        )


def _check_run_config(nbl: dict, what: str) -> Any:
    """The NBLConfig a checkpoint written by nbl_ext.compress records (None for other checkpoints)."""
    from nbl_ext.config import NBLConfig

    if nbl.get("config") is None:
        return None
    try:
        return NBLConfig.from_dict(nbl["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: config.json's nbl.config is not a valid NBLConfig ({exc})") from None


def _weight_files(root: Path, what: str) -> tuple[list[Path], Path]:
    """The safetensors files of a checkpoint (one, or the shards its index lists) and the file to name in errors."""
    index = check_inside(root, root / WEIGHTS_INDEX, what)
    if not index.is_file():
        weights = check_inside(root, root / WEIGHTS, what)
        if not weights.is_file():
            raise FileNotFoundError(f"{what}: {WEIGHTS} is missing")
        return [weights], weights
    raw = read_json(index, what)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{what}: {WEIGHTS_INDEX} has no weight_map of tensor name -> shard file")
    files = []
    for name in sorted(set(weight_map.values())):
        shard = check_inside(root, root / name, what)
        if not shard.is_file():
            raise FileNotFoundError(f"{what}: shard {name} listed in {WEIGHTS_INDEX} is missing")
        files.append(shard)
    return files, index


def _check_weights_file(model: nn.Module, files: list[Path], named: Path, what: str) -> None:
    """Clear errors for missing / unexpected / mis-shaped tensors (tied weights stored once)."""
    from safetensors import safe_open

    state = model.state_dict()  # of a meta-device skeleton: names and shapes
    found: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as exc:  # SafetensorError is not exported
            raise ValueError(f"{what}: {file.name} is not a valid safetensors file ({exc})") from None
    shared: dict[str, set[str]] = {}  # tied weights (stored once): either name in the file will do
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        shared.setdefault(target, {target}).add(source)
        shared.setdefault(source, {source}).add(target)
    missing = [k for k in state if not shared.get(k, {k}) & found.keys()]
    unexpected = sorted(k for k in found if k not in state)
    bad = [
        f"{k}: file {found[k]} vs model {tuple(state[k].shape)}"
        for k in found
        if k in state and found[k] != tuple(state[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if bad:
        problems.append(f"wrong shapes [{'; '.join(bad[:8])}]")
    if problems:
        raise ValueError(f"{what}: {named.name} does not match the architecture in config.json: " + ", ".join(problems))


def load_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a checkpoint written by :func:`save_pretrained`; its logits equal the saved model's.

    Checks the directory, then calls transformers' ``from_pretrained`` of the
    model's class (never remote code). ``kwargs`` go to it (``dtype``,
    ``device_map``, ``offload_folder``, ``attn_implementation``, ...);
    ``device`` (popped) is ``device_map={"": device}``. The default dtype is the
    saved one. Raises ValueError naming the problem for a directory that does
    not match (tampered config, missing tensors, wrong shapes).
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    root = Path(path)
    what = f"load_pretrained({str(root)!r})"
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: not a directory")
    config_file = check_inside(root, root / CONFIG, what)
    files, named = _weight_files(root, what)
    raw = read_json(config_file, what)
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: config.json must be a JSON object")
    model_type = raw.get("model_type")
    family = (
        model_type[len(NBL_MODEL_TYPE_PREFIX) :]
        if isinstance(model_type, str) and model_type.startswith(NBL_MODEL_TYPE_PREFIX)
        else model_type
    )
    if family not in supported_model_types():
        raise ValueError(
            f"{what}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(supported_model_types())} (and their linearized nbl_* types)"
        )
    if "auto_map" in raw and (family == model_type or raw["auto_map"] != remote_auto_map(family)):
        raise ValueError(
            f"{what}: config.json refers to remote code (auto_map) that nbl_ext did not write; "
            "nbl_ext never runs remote code"
        )
    config = AutoConfig.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
    text = config.get_text_config(decoder=True)
    nbl = raw.get("nbl")
    structure = (
        parse_nbl_section(nbl, int(text.num_hidden_layers), int(text.hidden_size), what) if nbl is not None else None
    )
    run_config = _check_run_config(nbl, what) if structure is not None else None
    if structure is None and getattr(text, KV_SHARING_ATTR, None) is not None:
        raise ValueError(f"{what}: config.json has kv_sharing_modes but no nbl section; it was not written by nbl_ext")
    if structure is None and family != model_type:
        raise ValueError(f"{what}: config.json has model_type {model_type!r} but no nbl section")
    if structure is not None:
        as_nbl_config(config)  # checkpoints written before the nbl_* model types have the family's model_type
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[family]]
    if structure is not None:
        model_cls = nbl_model_class(model_cls)
    with torch.device("meta"):
        skeleton = model_cls(copy.deepcopy(config))  # the structure, no memory: names and shapes to check
    _check_weights_file(skeleton, files, named, what)
    del skeleton
    device = kwargs.pop("device", None)
    if device is not None:
        kwargs.setdefault("device_map", {"": device})
    kwargs.setdefault("dtype", getattr(config, "dtype", None) or torch.float32)
    model = model_cls.from_pretrained(str(root), config=config, local_files_only=True, **kwargs)
    if run_config is not None:
        model.config.nbl["config"] = run_config.to_dict()
    summary_file = root / SUMMARY
    if summary_file.is_file():
        setattr(model, SUMMARY_ATTR, read_json(check_inside(root, summary_file, what), what))
    return model.eval()
