"""``NBLConfig``: everything one compression run needs, validated, with one serializer.

    config = nbl_ext.NBLConfig(criterion="cca_bound", k=8, replacement="affine", num_samples=64, seq_len=512)
    model, result = nbl_ext.compress(model, "c4.json", config, tokenizer=tok)

:meth:`NBLConfig.to_dict` / :meth:`NBLConfig.from_dict` are the one way a config is written and read:
the ``config`` entry of a compressed model's ``config.nbl`` section and ``nbl_run.json`` (the CLI's
record of a run) both hold its output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nbl_ext.calibrate import ACTIVATIONS
from nbl_ext.criteria import get_criterion
from nbl_ext.crossval import DEFAULT_FOLDS, DEFAULT_RIDGES, check_ridges
from nbl_ext.linearize import REFIT_MODES, REPLACEMENTS
from nbl_ext.reference import GRAM_PRECISIONS
from nbl_ext.validation import check_choice, check_int

#: Bump when a field changes meaning; from_dict reads every version up to this one.
CONFIG_VERSION = 1
_WHAT = "NBLConfig"


def needs_selection(criterion: str) -> bool:
    """Whether a criterion scores layers on held-out selection tokens (direct_kl, direct_nll; greedy)."""
    crit = get_criterion(criterion)
    return "holdout" in crit.needs or crit.name == "greedy"


@dataclass(frozen=True)
class NBLConfig:
    """How to compress a model with NBL.

    Selection: ``criterion`` (a registered name or alias, see :mod:`nbl_ext.criteria`; default
    ``"direct_kl"``, the criterion the selection study found to rank layers by their damage) picks
    ``k`` layers, or ``layers`` names them (then ``k``, if given, must be their number);
    with neither, a quarter of the layers (at least one). Replacement: ``replacement`` "affine" (the
    fitted map) or "remove"; ``refit`` None or "sequential" (affine only). Fit: ``folds`` cross-validation
    folds of whole samples (None, the default: :data:`~nbl_ext.crossval.DEFAULT_FOLDS`, or ``num_samples``
    if fewer; 1: no validation) and ``ridges``, the grid of relative ridges each layer's ridge is chosen
    from by its closed-form held-out NMSE (default :data:`~nbl_ext.crossval.DEFAULT_RIDGES`; None: every
    layer uses ``ridge``, the fixed relative ridge of the LMMSE solve, which must then be the only one
    given). Calibration: ``num_samples`` x ``seq_len`` tokens (when compress is given token ids
    these must be their shape), ``batch_size`` samples per forward, ``gram_precision``, ``activations``
    (see :func:`nbl_ext.calibrate`), ``seed`` (data packing and sampling) and ``holdout`` (the fraction
    of a document file's documents left out of calibration; None: the package default for files).
    Criteria that score layers on held-out tokens (``"direct_kl"``, ``"direct_nll"``; ``"greedy"``, whose
    steps rank by them)
    get ``selection_samples`` more sequences of ``seq_len`` tokens from the same source, never fitted on
    (:attr:`needs_selection` says whether the criterion uses them).
    """

    criterion: str = "direct_kl"
    k: int | None = None
    layers: tuple[int, ...] | None = None
    replacement: str = "affine"
    refit: str | None = None
    ridge: float = 0.0
    folds: int | None = None
    ridges: tuple[float, ...] | None = DEFAULT_RIDGES
    num_samples: int = 16
    seq_len: int = 256
    batch_size: int = 4
    gram_precision: str = "float32"
    activations: str = "auto"
    seed: int = 0
    holdout: float | None = None
    selection_samples: int = 4

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalized values are stored once, here
        set_(self, "criterion", get_criterion(self.criterion).name)
        if self.k is not None:
            check_int(self.k, "k", 0, what=_WHAT)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise TypeError(f"{_WHAT}: layers must be a list of layer indices, got {type(self.layers).__name__}")
            layers = [check_int(v, "layers entry", 0, what=_WHAT) for v in self.layers]
            if len(set(layers)) != len(layers):
                raise ValueError(f"{_WHAT}: layers must be unique, got {layers}")
            set_(self, "layers", tuple(sorted(layers)))
            if self.k is not None and self.k != len(layers):
                raise ValueError(f"{_WHAT}: k={self.k} but {len(layers)} layers are given; pass one of them")
        check_choice(self.replacement, REPLACEMENTS, "replacement", what=_WHAT)
        check_choice(self.refit, REFIT_MODES, "refit", what=_WHAT)
        if self.refit is not None and self.replacement != "affine":
            raise ValueError(f"{_WHAT}: refit={self.refit!r} applies to replacement='affine' only")
        if (
            isinstance(self.ridge, bool)
            or not isinstance(self.ridge, (int, float))
            or not math.isfinite(self.ridge)
            or self.ridge < 0
        ):
            raise ValueError(f"{_WHAT}: ridge must be a finite number >= 0, got {self.ridge!r}")
        set_(self, "ridge", float(self.ridge))
        check_int(self.num_samples, "num_samples", 1, what=_WHAT)
        if self.folds is not None:
            check_int(self.folds, "folds", 1, what=_WHAT)
            if self.folds > self.num_samples:
                raise ValueError(
                    f"{_WHAT}: folds={self.folds} is more than num_samples={self.num_samples} (folds are "
                    "made of whole samples)"
                )
        if self.ridges is not None:
            set_(self, "ridges", tuple(float(v) for v in check_ridges(self.ridges, _WHAT).tolist()))
            if self.ridge != 0:
                raise ValueError(
                    f"{_WHAT}: ridge={self.ridge} fixes the ridge, but the ridges= grid chooses it by "
                    "cross-validation; pass ridges=None with a fixed ridge"
                )
        check_int(self.seq_len, "seq_len", 2, what=_WHAT)
        check_int(self.batch_size, "batch_size", 1, what=_WHAT)
        check_int(self.seed, "seed", 0, what=_WHAT)
        check_int(self.selection_samples, "selection_samples", 1, what=_WHAT)
        check_choice(self.gram_precision, GRAM_PRECISIONS, "gram_precision", what=_WHAT)
        check_choice(self.activations, ACTIVATIONS, "activations", what=_WHAT)
        if self.holdout is not None:
            if (
                isinstance(self.holdout, bool)
                or not isinstance(self.holdout, (int, float))
                or not 0.0 <= self.holdout < 1.0
            ):
                raise ValueError(f"{_WHAT}: holdout must be None or a fraction in [0, 1), got {self.holdout!r}")
            set_(self, "holdout", float(self.holdout))

    @property
    def needs_selection(self) -> bool:
        """Whether the criterion scores layers on held-out selection tokens (and no ``layers`` are given)."""
        return self.layers is None and needs_selection(self.criterion)

    @property
    def calibration_folds(self) -> int:
        """The folds calibration uses: ``folds``, or by default DEFAULT_FOLDS capped at ``num_samples``."""
        return self.folds if self.folds is not None else min(DEFAULT_FOLDS, self.num_samples)

    @property
    def calibration_ridges(self) -> tuple[float, ...] | None:
        """The ridge grid calibration chooses from (None without folds: the fixed ``ridge``)."""
        return self.ridges if self.calibration_folds > 1 else None

    @property
    def fit_options(self) -> dict[str, Any]:
        """The fit settings every step that fits maps takes (calibrate, greedy_selection, linearize's refit):
        ``ridge``, ``folds`` and ``ridges`` as resolved above."""
        return {"ridge": self.ridge, "folds": self.calibration_folds, "ridges": self.calibration_ridges}

    def replace(self, **changes: Any) -> NBLConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields plus ``config_version``; :meth:`from_dict` reads it back to an equal config."""
        out: dict[str, Any] = {"config_version": CONFIG_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> NBLConfig:
        """The config :meth:`to_dict` wrote (validated). ``strict=False`` skips keys that are not fields
        (a record such as nbl_run.json that holds the config among other facts)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"{_WHAT}.from_dict: expected a dict, got {type(data).__name__}")
        version = data.get("config_version", CONFIG_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= CONFIG_VERSION:
            raise ValueError(
                f"{_WHAT}.from_dict: unsupported config_version {version!r} (this nbl_ext reads 1..{CONFIG_VERSION})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"config_version"})
        if unknown and strict:
            raise ValueError(f"{_WHAT}.from_dict: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in data.items() if k in names})
