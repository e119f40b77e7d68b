"""Closed-form bypass fits from sufficient statistics.

A removed unit f becomes ``y ~ x W + b``. Ridge least squares on the float64 normal equations gives the full-rank
map; the best rank-r map under the same (token-weighted) error is the full fit projected on the top-r principal
directions of its own fitted outputs (reduced-rank regression). Both need only ``UnitStats``.

Every unit is assessed in each pass (about 230 fits for SmolLM2 at the defaults), so the error of a fit comes from
the normal equations it solved rather than from another product with the Gram matrix: with ``(G + s I) W = C``,
``G W = C - s W`` (derivation in ``fit_bypass``).
"""

from __future__ import annotations

import numpy as np

from ..bypass import Bypass
from .linalg import NUMPY_LINALG, LinearAlgebra
from .stats import UnitStats


def centered(stats: UnitStats) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Weighted means of x and y, the centred second moments (the bias then falls out unshrunk), and the centred
    target energy."""
    d = stats.dim_in
    wsum = max(float(stats.gram[d, d]), 1e-30)
    mean_x = stats.gram[d, :d] / wsum
    mean_y = stats.cross[d] / wsum
    gram_c = stats.gram[:d, :d] - wsum * np.outer(mean_x, mean_x)
    cross_c = stats.cross[:d] - wsum * np.outer(mean_x, mean_y)
    return mean_x, mean_y, gram_c, cross_c, stats.y_energy - wsum * float(mean_y @ mean_y)


def _ridge_solve(gram_c: np.ndarray, cross_c: np.ndarray, ridge: float,
                 linalg: LinearAlgebra) -> tuple[np.ndarray, float]:
    """The ridge solution and the shift ``s`` added to the diagonal."""
    d = gram_c.shape[0]
    shift = ridge * max(float(np.trace(gram_c)) / max(d, 1), 1e-12)
    return linalg.solve(gram_c + shift * np.eye(d), cross_c), shift


def fit_bypass(stats: UnitStats, rank: int | None = None, ridge: float = 1e-4,
               linalg: LinearAlgebra = NUMPY_LINALG) -> tuple[Bypass, float]:
    """Fit the best bypass of the given rank (None: full rank); returns it and its weighted error.

    The ridge is relative: ``ridge * mean(diag(centred X^T X))`` is added to the diagonal.

    The errors, with centred ``G``, ``C``, the centred target energy ``E`` and the bias fitted to each map:
    ``err(W) = E - 2<W, C> + <W, G W>``. For the full fit ``G W = C - s W``, so ``err = E - <W, C> - s |W|^2``.
    For the rank-r fit ``W P`` (``P = V V^T``, V the top-r eigenvectors of ``M = W^T G W``):
    ``<WP, G WP> = tr(V^T M V)`` (the top-r eigenvalues) and ``<WP, C> = tr(V^T M V) + s |W V|^2``, so
    ``err = E - sum(top eigenvalues) - 2 s |W V|^2``.
    """
    mean_x, mean_y, gram_c, cross_c, energy = centered(stats)
    weight, shift = _ridge_solve(gram_c, cross_c, ridge, linalg)
    if rank is None or rank >= min(stats.dim_in, stats.dim_out):
        bias = mean_y - mean_x @ weight
        err = energy - float(np.sum(weight * cross_c)) - shift * float(np.sum(weight * weight))
        return Bypass(weight=weight, bias=bias), max(err, 0.0)
    # Reduced-rank regression: keep the top-r principal directions of the fitted (centred) outputs.
    fitted_cov = weight.T @ (cross_c - shift * weight)
    # numpy's eigh whatever the backend: the factors' signs must not depend on the LAPACK build (``linalg``)
    eigvals, eigvecs = np.linalg.eigh((fitted_cov + fitted_cov.T) / 2)
    order = np.argsort(eigvals)[::-1][:rank]
    top = eigvecs[:, order]
    down = weight @ top
    up = top.T.copy()
    bias = mean_y - mean_x @ down @ up
    err = energy - float(eigvals[order].sum()) - 2.0 * shift * float(np.sum(down * down))
    return Bypass(down=down, up=up, bias=bias), max(err, 0.0)
