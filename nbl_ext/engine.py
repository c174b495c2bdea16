"""The layer-by-layer engine: run a decoder one layer at a time over calibration samples.

Used by :func:`nbl_ext.calibrate` and by the sequential refit of :func:`nbl_ext.linearize` alike
(GPTQ/SliceGPT style, peak memory = one layer + one batch):

* a *recorder* pass per batch (:func:`record_layer_call`) replaces decoder layers 0..i with identity
  modules and runs the model's own forward on the token ids, so the call that layer i would receive
  (attention masks, RoPE tables per layer type, position ids, ...) is built by the model's code for
  every family; the recorder for layer i stops the forward after recording (no lm_head);
* the *original* layer i then runs on the boundary hidden states (:func:`run_layer`; layer 0: the
  embeddings from the recorder; layer i > 0: the outputs of layer i - 1), with a forward hook on the
  module whose output is the branch output A (the adapter says which). X is the layer input. (X, A)
  stream into an accumulator (:class:`~nbl_ext.stats.CovarianceAccumulator` unless the caller passes
  another factory), and each requested per-token statistic of (X, A) into a float64 [sum, count];
* layer i's outputs are the next layer's inputs: written per batch (safetensors, model dtype) to a
  spill directory, or kept in memory on the device that produced them (``spill_dir=None``).

Under ``torch.distributed`` each rank runs its :func:`shard` of the samples; :func:`all_reduce_stats`
merges what the ranks collected before a layer is scored.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nbl_ext._io import atomic_save_tensors, read_tensors
from nbl_ext.adapters import Adapter
from nbl_ext.criteria import LayerContext, compute_scores
from nbl_ext.crossval import CrossValidation, cross_validate, merge_folds
from nbl_ext.numerics import SingularWarning, fit_linear
from nbl_ext.result import LayerCalibration
from nbl_ext.stats import CovarianceAccumulator

#: ``(dim_x, dim_y, *, device, precision) -> accumulator``: what :class:`LayerwiseRunner` streams (X, A) into.
AccumulatorFactory = Callable[..., Any]
#: ``phase -> context manager`` wrapped around each "accumulate" (accumulator update) and "score" (fit and
#: scores of a layer) step, e.g. to time them.
PhaseTimer = Callable[[str], AbstractContextManager[Any]]
#: ``(x, a) -> per-token values`` (a tensor of any shape, one value per token) whose mean the runner streams.
TokenStatistic = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _no_timer(_phase: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


# --- torch.distributed ------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is initialized; else nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard(data: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's contiguous shard of the samples and the index of its first sample."""
    rank, world = dist_info()
    if world == 1:
        return data, 0
    if data.shape[0] < world:
        raise ValueError(f"calibrate: {data.shape[0]} samples cannot be sharded over {world} ranks (need >= 1 each)")
    parts = torch.arange(data.shape[0]).tensor_split(world)
    idx = parts[rank]
    return data[idx], int(idx[0])


# --- small utilities ------------------------------------------------------------


def module_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where a module computes: accelerate's execution device when it is placed with a device_map (its
    offloaded weights sit on the meta device until the hook loads them), else its first parameter's device
    (``default`` for a module without parameters)."""
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


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the duration; the model's training flag is restored afterwards."""
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
        raise TypeError(
            f"{what}: data must be a LongTensor of token ids (num_samples, seq_len), got {type(data).__name__}"
        )
    if data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool:
        raise TypeError(f"{what}: data must hold integer token ids, got dtype {data.dtype}")
    if data.dim() != 2 or data.shape[0] < 1 or data.shape[1] < 1:
        raise ValueError(f"{what}: data must have shape (num_samples, seq_len) with both >= 1, got {tuple(data.shape)}")
    data = data.to(torch.long)
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{what}: token ids must lie in [0, {vocab_size}) (the model's vocabulary); found [{lo}, {hi}]"
        )
    return data


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar counting batches, or None when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True)


# --- one layer call ----------------------------------------------------------------


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
        return layer_output(layer(hidden, *args[1:], **kwargs))
    kwargs["hidden_states"] = hidden
    return layer_output(layer(**kwargs))


# --- the layer-by-layer engine ----------------------------------------------------------


@dataclass
class LayerStats:
    """What one scoring pass over decoder layer ``layer`` collected.

    ``accumulator``: the (X, A) moments over every sample (with folds: their merge, set by
    :func:`all_reduce_stats`, None before); ``folds``: with K >= 2 folds, one accumulator per fold
    (fold j holds the samples whose global index is j modulo K), else None; ``token_sums``: per requested
    token statistic, a float64 tensor [sum of the per-token values, number of tokens].
    """

    layer: int
    accumulator: Any
    token_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    folds: list[Any] | None = None

    def token_means(self) -> dict[str, float]:
        """Mean of every token statistic (NaN when no token was seen)."""
        return {name: float(s[0]) / float(s[1]) if float(s[1]) else float("nan") for name, s in self.token_sums.items()}


def all_reduce_stats(stats: LayerStats) -> None:
    """Merge what every rank collected for a layer (in place); with folds, also their merge into ``accumulator``.

    Under torch.distributed every fold's accumulator is all-reduced on its own (a fold holds the samples
    of its global indices on every rank), then the folds are merged locally (the same on every rank).
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if stats.folds is not None:
        if distributed:
            for acc in stats.folds:
                acc.all_reduce()
        stats.accumulator = CovarianceAccumulator.from_moments(
            merge_folds(stats.folds), precision=getattr(stats.folds[0], "precision", "float32")
        )
    if distributed:
        if stats.folds is None:
            stats.accumulator.all_reduce()
        if stats.token_sums:
            names = list(stats.token_sums)
            packed = torch.stack([stats.token_sums[n] for n in names])
            dist.all_reduce(packed)
            stats.token_sums = dict(zip(names, packed.unbind(0)))


class LayerwiseRunner:
    """Propagates a shard of calibration samples through the decoder one layer at a time.

    Input of layer 0: the embeddings (from the recorder). Input of layer i > 0:
    ``spill_dir/boundary_{i:04d}/batch_*.safetensors`` written while running
    layer i - 1 (or kept in memory with ``spill_dir=None``).

    ``accumulator_factory(dim_x, dim_y, *, device, precision)`` builds what (X, A) stream into
    (default :class:`~nbl_ext.stats.CovarianceAccumulator`; anything with ``update(x, a)``);
    ``timer(phase)`` is entered around every accumulator update (phase "accumulate").
    ``folds`` K >= 2: (X, A) of the sample with global index ``sample_offset + n`` go to fold
    ``(sample_offset + n) % K`` (one accumulator per fold; their merge is the full statistics).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        samples: torch.Tensor,
        *,
        batch_size: int,
        spill_dir: Path | None,
        sample_offset: int = 0,
        pbar: Any = None,
        gram_precision: str = "float32",
        accumulator_factory: AccumulatorFactory | None = None,
        timer: PhaseTimer | None = None,
        folds: int = 1,
    ) -> None:
        self.model, self.adapter = model, adapter
        self.gram_precision = gram_precision
        self.accumulator_factory = accumulator_factory if accumulator_factory is not None else CovarianceAccumulator
        self.timer = timer or _no_timer
        self.batches = list(samples.split(batch_size)) if samples.shape[0] else []
        self.batch_size = batch_size
        # spill_dir None: boundaries stay in memory, on the device of the layer that produced them.
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._memory: dict[int, list[torch.Tensor]] = {}
        self.sample_offset = sample_offset
        self.folds = folds
        self.pbar = pbar
        self.input_device = module_device(model.get_input_embeddings(), torch.device("cpu"))

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
        return read_tensors(self.boundary(i) / f"batch_{b:06d}.safetensors", "calibrate", device=str(device))[
            "hidden_states"
        ]

    def _where(self, i: int, b: int) -> str:
        lo = self.sample_offset + b * self.batch_size
        hi = lo + self.batches[b].shape[0] - 1
        return f"decoder layer {i}, batch {b} (samples {lo}..{hi})"

    def _accumulate(self, stats: LayerStats, b: int, x: torch.Tensor, a: torch.Tensor) -> None:
        if stats.folds is None:
            stats.accumulator.update(x, a)
            return
        first = self.sample_offset + b * self.batch_size
        fold_of = torch.arange(first, first + x.shape[0]) % self.folds
        for j in fold_of.unique().tolist():
            rows = (fold_of == j).nonzero().squeeze(1).to(x.device)
            stats.folds[j].update(x.index_select(0, rows), a.index_select(0, rows))

    def run(
        self, i: int, *, score: bool, write: bool, token_stats: Mapping[str, TokenStatistic] | None = None
    ) -> LayerStats | None:
        """Run layer i on every batch; optionally collect its branch statistics and write its outputs.

        With ``score``: returns the :class:`LayerStats` of layer i, the accumulator of (X, A) and, for
        every entry of ``token_stats``, the [sum, count] of its per-token values.
        """
        layer = self.adapter.layers()[i]
        device = module_device(layer, self.input_device)
        d = self.adapter.hidden_size
        stats = captured = handle = None
        if score:
            sums = {name: torch.zeros(2, dtype=torch.float64, device=device) for name in (token_stats or {})}
            if self.folds > 1:
                stats = LayerStats(
                    i,
                    None,
                    sums,
                    [
                        self.accumulator_factory(d, d, device=device, precision=self.gram_precision)
                        for _ in range(self.folds)
                    ],
                )
            else:
                stats = LayerStats(
                    i, self.accumulator_factory(d, d, device=device, precision=self.gram_precision), sums
                )
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
                        raise RuntimeError(
                            f"{self._where(i, b)}: the branch-output hook fired {len(captured)} times (expected 1)"
                        )
                    a = captured[0]
                    if a.shape != x.shape:
                        raise RuntimeError(
                            f"{self._where(i, b)}: branch output shape {tuple(a.shape)} != input shape {tuple(x.shape)}"
                        )
                    try:
                        with self.timer("accumulate"):
                            self._accumulate(stats, b, x, a)
                    except ValueError as exc:
                        raise ValueError(f"calibrate: non-finite activations in {self._where(i, b)}: {exc}") from exc
                    for name, fn in (token_stats or {}).items():
                        values = fn(x, a)
                        stats.token_sums[name][0] += values.sum(dtype=torch.float64)
                        stats.token_sums[name][1] += values.numel()
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
        return stats


# --- one layer's fit and scores ---------------------------------------------------------


def score_layer(stats: LayerStats, ridge: float, criteria: Any = None, *, ridges: Any = None) -> LayerCalibration:
    """LMMSE map and criterion scores of a layer from its (all-reduced) statistics.

    ``criteria``: names of registered criteria to score (default: every one computable from the
    statistics; see :mod:`nbl_ext.criteria`). With folds (``stats.folds``) the held-out errors of the map
    are computed in closed form (:func:`nbl_ext.crossval.cross_validate`) for the relative ridges
    ``ridges`` (a grid: the one with the lowest cross-validated NMSE is chosen) or, without a grid, for
    ``ridge`` alone; the final map is fitted on all the samples with the chosen ridge.
    """
    i = stats.layer
    if stats.accumulator is None:
        raise RuntimeError(f"score_layer: the folds of decoder layer {i} were not merged (call all_reduce_stats)")
    acc = stats.accumulator
    cv: CrossValidation | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = float(ridge)
        if stats.folds is not None:
            cv = cross_validate(stats.folds, list(ridges) if ridges is not None else [chosen])
            chosen = cv.best_ridge
        w, b = fit_linear(acc, chosen)
        scores = compute_scores(
            LayerContext(
                layer=i, accumulator=acc, weight=w, bias=b, ridge=chosen, token_means=stats.token_means(), cv=cv
            ),
            criteria,
        )
    for wmsg in caught:  # re-emit with the layer named
        warnings.warn(
            f"decoder layer {i}: {wmsg.message}",
            wmsg.category if issubclass(wmsg.category, Warning) else SingularWarning,
            stacklevel=3,
        )
    return LayerCalibration(
        layer=i,
        scores=scores,
        tokens=int(acc.count),
        weight=w.detach().to("cpu", torch.float64).contiguous(),
        bias=b.detach().to("cpu", torch.float64).contiguous(),
        ridge=chosen if cv is not None else None,
        cv_curve=[float(v) for v in cv.nmse] if cv is not None and cv.ridges.numel() > 1 else None,
    )
