"""nbl-ext: Neural Block Linearization (Erdogan, Tonin & Cevher, NeurIPS 2025).

The foundation: streaming float64 statistics with a compiled accumulation
kernel, and the NBL numerics (LMMSE fit, canonical correlations, CCA bound).
Models and calibration data: ``load_model`` (bundled offline models, GGUF
files, Hugging Face directories and hub ids) and ``load_calibration_tokens``.
"""
from nbl_ext._extension import extension_info
from nbl_ext import ops  # noqa: F401  (defines the nbl:: ops)
from nbl_ext.numerics import (
    SingularWarning,
    canonical_correlations,
    cca_bound,
    fit_linear,
    lmmse_nmse,
)
from nbl_ext.stats import CovarianceAccumulator
from nbl_ext.data import load_calibration_tokens, read_documents, split_documents
from nbl_ext.models import load_model

__version__ = "0.1.0"

__all__ = [
    "CovarianceAccumulator",
    "SingularWarning",
    "canonical_correlations",
    "cca_bound",
    "extension_info",
    "fit_linear",
    "lmmse_nmse",
    "load_calibration_tokens",
    "load_model",
    "read_documents",
    "split_documents",
    "__version__",
]
