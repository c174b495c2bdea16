"""Test helpers: data generators and float64 numpy oracles (independent of nbl_ext)."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def make_xy(
    n: int, dx: int, dy: int, *, gen: torch.Generator, dtype=torch.float32, massive: float = 0.0, noise: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated random (x, y) with non-zero means; `massive` adds channels with mean ~massive."""
    mean = torch.randn(dx, generator=gen, dtype=torch.float64) * 3.0
    if massive:
        mean[: max(1, dx // 8)] = massive * (1.0 + torch.rand(max(1, dx // 8), generator=gen, dtype=torch.float64))
    scale = 0.5 + torch.rand(dx, generator=gen, dtype=torch.float64)
    x = torch.randn(n, dx, generator=gen, dtype=torch.float64) * scale + mean
    a = torch.randn(dx, dy, generator=gen, dtype=torch.float64) / dx**0.5
    y = (x - mean) @ a + noise * torch.randn(n, dy, generator=gen, dtype=torch.float64) + 1.5
    return x.to(dtype), y.to(dtype)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def np_stats(x: torch.Tensor, y: torch.Tensor) -> dict[str, np.ndarray]:
    """Float64 means and unbiased covariances by numpy (two-pass)."""
    xn, yn = np64(x).reshape(-1, x.shape[-1]), np64(y).reshape(-1, y.shape[-1])
    full = np.cov(np.concatenate([xn, yn], axis=1), rowvar=False, ddof=1)
    dx = xn.shape[1]
    return {
        "mean_x": xn.mean(0),
        "mean_y": yn.mean(0),
        "cov_xx": full[:dx, :dx],
        "cov_yx": full[dx:, :dx],
        "cov_yy": full[dx:, dx:],
    }


def np_lstsq(x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Affine least squares y ~ W x + b by scipy (float64)."""
    xn, yn = np64(x), np64(y)
    design = np.concatenate([xn, np.ones((xn.shape[0], 1))], axis=1)
    coef, *_ = scipy.linalg.lstsq(design, yn)
    return coef[:-1].T, coef[-1]


def np_cca(cov_xx: np.ndarray, cov_yx: np.ndarray, cov_yy: np.ndarray) -> np.ndarray:
    """Canonical correlations via Cholesky whitening (full-rank inputs only)."""
    lx = scipy.linalg.cholesky(cov_xx, lower=True)
    ly = scipy.linalg.cholesky(cov_yy, lower=True)
    t = scipy.linalg.solve_triangular(ly, scipy.linalg.solve_triangular(lx, cov_yx.T, lower=True).T, lower=True)
    return np.sort(scipy.linalg.svdvals(t))[::-1]


def rel_err(got, want) -> float:
    got = np64(got) if isinstance(got, torch.Tensor) else np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))
