"""``nbl_ext.compress``: one call from a model and calibration data to the compressed model.

    model, result = nbl_ext.compress(model, tokens, nbl_ext.NBLConfig(k=8))

runs :func:`nbl_ext.calibrate` -> :meth:`CalibrationResult.select` -> :func:`nbl_ext.linearize` with
the settings of one :class:`~nbl_ext.config.NBLConfig`, and records that config in ``config.nbl``.
The three steps stay public for finer control.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nbl_ext.adapters import get_adapter
from nbl_ext.calibrate import calibrate
from nbl_ext.config import NBLConfig
from nbl_ext.criteria import get_criterion
from nbl_ext.data import HOLDOUT_FRACTION, HOLDOUT_SEED, load_calibration_tokens, split_documents
from nbl_ext.engine import check_token_data
from nbl_ext.linearize import linearize
from nbl_ext.result import CalibrationResult
from nbl_ext.selection import greedy_selection, score_criteria


def default_k(num_layers: int) -> int:
    """The number of blocks replaced when the config names neither k nor layers: a quarter, at least one."""
    return max(1, num_layers // 4)


def holdout_split(source: Any, holdout: float | None) -> tuple[Any, float | None]:
    """(what to calibrate on, the fraction held out) for a calibration source.

    A document file loses ``holdout`` of its documents (default :data:`nbl_ext.data.HOLDOUT_FRACTION`,
    the same ones ``nbl eval --c4`` scores); other sources ("self", "hf:NAME", a list of texts) are used
    whole, and a non-zero ``holdout`` for them is an error.
    """
    is_file = (
        isinstance(source, (str, os.PathLike))
        and str(source) != "self"
        and not str(source).startswith("hf:")
        and Path(source).is_file()
    )
    if not is_file:
        if holdout:
            raise ValueError(
                f"holdout {holdout} applies to a document file; the calibration source {source!r} is not one"
            )
        return source, None
    fraction = HOLDOUT_FRACTION if holdout is None else holdout
    if fraction == 0:
        return source, 0.0
    return split_documents(Path(source), fraction, seed=HOLDOUT_SEED)[0], fraction


def calibration_tokens(
    model: nn.Module, data: Any, config: NBLConfig, *, tokenizer: Any = None, progress: bool = False
) -> torch.Tensor:
    """The token ids ``config`` calibrates on: ``data`` itself when it is a tensor (its shape must be
    num_samples x seq_len), else ``data`` as a calibration source (see :func:`nbl_ext.load_calibration_tokens`).

    When the criterion scores layers on held-out tokens (:attr:`NBLConfig.needs_selection`), a source
    yields ``selection_samples`` more sequences after the calibration ones: rows ``num_samples:`` of the
    result are the selection tokens (see :func:`split_selection`)."""
    if isinstance(data, torch.Tensor):
        shape = (config.num_samples, config.seq_len)
        rows = [config.num_samples] + (
            [config.num_samples + config.selection_samples] if config.needs_selection else []
        )
        if data.dim() != 2 or data.shape[0] not in rows or data.shape[1] != config.seq_len:
            also = (
                f" (or {rows[1]} rows: the last selection_samples={config.selection_samples} are the held-out "
                f"selection tokens of {config.criterion})"
                if len(rows) > 1
                else ""
            )
            raise ValueError(
                f"compress: the token ids have shape {tuple(data.shape)} but the config says "
                f"num_samples x seq_len = {shape}{also}; pass NBLConfig(num_samples={data.shape[0]}, "
                f"seq_len={data.shape[-1]}) or matching tokens"
            )
        return data
    if tokenizer is None:
        raise TypeError(
            "compress: a calibration source (file, 'self', hf:NAME, texts) needs tokenizer=; "
            "or pass token ids (a LongTensor)"
        )
    return source_tokens(model, holdout_split(data, config.holdout)[0], config, tokenizer=tokenizer, progress=progress)


def source_tokens(
    model: nn.Module, source: Any, config: NBLConfig, *, tokenizer: Any, progress: bool = False
) -> torch.Tensor:
    """``config.num_samples`` sequences of ``config.seq_len`` tokens from a source whose held-out documents are
    already removed (:func:`holdout_split`), plus ``selection_samples`` more when the criterion needs them."""
    extra = config.selection_samples if config.needs_selection else 0
    return load_calibration_tokens(
        source,
        tokenizer,
        num_samples=config.num_samples + extra,
        seq_len=config.seq_len,
        seed=config.seed,
        model=model,
        progress=progress,
        batch_size=sampling_batch(config.num_samples + extra),
    )


def sampling_batch(num_samples: int) -> int:
    """Sequences sampled per batch for the 'self' source: all of them in one batch up to 32 (a decode step costs
    about the same for 16 or 32 sequences on a CPU, so one batch beats two: the default 16 + 4 sequences);
    beyond 32, the loader's default of 16."""
    return max(16, num_samples) if num_samples <= 32 else 16


def split_selection(
    tokens: torch.Tensor, config: NBLConfig, selection: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(calibration ids, selection ids or None) from what :func:`calibration_tokens` returned.

    Rows after the first num_samples (a source's extra sequences, or token ids passed with
    num_samples + selection_samples rows) are the selection tokens; ``selection`` (held-out token ids,
    never the calibration ones) replaces them. Packed document text may continue one document across the
    boundary of the two sets.
    """
    if not config.needs_selection:
        return tokens[: config.num_samples], None
    if selection is not None:
        return tokens[: config.num_samples], selection
    if tokens.shape[0] > config.num_samples:
        return tokens[: config.num_samples], tokens[config.num_samples :]
    raise ValueError(
        f"compress: criterion {config.criterion!r} scores layers on held-out tokens; with token ids as data "
        f"pass selection= (LongTensor of other tokens, e.g. {config.selection_samples} x {config.seq_len}) or "
        f"{config.num_samples + config.selection_samples} rows (the last {config.selection_samples} are held "
        "out), or give a calibration source (file, 'self') so that selection_samples more sequences are drawn "
        "from it, or choose a statistics criterion such as 'cca_bound'"
    )


def compress(
    model: nn.Module,
    data: torch.Tensor | str | os.PathLike | Sequence[str],
    config: NBLConfig | None = None,
    *,
    tokenizer: Any = None,
    selection: torch.Tensor | None = None,
    progress: bool = False,
    timer: Callable[[str], AbstractContextManager[Any]] | None = None,
) -> tuple[nn.Module, CalibrationResult]:
    """Calibrate ``model`` on ``data``, select layers and linearize them in place, as ``config`` says.

    ``data``: token ids (num_samples, seq_len), or a calibration source with ``tokenizer``. ``selection``:
    held-out token ids for criteria that score layers on them (``"direct_kl"``, ``"direct_nll"``,
    ``"greedy"``); by default a source gives ``config.selection_samples`` more sequences for them. The
    criteria that need the model are scored after calibration (:func:`nbl_ext.score_criteria`) inside the
    "select" phase.
    ``timer(phase)`` is entered around the "calibrate", "select" and "linearize" steps.
    Returns ``(model, result)``; ``model.config.nbl["config"]`` is the config that ran (k filled in).
    """
    config = config if config is not None else NBLConfig()
    if not isinstance(config, NBLConfig):
        raise TypeError(f"compress: config must be an NBLConfig, got {type(config).__name__}")
    phase = timer or (lambda _name: contextlib.nullcontext())
    adapter = get_adapter(model)
    n = adapter.num_layers
    if config.layers is None:
        k = config.k if config.k is not None else default_k(n)
        if k > n:
            raise ValueError(f"compress: k={k} is more than the model's {n} layers")
        config = config.replace(k=k)
    elif config.layers and config.layers[-1] >= n:
        raise ValueError(f"compress: layer {config.layers[-1]} is out of range for the model's {n} layers")
    if selection is not None:
        selection = check_token_data(selection, adapter.vocab_size, "compress(selection)")
    tokens, selection = split_selection(
        calibration_tokens(model, data, config, tokenizer=tokenizer, progress=progress), config, selection
    )
    with phase("calibrate"):
        result = calibrate(
            model,
            tokens,
            batch_size=config.batch_size,
            progress=progress,
            gram_precision=config.gram_precision,
            activations=config.activations,
            **config.fit_options,
        )
    with phase("select"):
        if config.layers is not None:
            layers = list(config.layers)
        else:
            if config.criterion == "greedy":  # k steps; the chosen layers keep the maps greedy re-fitted
                g = greedy_selection(
                    model,
                    tokens,
                    steps=config.k,
                    heldout=selection,
                    batch_size=config.batch_size,
                    **config.fit_options,
                )
                result.set_scores("greedy", [float(g.order.index(i)) for i in range(n)])
                for i, fit in g.maps.items():
                    result.layers[i].weight, result.layers[i].bias, result.layers[i].ridge = (
                        fit.weight,
                        fit.bias,
                        fit.ridge,
                    )
            elif get_criterion(config.criterion).needs:  # scored on the model: direct_kl, direct_nll
                score_criteria(
                    model, result, config.criterion, heldout=selection, data=tokens, batch_size=config.batch_size
                )
            layers = result.select(config.k, config.criterion)
    with phase("linearize"):
        linearize(
            model,
            result,
            layers,
            replacement=config.replacement,
            refit=config.refit,
            data=tokens if config.refit else None,
            batch_size=config.batch_size,
            progress=progress,
            **config.fit_options,
        )
    adapter.config.nbl["config"] = config.to_dict()
    return model, result
