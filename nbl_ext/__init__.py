"""nbl-ext: Neural Block Linearization (Erdogan, Tonin & Cevher, NeurIPS 2025).

The foundation: streaming float64 statistics with a compiled accumulation
kernel, and the NBL numerics (LMMSE fit, canonical correlations, CCA bound).
The Hugging Face core: per-family adapters, layer-by-layer calibration,
in-place linearization and self-contained checkpoints::

    result = nbl_ext.calibrate(model, token_ids)
    nbl_ext.linearize(model, result, result.select(k))
    nbl_ext.save_pretrained(model, "out/")
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

__version__ = "0.1.0"

from nbl_ext.adapters import get_adapter  # noqa: E402
from nbl_ext.result import CalibrationResult  # noqa: E402
from nbl_ext.calibrate import calibrate  # noqa: E402
from nbl_ext.linearize import linearize  # noqa: E402
from nbl_ext.serialization import load_pretrained, save_pretrained  # noqa: E402

__all__ = [
    "CalibrationResult",
    "CovarianceAccumulator",
    "SingularWarning",
    "canonical_correlations",
    "cca_bound",
    "calibrate",
    "extension_info",
    "fit_linear",
    "get_adapter",
    "linearize",
    "lmmse_nmse",
    "load_pretrained",
    "save_pretrained",
    "__version__",
]
