"""Layer-by-layer calibration: stream (X, A) of every attention branch into float64 statistics.

Every decoder layer runs once over the calibration samples on the layer-by-layer engine
(:mod:`nbl_ext.engine`): its attention input X and branch output A stream into float64 statistics, and
every registered selection criterion (:mod:`nbl_ext.criteria`) scores the layer from them. Each layer's
outputs (the next layer's inputs) are written per batch (safetensors, model dtype) to a spill directory,
so nothing is held in memory across batches; or, on a GPU with room for them (``activations="auto"``),
kept there: two boundaries (tokens x hidden x dtype each) live at a time, host memory stays flat, and the
disk round trip (write + read of every boundary: 256 GiB for the 8B shape at 256 x 2048 tokens) is gone.

With ``folds=K`` the samples are split into K folds by index (sample n goes to fold n mod K), one
accumulator per fold and layer (memory grows with K, never with the tokens); each layer's map is
cross-validated in closed form over a grid of relative ridges (:mod:`nbl_ext.crossval`: one
eigendecomposition per fold serves the grid), the ridge with the lowest held-out NMSE is chosen, and the
final map is fitted on all samples with it.

With ``output_dir`` every finished layer's statistics and the boundary for the
next layer are saved (atomically), so a killed run restarts where it stopped.
Under ``torch.distributed`` each rank calibrates a shard of the samples and
the accumulators (each fold's on its own) are all-reduced before scoring.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from nbl_ext._io import atomic_save_tensors, atomic_write_json, read_json, read_tensors
from nbl_ext.adapters import Adapter, get_adapter
from nbl_ext.criteria import token_statistics
from nbl_ext.crossval import check_fold_settings
from nbl_ext.engine import (
    AccumulatorFactory,
    LayerwiseRunner,
    PhaseTimer,
    all_reduce_stats,
    barrier,
    check_token_data,
    dist_info,
    eval_mode,
    progress_bar,
    score_layer,
    shard,
)
from nbl_ext.linearize import is_linearized
from nbl_ext.reference import GRAM_PRECISIONS
from nbl_ext.result import CalibrationResult, LayerCalibration, layers_from_records
from nbl_ext.stats import CovarianceAccumulator
from nbl_ext.validation import check_choice, check_count

TARGETS = ("attn",)
_PROGRESS = "progress.json"
ACTIVATIONS = ("auto", "memory", "disk")
#: activations="auto" keeps the boundaries on a CUDA device when two of them take at most this share of its
#: free memory (the layer's own activations and the accumulator need the rest).
_MEMORY_SHARE = 0.25


def weights_fingerprint(model: nn.Module, per_tensor: int = 4096) -> str:
    """Cheap identity of a model's weights (names, shapes, first elements): guards resume against a swapped model."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if p.device.type != "meta":
            h.update(p.detach().reshape(-1)[:per_tensor].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def boundaries_fit(model: nn.Module, adapter: Adapter, samples: torch.Tensor) -> bool:
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
    accumulator_factory: AccumulatorFactory | None = None,
    timer: PhaseTimer | None = None,
    folds: int = 1,
    ridges: Sequence[float] | None = None,
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
        accumulator_factory: ``(dim_x, dim_y, *, device, precision) -> accumulator``
            that each layer's (X, A) stream into (default
            :class:`~nbl_ext.stats.CovarianceAccumulator`); e.g. an instrumented one.
        timer: ``phase -> context manager`` entered around every accumulator update
            ("accumulate") and every layer's fit and scores ("score"), e.g. to time them.
        folds: K >= 2 splits the samples into K folds (sample n in fold n mod K, by
            global index, so sharding does not change them) and adds, per layer, the
            closed-form cross-validated NMSE of the map (criterion "cv_nmse"), its held-out
            error relative to the residual stream ("residual_ratio") and the ridge used
            (``LayerCalibration.ridge``). 1 (default): no folds. Must not exceed the
            number of samples. :data:`nbl_ext.crossval.DEFAULT_FOLDS` is the recommended K.
        ridges: with folds, a strictly increasing grid of relative ridges (e.g.
            :data:`nbl_ext.crossval.DEFAULT_RIDGES`): each layer's ridge is the one with the
            lowest cross-validated NMSE (``LayerCalibration.cv_curve`` holds the curve), and
            ``ridge`` must stay 0. None (default): every layer uses ``ridge``.

    Returns:
        :class:`CalibrationResult` with, per layer, the scores of every registered
        criterion (the CCA bound between X and X + A, the NMSE of the fitted map, the
        mean cosine(X, X + A), ...) and W, b.
    """
    adapter = get_adapter(model)
    if getattr(adapter.config, "nbl", None) or any(is_linearized(layer) for layer in adapter.layers()):
        raise ValueError("calibrate: this model is already linearized; calibrate the original model")
    check_choice(target, TARGETS, "target", what="calibrate")
    check_count(batch_size, "batch_size", what="calibrate")
    check_choice(gram_precision, GRAM_PRECISIONS, "gram_precision", what="calibrate")
    check_choice(activations, ACTIVATIONS, "activations", what="calibrate")
    if activations == "memory" and output_dir is not None:
        raise ValueError(
            "calibrate: activations='memory' cannot be resumed; with output_dir the layer outputs "
            "are spilled to disk (use activations='auto' or 'disk', or drop output_dir)"
        )
    data = check_token_data(data, adapter.vocab_size, "calibrate")
    folds, grid = check_fold_settings(folds, ridges, ridge, int(data.shape[0]), "calibrate")
    rank, world = dist_info()
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
        "folds": folds,
        "ridges": grid,
        "data_sha256": hashlib.sha256(data.cpu().contiguous().numpy().tobytes()).hexdigest(),
        "weights_sha256": weights_fingerprint(model),
    }
    from nbl_ext import __version__

    metadata["nbl_ext_version"] = __version__

    out = Path(output_dir) if output_dir is not None else None
    done: list[LayerCalibration] = []
    with contextlib.ExitStack() as stack:
        if out is None:
            in_memory = activations == "memory" or (activations == "auto" and boundaries_fit(model, adapter, local))
            spill = None if in_memory else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nbl-spill-")))
        else:
            out.mkdir(parents=True, exist_ok=True)
            spill = out / "spill" / f"rank_{rank:05d}"
            finished = _resume_state(out, metadata, resume, n_layers, rank)
            if isinstance(finished, CalibrationResult):
                return finished
            done = finished
        runner_pbar = progress_bar(
            (n_layers - len(done)) * -(-local.shape[0] // batch_size), progress and rank == 0, "NBL calibration"
        )
        if runner_pbar is not None:
            stack.callback(runner_pbar.close)
        # looked up here, not bound at import, so the module attribute can be swapped (tests spy on it)
        factory = accumulator_factory if accumulator_factory is not None else CovarianceAccumulator
        runner = LayerwiseRunner(
            model,
            adapter,
            local,
            batch_size=batch_size,
            spill_dir=spill,
            sample_offset=offset,
            pbar=runner_pbar,
            gram_precision=gram_precision,
            accumulator_factory=factory,
            timer=timer,
            folds=folds,
        )
        phase = runner.timer
        stream = token_statistics()
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
                stats = runner.run(i, score=True, write=i < n_layers - 1, token_stats=stream)
                all_reduce_stats(stats)
                with phase("score"):
                    lc = score_layer(stats, ridge, ridges=grid)
                done.append(lc)
                if out is not None:
                    if rank == 0:
                        _save_layer(out, lc)
                        atomic_write_json(out / _PROGRESS, {"metadata": metadata, "layers_done": i + 1})
                    barrier()
                runner.drop_boundary(i)
        result = CalibrationResult(done, metadata)
        if out is not None:
            if rank == 0:
                result.save(out / "calibration")
                shutil.rmtree(out / "layers", ignore_errors=True)
            barrier()
            shutil.rmtree(spill, ignore_errors=True)
            barrier()
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


def _resume_state(
    out: Path, metadata: dict, resume: bool, n_layers: int, rank: int
) -> list[LayerCalibration] | CalibrationResult:
    """Finished layers to keep (or the complete result) from a previous run in ``out``."""
    progress_path = out / _PROGRESS
    if resume and progress_path.exists():
        prog = read_json(progress_path, "calibrate(resume)")
        old = dict(prog.get("metadata", {})) if isinstance(prog, dict) else {}
        old.setdefault("gram_precision", "float32")  # runs from before the option had float32 Gram products
        old.setdefault("folds", 1)  # and no folds
        old.setdefault("ridges", None)
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
    barrier()
    if rank == 0:
        for name in ("layers", "spill", "calibration"):
            shutil.rmtree(out / name, ignore_errors=True)
        progress_path.unlink(missing_ok=True)
    barrier()
    return []
