"""Layer-by-layer calibration: stream (X, A) of every attention branch into float64 statistics.

How one calibration runs (GPTQ/SliceGPT style, peak memory = one layer + one batch):

* a *recorder* pass per batch replaces decoder layers 0..i with identity
  modules and runs the model's own forward on the token ids, so the call that
  layer i would receive (attention masks, RoPE tables per layer type,
  position ids, ...) is built by the model's code for every family; the
  recorder for layer i stops the forward after recording (no lm_head);
* the *original* layer i then runs on the boundary hidden states (layer 0:
  the embeddings from the recorder; layer i > 0: the outputs of layer i - 1
  spilled to disk), with a forward hook on the module whose output is the
  branch output A (the adapter says which). X is the layer input.
  (X, A) stream into a :class:`~nbl_ext.stats.CovarianceAccumulator` and a
  streaming mean cosine(X, X + A) (the DROP score);
* layer i's outputs are the next layer's inputs: written per batch (safetensors,
  model dtype) to a spill directory, so nothing is held in memory across
  batches; or, on a GPU with room for them (``activations="auto"``), kept there:
  two boundaries (tokens x hidden x dtype each) live at a time, host memory
  stays flat, and the disk round trip (write + read of every boundary: 256 GiB
  for the 8B shape at 256 x 2048 tokens) is gone.

With ``output_dir`` every finished layer's statistics and the boundary for the
next layer are saved (atomically), so a killed run restarts where it stopped.
Under ``torch.distributed`` each rank calibrates a shard of the samples and
the accumulators are all-reduced before scoring.
"""
from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from nbl_ext._io import atomic_save_tensors, atomic_write_json, read_json, read_tensors
from nbl_ext.adapters import Adapter, get_adapter
from nbl_ext.linearize import is_linearized
from nbl_ext.numerics import SingularWarning, cca_bound, fit_linear, lmmse_nmse
from nbl_ext.result import CalibrationResult, LayerCalibration, layers_from_records
from nbl_ext.reference import GRAM_PRECISIONS
from nbl_ext.stats import CovarianceAccumulator

TARGETS = ("attn",)
_PROGRESS = "progress.json"
ACTIVATIONS = ("auto", "memory", "disk")
#: activations="auto" keeps the boundaries on a CUDA device when two of them take at most this share of its
#: free memory (the layer's own activations and the accumulator need the rest).
_MEMORY_SHARE = 0.25


# --- small utilities ------------------------------------------------------------


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _module_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where a module computes: accelerate's execution device when it is placed with a device_map (its
    offloaded weights sit on the meta device until the hook loads them), else its first parameter's device."""
    for sub in module.modules():
        device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for p in module.parameters():
        return p.device
    return default


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def check_token_data(data: Any, vocab_size: int, what: str) -> torch.Tensor:
    """Validate calibration token ids: a 2-D integer tensor (num_samples, seq_len) within the vocabulary."""
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"{what}: data must be a LongTensor of token ids (num_samples, seq_len), got {type(data).__name__}")
    if data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool:
        raise TypeError(f"{what}: data must hold integer token ids, got dtype {data.dtype}")
    if data.dim() != 2 or data.shape[0] < 1 or data.shape[1] < 1:
        raise ValueError(f"{what}: data must have shape (num_samples, seq_len) with both >= 1, got {tuple(data.shape)}")
    data = data.to(torch.long)
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what}: token ids must lie in [0, {vocab_size}) (the model's vocabulary); found [{lo}, {hi}]")
    return data


class _StopForward(Exception):
    """Raised by the recorder of the target layer: the rest of the forward is not needed."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: identity, and for the target layer records the call and stops."""

    def __init__(self, sink: dict | None) -> None:
        super().__init__()
        self._sink = sink

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._sink is not None:
            self._sink["args"], self._sink["kwargs"] = args, kwargs
            raise _StopForward
        return args[0] if args else kwargs["hidden_states"]


def record_layer_call(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, index: int) -> tuple[tuple, dict]:
    """(args, kwargs) the model's forward passes to decoder layer ``index`` for these token ids.

    Layers 0..index are swapped for recorders (identity) for the duration of
    one forward; ``args[0]`` is then the embedding output.
    """
    layers = adapter.layers()
    originals = [layers[j] for j in range(index + 1)]
    sink: dict = {}
    try:
        for j in range(index + 1):
            layers[j] = _Recorder(sink if j == index else None)
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
    finally:
        for j, module in enumerate(originals):
            layers[j] = module
    if not sink:
        raise RuntimeError(f"the forward of {type(model).__name__} never called decoder layer {index}")
    return sink["args"], sink["kwargs"]


def run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Call a decoder layer as the model would, on other hidden states, without a KV cache."""
    kwargs = dict(kwargs)
    kwargs["past_key_values"] = None
    kwargs["use_cache"] = False
    if args:
        return _hidden(layer(hidden, *args[1:], **kwargs))
    kwargs["hidden_states"] = hidden
    return _hidden(layer(**kwargs))


# --- the layer-by-layer engine ----------------------------------------------------------


class LayerwiseRunner:
    """Propagates a shard of calibration samples through the decoder one layer at a time.

    Input of layer 0: the embeddings (from the recorder). Input of layer i > 0:
    ``spill_dir/boundary_{i:04d}/batch_*.safetensors`` written while running
    layer i - 1. Used by :func:`calibrate` and by sequential refitting.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, samples: torch.Tensor, *, batch_size: int,
                 spill_dir: Path | None, sample_offset: int = 0, pbar: Any = None,
                 gram_precision: str = "float32") -> None:
        self.model, self.adapter = model, adapter
        self.gram_precision = gram_precision
        self.batches = list(samples.split(batch_size)) if samples.shape[0] else []
        self.batch_size = batch_size
        # spill_dir None: boundaries stay in memory, on the device of the layer that produced them.
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._memory: dict[int, list[torch.Tensor]] = {}
        self.sample_offset = sample_offset
        self.pbar = pbar
        self.input_device = _module_device(model.get_input_embeddings(), torch.device("cpu"))

    def boundary(self, i: int) -> Path:
        if self.spill_dir is None:
            raise RuntimeError("LayerwiseRunner: boundaries are kept in memory (spill_dir=None), not on disk")
        return self.spill_dir / f"boundary_{i:04d}"

    def has_boundary(self, i: int) -> bool:
        if i == 0:
            return True
        if self.spill_dir is None:
            return len(self._memory.get(i, ())) == len(self.batches)
        return all((self.boundary(i) / f"batch_{b:06d}.safetensors").is_file() for b in range(len(self.batches)))

    def drop_boundary(self, i: int) -> None:
        if i > 0:
            if self.spill_dir is None:
                self._memory.pop(i, None)
            else:
                shutil.rmtree(self.boundary(i), ignore_errors=True)

    def _read(self, i: int, b: int, device: torch.device) -> torch.Tensor:
        if self.spill_dir is None:
            return self._memory[i][b].to(device)
        return read_tensors(self.boundary(i) / f"batch_{b:06d}.safetensors", "calibrate",
                            device=str(device))["hidden_states"]

    def _where(self, i: int, b: int) -> str:
        lo = self.sample_offset + b * self.batch_size
        hi = lo + self.batches[b].shape[0] - 1
        return f"decoder layer {i}, batch {b} (samples {lo}..{hi})"

    def run(self, i: int, *, score: bool, write: bool) -> tuple[CovarianceAccumulator, torch.Tensor] | None:
        """Run layer i on every batch; optionally score its branch and write its outputs.

        Returns (accumulator of (X, A), tensor [sum of cosines, count]) when scoring.
        """
        layer = self.adapter.layers()[i]
        device = _module_device(layer, self.input_device)
        d = self.adapter.hidden_size
        acc = cos = captured = handle = None
        if score:
            acc = CovarianceAccumulator(d, d, device=device, precision=self.gram_precision)
            cos = torch.zeros(2, dtype=torch.float64, device=device)
            module, pick = self.adapter.branch_output(layer)
            captured = []
            handle = module.register_forward_hook(lambda _m, _a, out: captured.append(pick(out)))
        out_dir = tmp_dir = None
        outputs: list[torch.Tensor] = []
        if write and self.spill_dir is not None:
            out_dir = self.boundary(i + 1)
            tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir(parents=True)
        try:
            for b, ids in enumerate(self.batches):
                args, kwargs = record_layer_call(self.model, self.adapter, ids.to(self.input_device), i)
                args, kwargs = _to_device(args, device), _to_device(kwargs, device)
                if i == 0:
                    x = args[0] if args else kwargs["hidden_states"]
                else:
                    x = self._read(i, b, device)
                if score:
                    captured.clear()
                out = run_layer(layer, x, args, kwargs)
                if score:
                    if len(captured) != 1:
                        raise RuntimeError(f"{self._where(i, b)}: the branch-output hook fired {len(captured)} times (expected 1)")
                    a = captured[0]
                    if a.shape != x.shape:
                        raise RuntimeError(f"{self._where(i, b)}: branch output shape {tuple(a.shape)} != input shape {tuple(x.shape)}")
                    try:
                        acc.update(x, a)
                    except ValueError as exc:
                        raise ValueError(f"calibrate: non-finite activations in {self._where(i, b)}: {exc}") from exc
                    xf = x.float()
                    c = torch.nn.functional.cosine_similarity(xf, xf + a.float(), dim=-1)
                    cos[0] += c.sum(dtype=torch.float64)
                    cos[1] += c.numel()
                if not bool(torch.isfinite(out).all()):
                    raise ValueError(f"calibrate: non-finite outputs (NaN or inf) of {self._where(i, b)}")
                if write and tmp_dir is not None:
                    atomic_save_tensors(tmp_dir / f"batch_{b:06d}.safetensors", {"hidden_states": out})
                elif write:
                    outputs.append(out)
                if self.pbar is not None:
                    self.pbar.update(1)
        finally:
            if handle is not None:
                handle.remove()
        if write and tmp_dir is not None:
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp_dir.replace(out_dir)
        elif write:
            self._memory[i + 1] = outputs  # complete boundaries only, like the disk's rename
        return (acc, cos) if score else None


def _all_reduce_scores(acc: CovarianceAccumulator, cos: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        acc.all_reduce()
        dist.all_reduce(cos)


def score_layer(i: int, acc: CovarianceAccumulator, cos: torch.Tensor, ridge: float) -> LayerCalibration:
    """NBL scores and LMMSE map of layer i from its (all-reduced) statistics."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w, b = fit_linear(acc, ridge)
        bound = cca_bound(acc, residual=True)
        if float(acc.cov_yy.trace()) > 0:
            nmse = lmmse_nmse(acc, w, b)
        else:  # A is constant: the bias alone reproduces it
            nmse = 0.0
    for wmsg in caught:  # re-emit with the layer named
        warnings.warn(f"decoder layer {i}: {wmsg.message}", wmsg.category if issubclass(wmsg.category, Warning)
                      else SingularWarning, stacklevel=3)
    n = float(cos[1])
    return LayerCalibration(
        layer=i, bound=float(bound), nmse=float(nmse), cosine=float(cos[0]) / n if n else float("nan"),
        tokens=int(acc.count), weight=w.detach().to("cpu", torch.float64).contiguous(),
        bias=b.detach().to("cpu", torch.float64).contiguous(),
    )


def weights_fingerprint(model: nn.Module, per_tensor: int = 4096) -> str:
    """Cheap identity of a model's weights (names, shapes, first elements): guards resume against a swapped model."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if p.device.type != "meta":
            h.update(p.detach().reshape(-1)[:per_tensor].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True)


def shard(data: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's contiguous shard of the samples and the index of its first sample."""
    rank, world = _dist_info()
    if world == 1:
        return data, 0
    if data.shape[0] < world:
        raise ValueError(f"calibrate: {data.shape[0]} samples cannot be sharded over {world} ranks (need >= 1 each)")
    parts = torch.arange(data.shape[0]).tensor_split(world)
    idx = parts[rank]
    return data[idx], int(idx[0])


def _boundaries_fit(model: nn.Module, adapter: Adapter, samples: torch.Tensor) -> bool:
    """activations="auto": True when the boundaries can stay on a CUDA device (see :func:`calibrate`)."""
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        return False  # on the host the spill directory keeps memory flat in the token count
    element = model.get_input_embeddings().weight.element_size()
    need = 2 * samples.numel() * adapter.hidden_size * element
    free, _ = torch.cuda.mem_get_info(device)
    return need <= _MEMORY_SHARE * free


# --- public entry point -----------------------------------------------------------


def calibrate(
    model: nn.Module,
    data: torch.Tensor,
    *,
    target: str = "attn",
    batch_size: int = 1,
    progress: bool = True,
    output_dir: str | Path | None = None,
    resume: bool = True,
    ridge: float = 0.0,
    gram_precision: str = "float32",
    activations: str = "auto",
) -> CalibrationResult:
    """Score every decoder layer's attention branch for NBL and fit its LMMSE map.

    Args:
        model: a Hugging Face causal LM of a supported family (see :func:`nbl_ext.get_adapter`).
        data: LongTensor (num_samples, seq_len) of token ids (packed, no padding).
        target: what to linearize; "attn" (the attention branch) is the one option.
        batch_size: samples per forward.
        progress: show a tqdm bar (layers x batches; rank 0 only).
        output_dir: if given, every finished layer's statistics and the next
            layer's inputs are saved there, so a killed run can resume; the final
            result is written to ``output_dir/calibration``.
        resume: continue from ``output_dir`` if it holds a compatible partial run
            (same model shape, data, batch size, world size, ridge); a mismatch
            is an error. ``False`` starts over.
        ridge: relative ridge for the LMMSE solve (see :func:`nbl_ext.fit_linear`).
        gram_precision: how the covariance accumulators form their Gram
            products: "float32" (default) or "bfloat16" (tensor-core speed on
            GPUs, a measured accuracy cost; see
            :class:`~nbl_ext.stats.CovarianceAccumulator`). Recorded in the
            metadata (a resumed run must use the same value).
        activations: where each layer's outputs (the next layer's inputs)
            wait: "disk" (a spill directory, one batch in memory at a time),
            "memory" (kept on the device that produced them: two boundaries of
            tokens x hidden x dtype at a time), or "auto" (default): "memory" on a
            CUDA device when two boundaries take at most a quarter of its free
            memory and no ``output_dir`` is given, else "disk". With
            ``output_dir`` the boundaries must be on disk (that is what a resumed
            run restarts from), so "memory" is refused there.

    Returns:
        :class:`CalibrationResult` with, per layer, the CCA bound between X and
        X + A, the NMSE of the fitted map, the mean cosine(X, X + A), and W, b.
    """
    adapter = get_adapter(model)
    if getattr(adapter.config, "nbl", None) or any(is_linearized(layer) for layer in adapter.layers()):
        raise ValueError("calibrate: this model is already linearized; calibrate the original model")
    if target not in TARGETS:
        raise ValueError(f"calibrate: target must be one of {TARGETS}, got {target!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"calibrate: batch_size must be a positive int, got {batch_size!r}")
    if gram_precision not in GRAM_PRECISIONS:
        raise ValueError(
            f"calibrate: gram_precision must be one of {', '.join(map(repr, GRAM_PRECISIONS))}, "
            f"got {gram_precision!r}"
        )
    if activations not in ACTIVATIONS:
        raise ValueError(f"calibrate: activations must be one of {', '.join(map(repr, ACTIVATIONS))}, "
                         f"got {activations!r}")
    if activations == "memory" and output_dir is not None:
        raise ValueError("calibrate: activations='memory' cannot be resumed; with output_dir the layer outputs "
                         "are spilled to disk (use activations='auto' or 'disk', or drop output_dir)")
    data = check_token_data(data, adapter.vocab_size, "calibrate")
    rank, world = _dist_info()
    local, offset = shard(data)
    n_layers = adapter.num_layers
    metadata = {
        "model_type": adapter.model_type,
        "name_or_path": str(getattr(adapter.config, "_name_or_path", "") or ""),
        "num_layers": n_layers,
        "hidden_size": adapter.hidden_size,
        "dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""),
        "target": target,
        "num_samples": int(data.shape[0]),
        "seq_len": int(data.shape[1]),
        "tokens": int(data.numel()),
        "batch_size": batch_size,
        "world_size": world,
        "ridge": float(ridge),
        "gram_precision": gram_precision,
        "data_sha256": hashlib.sha256(data.cpu().contiguous().numpy().tobytes()).hexdigest(),
        "weights_sha256": weights_fingerprint(model),
    }
    from nbl_ext import __version__

    metadata["nbl_ext_version"] = __version__

    out = Path(output_dir) if output_dir is not None else None
    done: list[LayerCalibration] = []
    with contextlib.ExitStack() as stack:
        if out is None:
            in_memory = activations == "memory" or (
                activations == "auto" and _boundaries_fit(model, adapter, local))
            spill = None if in_memory else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nbl-spill-")))
        else:
            out.mkdir(parents=True, exist_ok=True)
            spill = out / "spill" / f"rank_{rank:05d}"
            finished = _resume_state(out, metadata, resume, n_layers, rank)
            if isinstance(finished, CalibrationResult):
                return finished
            done = finished
        runner_pbar = _progress_bar((n_layers - len(done)) * -(-local.shape[0] // batch_size),
                                    progress and rank == 0, "NBL calibration")
        if runner_pbar is not None:
            stack.callback(runner_pbar.close)
        runner = LayerwiseRunner(model, adapter, local, batch_size=batch_size, spill_dir=spill,
                                 sample_offset=offset, pbar=runner_pbar, gram_precision=gram_precision)
        start = len(done)
        if start < n_layers and not runner.has_boundary(start):
            raise ValueError(
                f"calibrate: cannot resume from {out}: the inputs of layer {start} (spill/rank_{rank:05d}/"
                f"boundary_{start:04d}) are missing or incomplete; pass resume=False to start over"
            )
        with eval_mode(model):
            for i in range(start, n_layers):
                if runner_pbar is not None:
                    runner_pbar.set_postfix_str(f"layer {i}/{n_layers}")
                acc, cos = runner.run(i, score=True, write=i < n_layers - 1)
                _all_reduce_scores(acc, cos)
                lc = score_layer(i, acc, cos, ridge)
                done.append(lc)
                if out is not None:
                    if rank == 0:
                        _save_layer(out, lc)
                        atomic_write_json(out / _PROGRESS, {"metadata": metadata, "layers_done": i + 1})
                    _barrier()
                runner.drop_boundary(i)
        result = CalibrationResult(done, metadata)
        if out is not None:
            if rank == 0:
                result.save(out / "calibration")
                shutil.rmtree(out / "layers", ignore_errors=True)
            _barrier()
            shutil.rmtree(spill, ignore_errors=True)
            _barrier()
            if rank == 0:
                shutil.rmtree(out / "spill", ignore_errors=True)
    return result


# --- output_dir bookkeeping ------------------------------------------------------


def _layer_paths(out: Path, i: int) -> tuple[Path, Path]:
    return out / "layers" / f"layer_{i:04d}.safetensors", out / "layers" / f"layer_{i:04d}.json"


def _save_layer(out: Path, lc: LayerCalibration) -> None:
    tpath, jpath = _layer_paths(out, lc.layer)
    tpath.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tpath, {f"layers.{lc.layer}.weight": lc.weight, f"layers.{lc.layer}.bias": lc.bias})
    atomic_write_json(jpath, lc.summary())


def _resume_state(out: Path, metadata: dict, resume: bool, n_layers: int, rank: int
                  ) -> list[LayerCalibration] | CalibrationResult:
    """Finished layers to keep (or the complete result) from a previous run in ``out``."""
    progress_path = out / _PROGRESS
    if resume and progress_path.exists():
        prog = read_json(progress_path, "calibrate(resume)")
        old = dict(prog.get("metadata", {})) if isinstance(prog, dict) else {}
        old.setdefault("gram_precision", "float32")  # runs from before the option had float32 Gram products
        ignore = {"nbl_ext_version", "name_or_path"}
        diff = sorted(k for k in set(old) | set(metadata) if k not in ignore and old.get(k) != metadata.get(k))
        if diff:
            raise ValueError(
                f"calibrate: {out} holds a run with different settings ({', '.join(diff)} differ); "
                "use another output_dir or pass resume=False to overwrite it"
            )
        n_done = prog.get("layers_done")
        if isinstance(n_done, bool) or not isinstance(n_done, int) or not 0 <= n_done <= n_layers:
            raise ValueError(f"calibrate: {progress_path} is corrupt (layers_done={n_done!r}); pass resume=False")
        if n_done == n_layers and (out / "calibration").is_dir():
            return CalibrationResult.load(out / "calibration")
        rows, tensors = [], {}
        for i in range(n_done):
            tpath, jpath = _layer_paths(out, i)
            rows.append(read_json(jpath, "calibrate(resume)"))
            tensors.update(read_tensors(tpath, "calibrate(resume)"))
        meta = dict(metadata, num_layers=n_done)
        return layers_from_records(rows, tensors, meta, f"calibrate(resume from {out})")
    # Fresh start: remove what a previous run of ours left (and nothing else).
    _barrier()
    if rank == 0:
        for name in ("layers", "spill", "calibration"):
            shutil.rmtree(out / name, ignore_errors=True)
        progress_path.unlink(missing_ok=True)
    _barrier()
    return []

