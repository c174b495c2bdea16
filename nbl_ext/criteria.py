"""Layer-selection criteria: how replaceable each decoder layer's attention branch is.

A criterion is one function that scores one layer from a :class:`LayerContext` (what calibration
collected for that layer), plus its direction ("lower": the lowest scores are replaced first;
"higher": the highest). :func:`nbl_ext.calibrate` computes every registered criterion in the same
pass and stores the scores in ``LayerCalibration.scores``; ``CalibrationResult.select(k, criterion=name)``
picks the k best layers by one of them. What replaces the chosen blocks (an affine map or nothing) is a
separate choice: ``nbl_ext.linearize(..., replacement=...)``.

Built in:

* ``"cca_bound"`` (alias ``"nbl"``): the paper's bound sum(1 - rho_i^2) over the canonical correlations
  between X and X + A (lower = more linear);
* ``"nmse"``: the in-sample normalized MSE of the fitted LMMSE map A ~ W X + b (lower = better fit);
* ``"cosine"`` (alias ``"drop"``): the mean per-token cosine similarity of X and X + A, DROP's score
  (higher = the branch changes the residual stream less);
* ``"cv_nmse"``: the cross-validated (held-out) NMSE of the fitted map at the chosen ridge, in closed form
  from per-fold moments (:mod:`nbl_ext.crossval`; needs ``calibrate(..., folds=K)`` with K >= 2);
* ``"residual_ratio"``: the map's held-out error energy divided by the energy of the hidden state after
  the block, X + A (what the following layers read; also needs folds).

Criteria that need the model and held-out tokens (``"direct_nll"``: each layer linearized alone, the
increase of the held-out NLL; ``"greedy"``: layers chosen one at a time on the partially linearized model)
are registered by :mod:`nbl_ext.selection` and scored by :func:`nbl_ext.selection.score_criteria`.

Adding a criterion is one function and one registration, here or in user code::

    def residual_energy(ctx: LayerContext) -> float:
        return float(ctx.accumulator.cov_yy.trace() / ctx.accumulator.cov_xx.trace())

    register_criterion("residual_energy", residual_energy, direction="lower")

Statistics the moments do not hold come from a per-token function ``token_statistic(x, a)`` whose mean
over all calibration tokens the layer-by-layer engine streams and hands over as
``ctx.token_means[name]`` (that is how ``"cosine"`` works). A criterion that needs more than the
statistics (the model, held-out tokens) names those :class:`LayerContext` fields in ``needs``; the
statistics pass, where they are None, leaves it out, and whoever provides them scores it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from nbl_ext.crossval import CrossValidation
from nbl_ext.numerics import cca_bound, lmmse_nmse
from nbl_ext.validation import check_choice

DIRECTIONS = ("lower", "higher")


@dataclass(frozen=True)
class LayerContext:
    """What a criterion may look at for decoder layer ``layer``.

    ``accumulator``: the moments of (X, A) over all calibration tokens (``count``, ``mean_x``,
    ``cov_xx``, ``cov_yx``, ``cov_yy``, ...); ``weight`` (d, d), ``bias`` (d,): the LMMSE map fitted on
    them with relative ridge ``ridge``; ``token_means``: the means of the registered token statistics.
    ``cv``: the closed-form cross-validation of the map over the folds (None without folds), evaluated
    at ``ridge`` (:attr:`cv_index` finds it in the grid). ``model``, ``holdout`` (held-out token ids,
    (num_samples, seq_len)) and ``data`` (calibration token ids, for criteria that re-fit) are None in the
    statistics pass; criteria that ``need`` them are scored where they are given. ``options``: keyword
    settings of such a scoring call; ``shared``: scratch space shared by the layers of one scoring call
    (e.g. the original model's held-out NLL, computed once).
    """

    layer: int
    accumulator: Any
    weight: torch.Tensor
    bias: torch.Tensor
    ridge: float = 0.0
    token_means: Mapping[str, float] = field(default_factory=dict)
    model: Any = None
    holdout: torch.Tensor | None = None
    cv: CrossValidation | None = None
    data: torch.Tensor | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def cv_index(self) -> int:
        """Index of :attr:`ridge` in the cross-validation grid (the chosen ridge when there is a grid)."""
        if self.cv is None:
            raise ValueError(f"decoder layer {self.layer}: no cross-validation (calibrate with folds >= 2)")
        if self.cv.ridges.numel() == 1:
            return 0
        return self.cv.best_index


#: LayerContext fields a criterion may list in ``needs`` (the rest are always there).
OPTIONAL_FIELDS = ("model", "holdout", "cv", "data")


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: ``score(ctx) -> float`` and which end of the scale is replaced first."""

    name: str
    score: Callable[[LayerContext], float]
    direction: str
    token_statistic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    needs: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str = ""

    def order(self, scores: Sequence[float]) -> list[int]:
        """Indices of ``scores`` from the most replaceable to the least (ties: the lower index first)."""
        sign = 1.0 if self.direction == "lower" else -1.0
        return sorted(range(len(scores)), key=lambda i: (sign * scores[i], i))

    def available(self, ctx: LayerContext) -> bool:
        """Whether ``ctx`` holds everything the criterion needs."""
        return all(getattr(ctx, name) is not None for name in self.needs)


_REGISTRY: dict[str, Criterion] = {}
_ALIASES: dict[str, str] = {}


def register_criterion(
    name: str,
    score: Callable[[LayerContext], float],
    *,
    direction: str,
    token_statistic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    needs: Sequence[str] = (),
    aliases: Sequence[str] = (),
    description: str = "",
) -> Criterion:
    """Register a selection criterion under ``name`` (and ``aliases``); returns it.

    ``direction``: "lower" (lowest scores replaced first) or "higher". ``token_statistic(x, a)``: per-token
    values whose mean the calibration pass streams into ``ctx.token_means[name]``. ``needs``: fields of
    :class:`LayerContext` beyond the statistics ("model", "holdout") the score reads.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_criterion: name must be an identifier-like string, got {name!r}")
    if not callable(score):
        raise TypeError(f"register_criterion: score must be callable (ctx -> float), got {type(score).__name__}")
    check_choice(direction, DIRECTIONS, "direction", what="register_criterion")
    if token_statistic is not None and not callable(token_statistic):
        raise TypeError("register_criterion: token_statistic must be callable ((x, a) -> per-token values)")
    bad = [n for n in needs if n not in OPTIONAL_FIELDS]
    if bad:
        raise ValueError(f"register_criterion: needs may list {OPTIONAL_FIELDS}, got {bad}")
    taken = [n for n in (name, *aliases) if n in _REGISTRY or n in _ALIASES]
    if taken:
        raise ValueError(f"register_criterion: {', '.join(map(repr, taken))} is already registered")
    crit = Criterion(name, score, direction, token_statistic, tuple(needs), tuple(aliases), description)
    _REGISTRY[name] = crit
    for alias in aliases:
        _ALIASES[alias] = name
    return crit


def unregister_criterion(name: str) -> None:
    """Remove a criterion registered under ``name`` (and its aliases)."""
    crit = get_criterion(name)
    del _REGISTRY[crit.name]
    for alias in crit.aliases:
        _ALIASES.pop(alias, None)


def criterion_names() -> list[str]:
    """The registered criteria and their aliases, sorted."""
    return sorted([*_REGISTRY, *_ALIASES])


def get_criterion(name: Any) -> Criterion:
    """The criterion registered under ``name`` or an alias; ValueError listing the known ones otherwise."""
    key = _ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in _REGISTRY:
        raise ValueError(f"unknown selection criterion {name!r}; known criteria: {', '.join(criterion_names())}")
    return _REGISTRY[key]


def token_statistics() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``{name: token_statistic}`` of every registered criterion that streams one."""
    return {c.name: c.token_statistic for c in _REGISTRY.values() if c.token_statistic is not None}


def compute_scores(ctx: LayerContext, names: Sequence[str] | None = None) -> dict[str, float]:
    """``{name: score}`` of the named criteria (default: every registered one ``ctx`` can serve)."""
    if names is None:
        chosen = [c for c in _REGISTRY.values() if c.available(ctx)]
    else:
        chosen = [get_criterion(n) for n in names]
        missing = [f"{c.name} needs {', '.join(c.needs)}" for c in chosen if not c.available(ctx)]
        if missing:
            raise ValueError(f"cannot score layer {ctx.layer}: {'; '.join(missing)}")
    return {c.name: float(c.score(ctx)) for c in chosen}


# --- the built-in criteria ----------------------------------------------------------------


def _cca_bound(ctx: LayerContext) -> float:
    return float(cca_bound(ctx.accumulator, residual=True))


def _nmse(ctx: LayerContext) -> float:
    if float(ctx.accumulator.cov_yy.trace()) > 0:
        return float(lmmse_nmse(ctx.accumulator, ctx.weight, ctx.bias))
    return 0.0  # A is constant: the bias alone reproduces it


def _token_cosine(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return torch.nn.functional.cosine_similarity(xf, xf + a.float(), dim=-1)


def _cosine(ctx: LayerContext) -> float:
    return ctx.token_means["cosine"]


def _cv_nmse(ctx: LayerContext) -> float:
    return float(ctx.cv.nmse[ctx.cv_index])


def _residual_ratio(ctx: LayerContext) -> float:
    return float(ctx.cv.residual_ratio[ctx.cv_index])


register_criterion(
    "cca_bound",
    _cca_bound,
    direction="lower",
    aliases=("nbl",),
    description="NBL's CCA bound sum(1 - rho^2) between X and X + A (lower = more linear)",
)
register_criterion("nmse", _nmse, direction="lower", description="in-sample NMSE of the fitted affine map A ~ W X + b")
register_criterion(
    "cosine",
    _cosine,
    direction="higher",
    token_statistic=_token_cosine,
    aliases=("drop",),
    description="mean cosine(X, X + A), DROP's score (higher = the branch changes less)",
)
register_criterion(
    "cv_nmse",
    _cv_nmse,
    direction="lower",
    needs=("cv",),
    description="cross-validated NMSE of the fitted map at the chosen ridge (calibrate with folds)",
)
register_criterion(
    "residual_ratio",
    _residual_ratio,
    direction="lower",
    needs=("cv",),
    description="held-out error energy of the map / energy of X + A, the residual stream after "
    "the block (calibrate with folds)",
)
