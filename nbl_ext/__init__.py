"""nbl-ext: Neural Block Linearization (Erdogan, Tonin & Cevher, NeurIPS 2025).

The foundation: streaming float64 statistics with a compiled accumulation
kernel, and the NBL numerics (LMMSE fit, canonical correlations, CCA bound).
Models and calibration data: ``load_model`` (bundled offline models, GGUF
files, Hugging Face directories and hub ids) and ``load_calibration_tokens``.
The Hugging Face core: per-family adapters, layer-by-layer calibration,
in-place linearization and self-contained checkpoints::

    model, tok = nbl_ext.load_model()                       # bundled SmolLM2-135M
    tokens = nbl_ext.load_calibration_tokens("self", tok, num_samples=16, seq_len=256, model=model)
    result = nbl_ext.calibrate(model, tokens)
    nbl_ext.linearize(model, result, result.select(k))
    nbl_ext.save_pretrained(model, "out/", tok, calibration=result)
    nbl_ext.heal(model, tokens, nbl_ext.HealConfig(method="lora"))   # optional: recover accuracy
    model = transformers.AutoModelForCausalLM.from_pretrained("out/", device_map="auto")  # after import nbl_ext

or, in one call driven by a config object (the same three steps)::

    model, result = nbl_ext.compress(model, tokens, nbl_ext.NBLConfig(k=8, num_samples=16, seq_len=256))

Selection criteria are a registry (``nbl_ext.register_criterion``; see :mod:`nbl_ext.criteria`).
"""

from nbl_ext import ops  # noqa: F401  (defines the nbl:: ops)
from nbl_ext._extension import extension_info
from nbl_ext.adapters import get_adapter
from nbl_ext.api import compress
from nbl_ext.calibrate import calibrate
from nbl_ext.config import NBLConfig
from nbl_ext.criteria import LayerContext, criterion_names, get_criterion, register_criterion
from nbl_ext.crossval import CrossValidation, choose_ridge, cross_validate, cross_validated_nmse
from nbl_ext.data import load_calibration_tokens, read_documents, split_documents
from nbl_ext.heal import HealConfig, HealResult, OriginalBranches, heal
from nbl_ext.hf import register_auto_classes
from nbl_ext.linearize import linearize
from nbl_ext.models import load_model
from nbl_ext.numerics import (
    Moments,
    SingularWarning,
    canonical_correlations,
    cca_bound,
    fit_linear,
    lmmse_nmse,
)
from nbl_ext.ops import reference_kernels_enabled, use_reference_kernels
from nbl_ext.result import CalibrationResult
from nbl_ext.selection import greedy_selection, score_criteria
from nbl_ext.serialization import load_pretrained, save_pretrained
from nbl_ext.stats import CovarianceAccumulator

register_auto_classes()  # AutoModelForCausalLM.from_pretrained(checkpoint) works from here on

__version__ = "0.1.0"

__all__ = [
    "CalibrationResult",
    "CovarianceAccumulator",
    "CrossValidation",
    "HealConfig",
    "HealResult",
    "LayerContext",
    "Moments",
    "NBLConfig",
    "OriginalBranches",
    "SingularWarning",
    "calibrate",
    "canonical_correlations",
    "cca_bound",
    "choose_ridge",
    "compress",
    "criterion_names",
    "cross_validate",
    "cross_validated_nmse",
    "extension_info",
    "fit_linear",
    "get_adapter",
    "get_criterion",
    "greedy_selection",
    "heal",
    "linearize",
    "lmmse_nmse",
    "load_calibration_tokens",
    "load_model",
    "load_pretrained",
    "read_documents",
    "reference_kernels_enabled",
    "register_criterion",
    "save_pretrained",
    "score_criteria",
    "split_documents",
    "use_reference_kernels",
    "__version__",
]
