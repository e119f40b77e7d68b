"""Closed-form bypass fits from sufficient statistics.

A removed unit f becomes ``y ~ x W + b``. Ridge least squares on the float64 normal equations gives the full-rank
map; the best rank-r map under the same (token-weighted) error is the full fit projected on the top-r principal
directions of its own fitted outputs (reduced-rank regression). Both need only ``UnitStats``.
"""

from __future__ import annotations

import numpy as np

from ..bypass import Bypass
from .stats import UnitStats


def _centered(stats: UnitStats) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weighted means of x and y and the centred second moments; the bias then falls out unshrunk."""
    d = stats.dim_in
    wsum = max(float(stats.gram[d, d]), 1e-30)
    mean_x = stats.gram[d, :d] / wsum
    mean_y = stats.cross[d] / wsum
    gram_c = stats.gram[:d, :d] - wsum * np.outer(mean_x, mean_x)
    cross_c = stats.cross[:d] - wsum * np.outer(mean_x, mean_y)
    return mean_x, mean_y, gram_c, cross_c


def _ridge_solve(gram_c: np.ndarray, cross_c: np.ndarray, ridge: float) -> np.ndarray:
    d = gram_c.shape[0]
    scale = max(float(np.trace(gram_c)) / max(d, 1), 1e-12)
    reg = gram_c + ridge * scale * np.eye(d)
    try:
        return np.linalg.solve(reg, cross_c)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(reg, cross_c, rcond=None)[0]


def fit_error(stats: UnitStats, augmented: np.ndarray) -> float:
    """Token-weighted sum of ||y - [x,1] A||^2, from the statistics alone."""
    err = stats.y_energy - 2.0 * float(np.sum(augmented * stats.cross)) + float(
        np.sum(augmented * (stats.gram @ augmented))
    )
    return max(err, 0.0)


def fit_bypass(stats: UnitStats, rank: int | None = None, ridge: float = 1e-4) -> tuple[Bypass, float]:
    """Fit the best bypass of the given rank (None: full rank); returns it and its weighted error.

    The ridge is relative: ``ridge * mean(diag(centred X^T X))`` is added to the diagonal.
    """
    mean_x, mean_y, gram_c, cross_c = _centered(stats)
    weight = _ridge_solve(gram_c, cross_c, ridge)
    if rank is None or rank >= min(stats.dim_in, stats.dim_out):
        bias = mean_y - mean_x @ weight
        return Bypass(weight=weight, bias=bias), fit_error(stats, np.vstack([weight, bias]))
    # Reduced-rank regression: keep the top-r principal directions of the fitted (centred) outputs.
    fitted_cov = weight.T @ gram_c @ weight
    eigvals, eigvecs = np.linalg.eigh((fitted_cov + fitted_cov.T) / 2)
    top = eigvecs[:, np.argsort(eigvals)[::-1][:rank]]
    down = weight @ top
    up = top.T.copy()
    bias = mean_y - mean_x @ down @ up
    return Bypass(down=down, up=up, bias=bias), fit_error(stats, np.vstack([down @ up, bias]))
