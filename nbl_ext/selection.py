"""Selection criteria that need the model: the direct held-out score and greedy selection.

Both are registered in :mod:`nbl_ext.criteria` like every other criterion (one function, one
registration) with ``needs`` naming what the statistics pass does not have, and are scored by
:func:`score_criteria`, which stores the scores in the :class:`~nbl_ext.CalibrationResult` so that
``result.select(k, criterion)`` and ``result.save`` work as for the statistics criteria::

    result = nbl_ext.calibrate(model, calib_ids, folds=5, ridges=DEFAULT_RIDGES)
    nbl_ext.score_criteria(model, result, ["direct_nll"], heldout=selection_ids)
    layers = result.select(k, "direct_nll")

* ``"direct_nll"`` (needs model, holdout): for each layer alone, its attention branch replaced by the
  calibrated affine map, the increase of the model's mean next-token NLL on the held-out token ids
  (lower = cheaper to replace); ``"direct_kl"`` (the same passes): the mean KL divergence from the original
  model's next-token distributions over the whole vocabulary (no labels: less noise per token). Cost, both
  together (:func:`layer_damage`): the original forward once, then for each layer the layers from it up and
  the head, resumed from the cached output of the layer below: about (L + 1) / 2 decoder-stack forwards and
  L + 1 head forwards over the held-out tokens; a copy of one decoder layer at a time; no calibration pass.
* ``"greedy"`` (needs model, data; holdout too with the default ``base``): layers chosen one at a time;
  before each step, one layer-by-layer pass of the engine over the calibration tokens ``data`` re-fits the
  maps of all remaining candidates on the model with the layers chosen so far already linearized (the
  inputs they will see), and the candidate with the best ``base`` score is chosen (``base="direct_kl"``,
  the default: the smallest KL divergence from the partially linearized model's own predictions with the
  candidate linearized too; "direct_nll": the smallest held-out NLL increase; or any statistics criterion,
  e.g. "cca_bound", computed from the re-fitted statistics). The score of a layer is its position in the
  greedy order: the first ``steps`` positions (option ``steps``; default: every layer) are the greedy
  choices, the rest follow in the order of the last step's ``base`` scores, so ``select(k, "greedy")`` is
  the greedy choice for every k <= steps. Cost: ``steps`` calibration
  passes over ``data`` (each about one forward pass over the calibration tokens), plus with a direct base
  the direct passes over the held-out tokens at each step for the L - s remaining layers; one copy of the model
  (the partially linearized one).
  The maps of the chosen layers are re-fitted in that order (``greedy_selection`` returns them); the
  criterion's scores only order the layers.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nbl_ext.adapters import Adapter, get_adapter
from nbl_ext.criteria import LayerContext, get_criterion, register_criterion, token_statistics
from nbl_ext.engine import (
    LayerwiseRunner,
    all_reduce_stats,
    check_token_data,
    eval_mode,
    layer_output,
    score_layer,
    shard,
)
from nbl_ext.linearize import convert_layer, is_linearized
from nbl_ext.numerics import next_token_nll
from nbl_ext.result import CalibrationResult, LayerCalibration


def heldout_nll(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 4) -> float:
    """Mean next-token NLL (float64) of the model on token ids (num_samples, seq_len), no cache."""
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    with eval_mode(model):
        for chunk in ids.split(batch_size):
            chunk = chunk.to(device)
            total += float(next_token_nll(model(input_ids=chunk, use_cache=False).logits[:, :-1], chunk[:, 1:]).sum())
            count += chunk[:, 1:].numel()
    return total / count


@contextlib.contextmanager
def linearized_layers(model: nn.Module, maps: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[nn.Module]:
    """The model with the given layers' attention branches replaced by their affine maps, for the duration.

    Each layer is swapped for a linearized copy (the original object, weights and all, is put back
    afterwards): memory of one decoder layer per entry, the model is unchanged on exit.
    """
    adapter = get_adapter(model)
    layers = adapter.layers()
    originals = {i: layers[i] for i in maps}
    try:
        for i, (w, b) in maps.items():
            if is_linearized(layers[i]):
                raise ValueError(f"decoder layer {i} is already linearized")
            layers[i] = copy.deepcopy(originals[i])
            convert_layer(adapter, i, "affine", w, b, release_kv=False)
        yield model
    finally:
        for i, layer in originals.items():
            layers[i] = layer


class _Resume(nn.Module):
    """Stands in for decoder layer j < i while layer i's variant runs: identity, and for j = i - 1 the
    cached output of the original layer i - 1 (what layer i receives, computed once per batch)."""

    def __init__(self, cached: torch.Tensor | None) -> None:
        super().__init__()
        self._cached = cached

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._cached is not None:
            return self._cached
        return args[0] if args else kwargs["hidden_states"]


def _log_probs(model: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (batch x (seq_len - 1) x vocab, at least float32) on a batch of ids."""
    logits = model(input_ids=chunk, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _nll_sum(logp: torch.Tensor, chunk: torch.Tensor) -> float:
    """Summed next-token NLL (a float64 sum) of log-probabilities on the batch's next tokens."""
    return float(-logp.gather(-1, chunk[:, 1:, None]).double().sum())


def _kl_sum(logp_ref: torch.Tensor, logp: torch.Tensor) -> float:
    """Summed KL(p_ref || p) over the positions (a float64 sum): the divergence from the reference's
    next-token distributions, over the whole vocabulary (no labels)."""
    return float((logp_ref.exp() * (logp_ref - logp)).sum(-1).double().sum())


@dataclass
class LayerDamage:
    """What replacing each layer alone costs on held-out token ids (see :func:`layer_damage`): the original's
    mean next-token ``nll``, per layer the increase of the mean NLL (``nll_increase``) and the mean KL
    divergence from the original's next-token distributions (``kl``), over ``tokens`` predicted tokens."""

    nll: float
    nll_increase: dict[int, float]
    kl: dict[int, float]
    tokens: int


def layer_damage(
    model: nn.Module,
    maps: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    ids: torch.Tensor,
    *,
    batch_size: int = 4,
) -> LayerDamage:
    """Per layer in ``maps``, what replacing it alone by its affine map ``(W, b)`` costs on ``ids``: the
    increase of the mean next-token NLL and the mean KL divergence from the original model's next-token
    distributions. The model is unchanged afterwards.

    Each batch runs the original model once, keeping every decoder layer's output and the log-probabilities;
    the variant of layer i then resumes from layer i - 1's output (layers below i are skipped), so scoring
    all L layers costs the original forward plus, per layer, the layers from i up and the head: about
    (L + 1) / 2 forwards of the decoder stack and L + 1 of the head, instead of L + 1 full forwards.
    Memory: one batch's layer outputs (batch x seq_len x hidden x L), its log-probabilities (batch x seq_len
    x vocab, twice) and one decoder layer's copy.
    """
    adapter = get_adapter(model)
    layers = adapter.layers()
    order = sorted(maps)
    for i in order:
        if is_linearized(layers[i]):
            raise ValueError(f"decoder layer {i} is already linearized")
    device = model.get_input_embeddings().weight.device
    base_sum, sums, kls, count = 0.0, dict.fromkeys(order, 0.0), dict.fromkeys(order, 0.0), 0
    with eval_mode(model):
        for chunk in ids.split(batch_size):
            chunk = chunk.to(device)
            outs: dict[int, torch.Tensor] = {}
            hooks = [
                layer.register_forward_hook(lambda _m, _a, out, j=j, outs=outs: outs.__setitem__(j, layer_output(out)))
                for j, layer in enumerate(layers)
                if j + 1 in maps
            ]
            try:
                ref = _log_probs(model, chunk)
            finally:
                for h in hooks:
                    h.remove()
            base_sum += _nll_sum(ref, chunk)
            for i in order:
                originals = [layers[j] for j in range(i)]
                try:
                    for j in range(i):
                        layers[j] = _Resume(outs[j] if j == i - 1 else None)
                    with linearized_layers(model, {i: maps[i]}):
                        logp = _log_probs(model, chunk)
                finally:
                    for j, layer in enumerate(originals):
                        layers[j] = layer
                sums[i] += _nll_sum(logp, chunk)
                kls[i] += _kl_sum(ref, logp)
                del logp
            count += chunk[:, 1:].numel()
    base = base_sum / count
    return LayerDamage(
        nll=base,
        nll_increase={i: sums[i] / count - base for i in order},
        kl={i: kls[i] / count for i in order},
        tokens=count,
    )


def layer_nll_increases(
    model: nn.Module,
    maps: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    ids: torch.Tensor,
    *,
    batch_size: int = 4,
) -> tuple[float, dict[int, float]]:
    """(the model's mean next-token NLL on ``ids``, per layer in ``maps`` its increase with that layer alone
    replaced by its affine map): :func:`layer_damage`'s NLL part."""
    damage = layer_damage(model, maps, ids, batch_size=batch_size)
    return damage.nll, damage.nll_increase


def _damage(ctx: LayerContext) -> LayerDamage:
    """Every layer's :func:`layer_damage` in one pass (the maps score_criteria passes), computed once per
    scoring call and shared by direct_nll and direct_kl; a layer outside it is scored alone."""
    damage = ctx.shared.get("damage")
    if damage is None or ctx.layer not in damage.kl:
        maps = ctx.options.get("maps") or {}
        if ctx.layer not in maps:
            maps = {ctx.layer: (ctx.weight, ctx.bias)}
        damage = layer_damage(ctx.model, maps, ctx.holdout, batch_size=ctx.options.get("batch_size", 4))
        ctx.shared["damage"] = damage
    return damage


def _direct_nll(ctx: LayerContext) -> float:
    return _damage(ctx).nll_increase[ctx.layer]


def _direct_kl(ctx: LayerContext) -> float:
    return _damage(ctx).kl[ctx.layer]


@dataclass
class GreedySelection:
    """What :func:`greedy_selection` found: ``order`` (every layer, greedy choices first), ``chosen``
    (the greedy choices in the order they were made), ``maps`` (layer -> the re-fitted LayerCalibration of
    each chosen layer, fitted with the earlier choices linearized), ``step_scores`` (per step, the base
    score of every remaining candidate) and the number of ``passes`` over the calibration and held-out tokens."""

    order: list[int]
    chosen: list[int]
    maps: dict[int, LayerCalibration]
    step_scores: list[dict[int, float]]
    calibration_passes: int
    heldout_passes: int


def _refit_remaining(
    model: nn.Module,
    adapter: Adapter,
    data: torch.Tensor,
    remaining: Sequence[int],
    *,
    batch_size: int,
    ridge: float,
    folds: int,
    ridges: Any,
) -> dict[int, LayerCalibration]:
    """One layer-by-layer pass: the statistics, maps and scores of every remaining layer on the model as it is."""
    local, offset = shard(data)
    out: dict[int, LayerCalibration] = {}
    last = max(remaining)
    stream = token_statistics()
    with tempfile.TemporaryDirectory(prefix="nbl-greedy-") as spill, eval_mode(model):
        runner = LayerwiseRunner(
            model, adapter, local, batch_size=batch_size, spill_dir=Path(spill), sample_offset=offset, folds=folds
        )
        for i in range(last + 1):
            if i in remaining:
                stats = runner.run(i, score=True, write=i < last, token_stats=stream)
                all_reduce_stats(stats)
                out[i] = score_layer(stats, ridge, ridges=ridges)
            else:
                runner.run(i, score=False, write=True)
            runner.drop_boundary(i)
    return out


#: The criteria greedy_selection scores on held-out tokens at each step (layer_damage's two parts).
_DIRECT = ("direct_nll", "direct_kl")


def greedy_selection(
    model: nn.Module,
    data: torch.Tensor,
    *,
    steps: int | None = None,
    base: str = "direct_kl",
    heldout: torch.Tensor | None = None,
    batch_size: int = 4,
    ridge: float = 0.0,
    folds: int = 1,
    ridges: Sequence[float] | None = None,
) -> GreedySelection:
    """Choose layers one at a time, re-fitting the remaining candidates on the partially linearized model.

    ``data``: calibration token ids (as for :func:`nbl_ext.calibrate`); ``steps``: how many layers to
    choose greedily (default: all); ``base``: the score each step ranks the candidates by ("direct_kl" or
    "direct_nll", which need ``heldout`` token ids, or a statistics criterion such as "cca_bound" or "cv_nmse", the
    latter needing ``folds`` >= 2); ``ridge``/``folds``/``ridges``: the re-fits' settings, as for calibrate.
    The model itself is not changed (the work happens on a copy). Cost: see the module docstring.
    """
    adapter = get_adapter(model)
    n = adapter.num_layers
    if getattr(adapter.config, "nbl", None) or any(is_linearized(layer) for layer in adapter.layers()):
        raise ValueError("greedy_selection: this model is already linearized; pass the original model")
    steps = n if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= n:
        raise ValueError(
            f"greedy_selection: steps must be an int between 0 and the number of layers ({n}), got {steps!r}"
        )
    crit = get_criterion(base)
    if crit.name == "greedy":
        raise ValueError("greedy_selection: base must be another criterion than 'greedy'")
    if crit.name in _DIRECT:
        if heldout is None:
            raise ValueError(f"greedy_selection: base={crit.name!r} needs held-out token ids (heldout=)")
        heldout = check_token_data(heldout, adapter.vocab_size, "greedy_selection(heldout)")
    elif crit.needs and set(crit.needs) - {"cv"}:
        raise ValueError(
            f"greedy_selection: base must be 'direct_nll', 'direct_kl' or a statistics criterion; {crit.name!r} "
            f"needs {', '.join(crit.needs)}"
        )
    data = check_token_data(data, adapter.vocab_size, "greedy_selection(data)")
    work = copy.deepcopy(model)
    wadapter = get_adapter(work)
    chosen: list[int] = []
    maps: dict[int, LayerCalibration] = {}
    history: list[dict[int, float]] = []
    cal_passes = held_passes = 0
    order_rest: list[int] = list(range(n))
    for _step in range(steps):
        remaining = [i for i in range(n) if i not in chosen]
        fits = _refit_remaining(
            work, wadapter, data, remaining, batch_size=batch_size, ridge=ridge, folds=folds, ridges=ridges
        )
        cal_passes += 1
        if crit.name in _DIRECT:
            damage = layer_damage(
                work, {i: (fits[i].weight, fits[i].bias) for i in remaining}, heldout, batch_size=batch_size
            )
            scores = damage.kl if crit.name == "direct_kl" else damage.nll_increase
            held_passes += len(remaining) + 1
        else:
            scores = {i: fits[i].score(crit.name) for i in remaining}
        history.append(scores)
        ranked = [remaining[j] for j in crit.order([scores[i] for i in remaining])]
        pick = ranked[0]
        chosen.append(pick)
        maps[pick] = fits[pick]
        convert_layer(wadapter, pick, "affine", fits[pick].weight, fits[pick].bias, release_kv=False)
        order_rest = ranked[1:]
    del work
    if steps == 0:
        order_rest = list(range(n))
    return GreedySelection(
        order=chosen + order_rest,
        chosen=chosen,
        maps=maps,
        step_scores=history,
        calibration_passes=cal_passes,
        heldout_passes=held_passes,
    )


def _greedy(ctx: LayerContext) -> float:
    if "greedy" not in ctx.shared:
        meta = ctx.options.get("metadata", {})
        ctx.shared["greedy"] = greedy_selection(
            ctx.model,
            ctx.data,
            steps=ctx.options.get("steps"),
            base=ctx.options.get("base", "direct_kl"),
            heldout=ctx.holdout,
            batch_size=ctx.options.get("batch_size", 4),
            ridge=float(meta.get("ridge", 0.0)),
            folds=int(meta.get("folds", 1) or 1),
            ridges=meta.get("ridges"),
        )
    return float(ctx.shared["greedy"].order.index(ctx.layer))


register_criterion(
    "direct_nll",
    _direct_nll,
    direction="lower",
    needs=("model", "holdout"),
    description="held-out NLL increase with this layer alone linearized (L + 1 held-out forwards)",
)
register_criterion(
    "direct_kl",
    _direct_kl,
    direction="lower",
    needs=("model", "holdout"),
    description="mean KL divergence from the original's next-token distributions with this layer alone "
    "linearized (the same passes as direct_nll; no labels, less noise)",
)
register_criterion(
    "greedy",
    _greedy,
    direction="lower",
    needs=("model", "data"),
    description="position in the greedy order: layers chosen one at a time, the rest re-fitted on "
    "the partially linearized model each step (steps calibration passes)",
)


def score_criteria(
    model: nn.Module,
    result: CalibrationResult,
    criteria: str | Sequence[str],
    *,
    heldout: torch.Tensor | None = None,
    data: torch.Tensor | None = None,
    batch_size: int = 4,
    **options: Any,
) -> dict[str, list[float]]:
    """Score criteria that need the model (and held-out or calibration tokens); store them in ``result``.

    ``criteria``: a name or a list of names (e.g. "direct_nll", "greedy"); ``heldout``: held-out token ids
    (num_samples, seq_len), never the tokens anything is reported on; ``data``: the calibration token ids
    (greedy re-fits on them); ``options``: settings of a criterion (greedy: ``steps``, ``base``). The maps
    are the result's; greedy re-fits with the result's ridge, folds and ridge grid. Returns
    ``{name: one score per layer}``; afterwards ``result.select(k, name)`` picks by them.
    """
    adapter = get_adapter(model)
    if not isinstance(result, CalibrationResult):
        raise TypeError(f"score_criteria: result must be a CalibrationResult, got {type(result).__name__}")
    if result.num_layers != adapter.num_layers or result.hidden_size != adapter.hidden_size:
        raise ValueError(
            f"score_criteria: the result ({result.num_layers} layers, hidden {result.hidden_size}) does "
            f"not match the model ({adapter.num_layers} layers, hidden {adapter.hidden_size})"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"score_criteria: batch_size must be a positive int, got {batch_size!r}")
    names = [criteria] if isinstance(criteria, str) else list(criteria)
    crits = [get_criterion(name) for name in names]
    if heldout is not None:
        heldout = check_token_data(heldout, adapter.vocab_size, "score_criteria(heldout)")
    if data is not None:
        data = check_token_data(data, adapter.vocab_size, "score_criteria(data)")
    given = {"model": model, "holdout": heldout, "data": data}
    for crit in crits:
        missing = [need for need in crit.needs if given.get(need) is None]
        if missing:
            arg = {"holdout": "heldout=", "data": "data=", "cv": "a calibration with folds", "model": "model"}
            raise ValueError(f"score_criteria: {crit.name!r} needs {', '.join(arg[m] for m in missing)}")
    opts = dict(
        options,
        batch_size=batch_size,
        metadata=result.metadata,
        maps={lc.layer: (lc.weight, lc.bias) for lc in result.layers},
    )
    out: dict[str, list[float]] = {}
    shared: dict[str, Any] = {}  # one scoring call: direct_nll and direct_kl share their passes
    for crit in crits:
        scores = []
        for lc in result.layers:
            ctx = LayerContext(
                layer=lc.layer,
                accumulator=None,
                weight=lc.weight,
                bias=lc.bias,
                ridge=lc.ridge if lc.ridge is not None else float(result.metadata.get("ridge", 0.0)),
                model=model,
                holdout=heldout,
                data=data,
                options=opts,
                shared=shared,
            )
            scores.append(float(crit.score(ctx)))
        result.set_scores(crit.name, scores)
        out[crit.name] = scores
    return out


__all__ = [
    "GreedySelection",
    "LayerDamage",
    "greedy_selection",
    "layer_damage",
    "heldout_nll",
    "layer_nll_increases",
    "linearized_layers",
    "score_criteria",
]
