"""Streaming float64 first and second moments of a pair of variables (x, y)."""

from __future__ import annotations

from typing import Any

import torch

from nbl_ext import ops
from nbl_ext.numerics import Moments, require_count
from nbl_ext.reference import GRAM_PRECISIONS

#: Relative error bound of precision="bfloat16": max |cov - cov_oracle| / max |cov_oracle|
#: against a float64 two-pass oracle. 2**-8 (3.9e-3) plus float32 round-off: each
#: bf16-rounded product x_i y_j is off by at most ~2 * 2**-9 relative, so an entry of
#: cov_xx / cov_yy is off by at most 2**-8 sqrt(cov_ii cov_jj) <= 2**-8 max |cov|,
#: whatever the data and the number of samples (cov_yx: the same relative to
#: sqrt(max cov_xx * max cov_yy)). The C++ and Python tests hold the mode to it
#: (csrc/tests, python_tests/test_accumulator.py); see CovarianceAccumulator for the
#: measured (typical) errors, which are 10-30x smaller.
BF16_REL_ERR_BOUND = 4e-3

_F64 = torch.float64
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CovarianceAccumulator:
    """Streaming means and (cross-)covariances of x (dim_x) and y (dim_y).

    Memory is O((dim_x + dim_y)^2) whatever the number of samples: each
    :meth:`update` centers the chunk on its own mean, forms its Gram products
    (compiled ``nbl::cov_update_`` kernel) and merges them into float64 state
    with the pairwise update of Chan et al., so channels with huge means and
    small variance (LLM "massive activations") keep their precision.

    Example::

        acc = nbl_ext.CovarianceAccumulator(576, 576)
        for x, y in batches:              # (..., 576) each, any float dtype
            acc.update(x, y)
        W, b = nbl_ext.fit_linear(acc)    # y ~ W x + b

    Attributes (float64 copies): ``count``, ``mean_x``, ``mean_y``,
    ``cov_xx`` (dim_x, dim_x), ``cov_yx`` (dim_y, dim_x), ``cov_yy``
    (dim_y, dim_y); covariances are unbiased (divided by count - 1).

    ``precision`` chooses how each chunk's centered Gram products are formed
    (the means, the merge and the state are float64 in every mode):

    * ``"float32"`` (default): float32 products of the centered values (float64
      for float64 inputs); on CUDA TF32 is off whatever
      ``torch.backends.cuda.matmul.allow_tf32`` says. Relative covariance
      error against a float64 two-pass oracle ~1e-7.
    * ``"bfloat16"``: the centered values are rounded to bfloat16 (8 mantissa
      bits, relative rounding 2**-9) and multiplied with float32 accumulation:
      a bf16 tensor-core GEMM on CUDA (spec sheet, H100/H200 SXM: ~990 TFLOP/s
      dense bf16 vs ~67 TFLOP/s float32), the same numbers through a float32
      GEMM on CPU (no speed-up there). Accuracy cost, measured on CPU as
      max |cov - oracle| / max |oracle| over cov_xx, cov_yx, cov_yy against a
      float64 two-pass oracle: 1.2e-4 .. 3.7e-4 with 3000-9000 samples
      (float32 mode: 0.6e-7 .. 2.4e-7 on the same data), 1.4e-3 with only 64
      samples (python_tests/test_accumulator.py's cases); on the benchmark's
      LLM-like data (bench/README.md) 5.5e-4 / 2.7e-4 / 1.4e-4 at d = 576
      and 1024 / 4096 / 16384 tokens. The rounding errors are independent
      per value, so they shrink like 1/sqrt(samples); the worst case, any
      data, is :data:`BF16_REL_ERR_BOUND` (2**-8), which the tests hold it
      to. The means, the chunk centering (massive activations) and the
      merge stay float64. Use it for long calibration streams on GPUs where
      the Gram GEMMs dominate; keep "float32" when the fit must match a
      float32 run to more than ~3 digits.
    """

    def __init__(
        self, dim_x: int, dim_y: int, *, device: torch.device | str | None = None, precision: str = "float32"
    ) -> None:
        for name, dim in (("dim_x", dim_x), ("dim_y", dim_y)):
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"CovarianceAccumulator: {name} must be a positive int, got {dim!r}")
        if precision not in GRAM_PRECISIONS:
            raise ValueError(
                f"CovarianceAccumulator: precision must be one of {', '.join(map(repr, GRAM_PRECISIONS))}; "
                f"got {precision!r}. 'float32' (default) is float32-grade; 'bfloat16' rounds the centered "
                "values to bfloat16 for tensor-core speed at a measured accuracy cost (see the class docstring)"
            )
        self.precision = precision
        self.dim_x, self.dim_y = dim_x, dim_y
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        kw = dict(dtype=_F64, device=self.device)
        self.count = 0
        self._mean_x = torch.zeros(dim_x, **kw)
        self._mean_y = torch.zeros(dim_y, **kw)
        self._m_xx = torch.zeros(dim_x, dim_x, **kw)
        self._m_yx = torch.zeros(dim_y, dim_x, **kw)
        self._m_yy = torch.zeros(dim_y, dim_y, **kw)

    # --- accumulation ------------------------------------------------------
    def update(self, x: torch.Tensor, y: torch.Tensor) -> CovarianceAccumulator:
        """Add samples: x (..., dim_x) and y (..., dim_y) with the same leading shape.

        Leading dimensions are flattened into samples; any float dtype; the
        tensors must be on the accumulator's device. An empty chunk is a no-op.
        Raises ValueError (state unchanged) on NaN/inf, naming the input.
        """
        self._check_chunk(x, y)
        x2 = x.reshape(-1, self.dim_x)
        y2 = y.reshape(-1, self.dim_y)
        if x2.shape[0] == 0:
            return self
        ops.cov_update_(
            self._mean_x, self._mean_y, self._m_xx, self._m_yx, self._m_yy, x2, y2, self.count, self.precision
        )
        self.count += x2.shape[0]
        return self

    def _check_chunk(self, x: Any, y: Any) -> None:
        for name, t, dim in (("x", x, self.dim_x), ("y", y, self.dim_y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"CovarianceAccumulator.update: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(
                    f"CovarianceAccumulator.update: {name} must be float16/bfloat16/float32/float64, got {t.dtype}"
                )
            if t.dim() < 1 or t.shape[-1] != dim:
                raise ValueError(
                    f"CovarianceAccumulator.update: {name} must have shape (..., {dim}) (dim_{name}={dim}), "
                    f"got {tuple(t.shape)}"
                )
            if t.device != self.device:
                raise ValueError(
                    f"CovarianceAccumulator.update: {name} is on {t.device} but the accumulator is on "
                    f"{self.device}; move the tensor (tensor.to('{self.device}')) or create the "
                    f"accumulator with device='{t.device}'"
                )
        if x.shape[:-1] != y.shape[:-1]:
            raise ValueError(
                "CovarianceAccumulator.update: x and y must have the same leading shape (one y per x); "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Fold another accumulator's samples into this one (in place; returns self)."""
        if not isinstance(other, CovarianceAccumulator):
            raise TypeError(f"merge: expected a CovarianceAccumulator, got {type(other).__name__}")
        if (other.dim_x, other.dim_y) != (self.dim_x, self.dim_y):
            raise ValueError(
                f"merge: dimensions differ: this accumulator is ({self.dim_x}, {self.dim_y}), "
                f"the other ({other.dim_x}, {other.dim_y})"
            )
        self._assign_moments(self._view().merge(other._view()))
        return self

    def all_reduce(self, group: Any = None) -> CovarianceAccumulator:
        """Combine the accumulators of all ranks of ``group`` (torch.distributed), in place.

        Afterwards every rank holds the statistics of all ranks' samples, as
        if one process had seen them all. Two float64 all-reduces (counts and
        sums, then shifted co-moments); memory O(d^2), whatever the world size.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "all_reduce: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group() first (or launch with torchrun)"
            )
        dx, dy = self.dim_x, self.dim_y
        first = torch.cat(
            [
                torch.tensor([float(self.count)], dtype=_F64, device=self.device),
                self._mean_x * self.count,
                self._mean_y * self.count,
            ]
        )
        dist.all_reduce(first, group=group)
        total = int(round(float(first[0])))
        if total == 0:
            return self
        mean_x, mean_y = first[1 : 1 + dx] / total, first[1 + dx :] / total
        # Shift each rank's co-moments to the global mean, then sum.
        d_x, d_y = self._mean_x - mean_x, self._mean_y - mean_y
        n = float(self.count)
        second = torch.cat(
            [
                (self._m_xx + n * torch.outer(d_x, d_x)).reshape(-1),
                (self._m_yx + n * torch.outer(d_y, d_x)).reshape(-1),
                (self._m_yy + n * torch.outer(d_y, d_y)).reshape(-1),
            ]
        )
        dist.all_reduce(second, group=group)
        m_xx, m_yx, m_yy = second.split([dx * dx, dy * dx, dy * dy])
        self._assign(total, (mean_x, mean_y), (m_xx.view(dx, dx), m_yx.view(dy, dx), m_yy.view(dy, dy)))
        return self

    def _assign(self, count: int, means: tuple, ms: tuple) -> None:
        self.count = int(count)
        self._mean_x, self._mean_y = (t.contiguous() for t in means)
        self._m_xx, self._m_yx, self._m_yy = (t.contiguous() for t in ms)

    def _assign_moments(self, m: Moments) -> None:
        self._assign(m.count, (m.mean_x, m.mean_y), (m.m_xx, m.m_yx, m.m_yy))

    def _view(self) -> Moments:
        # Shares this accumulator's storage: only for immediate internal use (update() writes in place).
        return Moments(self.count, self._mean_x, self._mean_y, self._m_xx, self._m_yx, self._m_yy)

    # --- moments -----------------------------------------------------------
    def moments(self) -> Moments:
        """A snapshot of the statistics (float64 copies on this accumulator's device).

        What :func:`nbl_ext.fit_linear` and the other numerics read; later
        updates of the accumulator do not change it.
        """
        return Moments(
            self.count, *(t.clone() for t in (self._mean_x, self._mean_y, self._m_xx, self._m_yx, self._m_yy))
        )

    @classmethod
    def from_moments(cls, moments: Moments, *, precision: str = "float32") -> CovarianceAccumulator:
        """An accumulator holding ``moments`` (copied), on their device, ready for more updates or merges."""
        if not isinstance(moments, Moments):
            raise TypeError(f"from_moments: expected nbl_ext.Moments, got {type(moments).__name__}")
        acc = cls(moments.dim_x, moments.dim_y, device=moments.device, precision=precision)
        acc._assign_moments(
            Moments(
                moments.count,
                *(t.clone() for t in (moments.mean_x, moments.mean_y, moments.m_xx, moments.m_yx, moments.m_yy)),
            )
        )
        return acc

    # --- statistics --------------------------------------------------------
    def _require(self, n: int, what: str) -> None:
        require_count(self.count, n, what)

    @property
    def mean_x(self) -> torch.Tensor:
        self._require(1, "mean_x")
        return self._mean_x.clone()

    @property
    def mean_y(self) -> torch.Tensor:
        self._require(1, "mean_y")
        return self._mean_y.clone()

    def _cov(self, m: torch.Tensor, what: str) -> torch.Tensor:
        self._require(2, what)
        return m / (self.count - 1)

    @property
    def cov_xx(self) -> torch.Tensor:
        return self._cov(self._m_xx, "cov_xx")

    @property
    def cov_yx(self) -> torch.Tensor:
        return self._cov(self._m_yx, "cov_yx")

    @property
    def cov_yy(self) -> torch.Tensor:
        return self._cov(self._m_yy, "cov_yy")

    # --- persistence -------------------------------------------------------
    _STATE_KEYS = ("mean_x", "mean_y", "m_xx", "m_yx", "m_yy")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors-compatible): count, dims, means and co-moments."""
        sd = {k: getattr(self, f"_{k}").clone() for k in self._STATE_KEYS}
        sd["count"] = torch.tensor(self.count, dtype=torch.int64)
        sd["dims"] = torch.tensor([self.dim_x, self.dim_y], dtype=torch.int64)
        return sd

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> CovarianceAccumulator:
        """Restore from :meth:`state_dict` (moved to this accumulator's device)."""
        missing = [k for k in (*self._STATE_KEYS, "count", "dims") if k not in state]
        if missing:
            raise KeyError(f"load_state_dict: missing keys {missing}; expected the output of state_dict()")
        dims = tuple(int(v) for v in state["dims"].tolist())
        if dims != (self.dim_x, self.dim_y):
            raise ValueError(
                f"load_state_dict: state is for dims {dims}, this accumulator has {(self.dim_x, self.dim_y)}"
            )
        count = int(state["count"])
        shapes = {
            "mean_x": (self.dim_x,),
            "mean_y": (self.dim_y,),
            "m_xx": (self.dim_x, self.dim_x),
            "m_yx": (self.dim_y, self.dim_x),
            "m_yy": (self.dim_y, self.dim_y),
        }
        tensors = {}
        for k, shape in shapes.items():
            t = state[k]
            if tuple(t.shape) != shape:
                raise ValueError(f"load_state_dict: {k} has shape {tuple(t.shape)}, expected {shape}")
            t = t.to(device=self.device, dtype=_F64)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"load_state_dict: {k} contains NaN or inf; the state is corrupt")
            tensors[k] = t.clone()
        if count < 0:
            raise ValueError(f"load_state_dict: count must be >= 0, got {count}")
        self._assign(count, (tensors["mean_x"], tensors["mean_y"]), (tensors["m_xx"], tensors["m_yx"], tensors["m_yy"]))
        return self

    def __repr__(self) -> str:
        return (
            f"CovarianceAccumulator(dim_x={self.dim_x}, dim_y={self.dim_y}, count={self.count}, "
            f"device={self.device}, precision={self.precision!r})"
        )
