"""The outcome of a calibration: per-layer NBL scores and LMMSE maps, saved as safetensors + JSON."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbl_ext._io import atomic_directory, atomic_save_tensors, atomic_write_json, read_json, read_tensors
from nbl_ext.criteria import get_criterion
from nbl_ext.validation import check_choice, check_int

#: The names of today's two recipes, accepted wherever a criterion or a replacement is chosen:
#: "nbl" selects by the CCA bound (and replaces with the affine map), "drop" by the cosine (and removes).
METHODS = ("nbl", "drop")
#: Keys of the per-layer scores in calibration.json where they differ from the criterion name (format 1).
_ROW_KEYS = {"cca_bound": "bound"}
_REQUIRED_ROW_KEYS = ("bound", "nmse", "cosine")
#: Keys of a layer row that are not scores: the chosen ridge and the cross-validated NMSE per grid ridge
#: (present when calibrated with folds; absent in older files).
_INFO_ROW_KEYS = ("ridge", "cv_curve")
_FORMAT = "nbl-ext-calibration"
_VERSION = 1
CALIBRATION_JSON = "calibration.json"
CALIBRATION_TENSORS = "calibration.safetensors"


@dataclass
class LayerCalibration:
    """Scores and fitted map of one decoder layer's attention branch.

    ``scores``: criterion name -> score (see :mod:`nbl_ext.criteria`), among them ``cca_bound``
    (NBL's CCA bound between X and X + A, lower = more linear; also :attr:`bound`), ``nmse``
    (closed-form normalized MSE of ``A ~ W X + b`` on the calibration tokens) and ``cosine`` (mean
    per-token cosine similarity of X and X + A, the DROP score, higher = the branch changes less);
    ``weight`` (d, d) and ``bias`` (d,) in float64 on CPU; ``tokens``: samples the statistics saw.
    Calibrated with folds (``calibrate(..., folds=K)``): ``ridge``, the relative ridge of the map (chosen
    by cross-validation when a grid was given), ``scores["cv_nmse"]`` its held-out NMSE, and
    ``cv_curve`` the cross-validated NMSE for every ridge of the grid (None without a grid); both None
    without folds (the map then used the calibration's ``metadata["ridge"]``).
    """

    layer: int
    scores: dict[str, float]
    tokens: int
    weight: torch.Tensor
    bias: torch.Tensor
    ridge: float | None = None
    cv_curve: list[float] | None = None

    @property
    def bound(self) -> float:
        return self.scores["cca_bound"]

    @property
    def nmse(self) -> float:
        return self.scores["nmse"]

    @property
    def cosine(self) -> float:
        return self.scores["cosine"]

    def score(self, criterion: str) -> float:
        """This layer's score under ``criterion`` (a registered name or alias)."""
        crit = get_criterion(criterion)
        if crit.name not in self.scores:
            hint = {"cv": "folds: calibrate(..., folds=K >= 2)"}
            needs = f" (it needs {', '.join(hint.get(n, n) for n in crit.needs)})" if crit.needs else ""
            if "model" in crit.needs:
                needs += f"; score it with nbl_ext.score_criteria(model, result, {crit.name!r}, heldout=..., data=...)"
            raise ValueError(
                f"criterion {crit.name!r} was not scored for decoder layer {self.layer}{needs}; "
                f"scored: {', '.join(sorted(self.scores))}"
            )
        return self.scores[crit.name]

    def summary(self) -> dict[str, Any]:
        row: dict[str, Any] = {"layer": self.layer}
        row.update({_ROW_KEYS.get(name, name): value for name, value in self.scores.items()})
        row["tokens"] = self.tokens
        if self.ridge is not None:
            row["ridge"] = self.ridge
        if self.cv_curve is not None:
            row["cv_curve"] = list(self.cv_curve)
        return row


def check_layer_list(layers: Any, num_layers: int, what: str) -> list[int]:
    """Validate an explicit list of decoder-layer indices; return it sorted."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(
            f"{what}: layers must be a list of layer indices (e.g. result.select(k)), got {type(layers).__name__}"
        )
    out = []
    for v in layers:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
                v = int(v)
            else:
                raise TypeError(f"{what}: layer indices must be ints, got {v!r} ({type(v).__name__})")
        if not 0 <= v < num_layers:
            raise ValueError(
                f"{what}: layer index {v} is out of range; the model has {num_layers} layers (0..{num_layers - 1})"
            )
        out.append(int(v))
    if len(set(out)) != len(out):
        dup = sorted({v for v in out if out.count(v) > 1})
        raise ValueError(f"{what}: layer indices must be unique; repeated: {dup}")
    return sorted(out)


class CalibrationResult:
    """Per-layer NBL calibration of a model: scores, fitted maps, metadata.

    ``layers[i]`` is the :class:`LayerCalibration` of decoder layer i.
    ``metadata`` holds model_type, num_layers, hidden_size, tokens, target, ...
    """

    def __init__(self, layers: list[LayerCalibration], metadata: dict[str, Any]) -> None:
        for i, lc in enumerate(layers):
            if lc.layer != i:
                raise ValueError(f"CalibrationResult: layers must be in order 0..n-1; entry {i} is layer {lc.layer}")
        self.layers = list(layers)
        self.metadata = dict(metadata)

    # --- views ---------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.metadata["hidden_size"])

    @property
    def model_type(self) -> str:
        return str(self.metadata["model_type"])

    @property
    def bounds(self) -> list[float]:
        return [lc.bound for lc in self.layers]

    @property
    def nmse(self) -> list[float]:
        return [lc.nmse for lc in self.layers]

    @property
    def cosines(self) -> list[float]:
        return [lc.cosine for lc in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (
            f"CalibrationResult(model_type={self.metadata.get('model_type')!r}, num_layers={self.num_layers}, "
            f"hidden_size={self.metadata.get('hidden_size')}, tokens={self.metadata.get('tokens')})"
        )

    def select(self, k: int, criterion: str = "cca_bound", *, method: str | None = None) -> list[int]:
        """The k most replaceable layers by ``criterion``, sorted.

        ``criterion``: a registered name or alias (:mod:`nbl_ext.criteria`): "cca_bound" (default; alias
        "nbl"): lowest CCA bound; "cosine" (alias "drop"): highest cosine; "nmse": lowest NMSE.
        ``method`` ("nbl" or "drop"), the older spelling, picks the same criteria.
        """
        if method is not None:
            criterion = check_choice(method, METHODS, "method", what="select")
        crit = get_criterion(criterion)
        n = self.num_layers
        check_int(k, "k", what="select")
        if not 0 <= k <= n:
            raise ValueError(f"select: k must be between 0 and the number of layers ({n}), got {k}")
        return sorted(self.rank(crit.name)[:k])

    def rank(self, criterion: str) -> list[int]:
        """All layer indices from the most replaceable to the least by ``criterion``."""
        crit = get_criterion(criterion)
        return crit.order([lc.score(crit.name) for lc in self.layers])

    def table(self) -> list[dict[str, Any]]:
        """One row per layer: layer, bound, nmse, cosine, (cv_nmse, residual_ratio, ridge with folds), tokens,
        and the layer's rank under each method."""
        nbl_rank = {i: r for r, i in enumerate(self.rank("nbl"))}
        drop_rank = {i: r for r, i in enumerate(self.rank("drop"))}
        return [dict(lc.summary(), nbl_rank=nbl_rank[lc.layer], drop_rank=drop_rank[lc.layer]) for lc in self.layers]

    def set_scores(self, criterion: str, scores: Any) -> None:
        """Store one score per layer under ``criterion`` (e.g. computed by :func:`nbl_ext.selection.score_criteria`)."""
        crit = get_criterion(criterion)
        values = [float(v) for v in scores]
        if len(values) != self.num_layers:
            raise ValueError(
                f"set_scores: {crit.name} needs one score per layer ({self.num_layers}), got {len(values)}"
            )
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"set_scores: {crit.name} scores of layers {bad} are NaN or inf")
        for lc, v in zip(self.layers, values):
            lc.scores[crit.name] = v

    def summary(self) -> dict[str, Any]:
        """JSON-able metadata and per-layer scores (no tensors)."""
        return {"metadata": dict(self.metadata), "layers": [lc.summary() for lc in self.layers]}

    # --- persistence -----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write ``calibration.json`` + ``calibration.safetensors`` to directory ``path`` atomically."""
        with atomic_directory(path) as tmp:
            atomic_save_tensors(tmp / CALIBRATION_TENSORS, _tensor_dict(self.layers), metadata={"format": _FORMAT})
            atomic_write_json(tmp / CALIBRATION_JSON, {"format": _FORMAT, "version": _VERSION, **self.summary()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationResult:
        """Read a directory written by :meth:`save` (validated; clear errors for a damaged one)."""
        path = Path(path)
        what = f"CalibrationResult.load({str(path)!r})"
        if not path.is_dir():
            raise FileNotFoundError(f"{what}: not a directory")
        doc = read_json(path / CALIBRATION_JSON, what)
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"{what}: {CALIBRATION_JSON} is not an nbl-ext calibration file")
        if doc.get("version") != _VERSION:
            raise ValueError(
                f"{what}: unsupported calibration format version {doc.get('version')!r} (expected {_VERSION})"
            )
        meta, rows = doc.get("metadata"), doc.get("layers")
        if not isinstance(meta, dict) or not isinstance(rows, list):
            raise ValueError(f"{what}: {CALIBRATION_JSON} lacks 'metadata' or 'layers'")
        tensors = read_tensors(path / CALIBRATION_TENSORS, what)
        return cls(layers_from_records(rows, tensors, meta, what), meta)


_ROW_NAMES = {key: name for name, key in _ROW_KEYS.items()}


def _row_order(key: str) -> tuple[int, str]:
    """The format-1 scores first, in their order, then any others by name."""
    return (_REQUIRED_ROW_KEYS.index(key), "") if key in _REQUIRED_ROW_KEYS else (len(_REQUIRED_ROW_KEYS), key)


def _tensor_dict(layers: list[LayerCalibration]) -> dict[str, torch.Tensor]:
    out = {}
    for lc in layers:
        out[f"layers.{lc.layer}.weight"] = lc.weight.to(torch.float64)
        out[f"layers.{lc.layer}.bias"] = lc.bias.to(torch.float64)
    return out


def layers_from_records(
    rows: list[Any], tensors: dict[str, torch.Tensor], meta: dict[str, Any], what: str
) -> list[LayerCalibration]:
    """Rebuild LayerCalibration objects from JSON rows and a tensor dict, validating everything."""
    try:
        d = int(meta["hidden_size"])
        n = int(meta["num_layers"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{what}: metadata must hold integer 'hidden_size' and 'num_layers'") from None
    if len(rows) != n:
        raise ValueError(f"{what}: metadata says {n} layers but {len(rows)} layer records are present")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or row.get("layer") != i:
            raise ValueError(f"{what}: layer record {i} is malformed or out of order")
        scores = {}
        for key in sorted(set(row) - {"layer", "tokens", *_INFO_ROW_KEYS} | set(_REQUIRED_ROW_KEYS), key=_row_order):
            v = row.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{what}: layer {i} has an invalid {key}: {v!r}")
            scores[_ROW_NAMES.get(key, key)] = float(v)
        tokens = row.get("tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"{what}: layer {i} has an invalid token count: {tokens!r}")
        ts = {}
        for name, shape in (("weight", (d, d)), ("bias", (d,))):
            key = f"layers.{i}.{name}"
            t = tensors.get(key)
            if t is None:
                raise ValueError(f"{what}: tensor {key} is missing")
            if tuple(t.shape) != shape:
                raise ValueError(f"{what}: tensor {key} has shape {tuple(t.shape)}, expected {shape}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{what}: tensor {key} contains NaN or inf")
            ts[name] = t.to(torch.float64)
        ridge, curve = row.get("ridge"), row.get("cv_curve")
        if ridge is not None and (
            isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0
        ):
            raise ValueError(f"{what}: layer {i} has an invalid ridge: {ridge!r}")
        if curve is not None and (
            not isinstance(curve, list)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in curve)
        ):
            raise ValueError(f"{what}: layer {i} has an invalid cv_curve: {curve!r}")
        out.append(
            LayerCalibration(
                i,
                scores,
                tokens,
                ts["weight"],
                ts["bias"],
                None if ridge is None else float(ridge),
                None if curve is None else [float(v) for v in curve],
            )
        )
    return out
