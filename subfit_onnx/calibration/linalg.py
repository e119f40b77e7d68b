"""Where calibration's dense linear algebra runs: the statistics' products and the fits' solves.

The math (``stats``, ``fitting``) is numpy and backend-free; a backend only says which library carries it out.
numpy's BLAS stays on one thread while calibrating (``calibrate.single_threaded_blas``), so the PyTorch backend
hands the products and solves to torch's own thread pool instead (``torch_backend.TORCH_LINALG``): measured on 2
cores, a 577 x 577 solve with 576 right-hand sides took 18 ms on numpy's one thread and 10 ms on torch's pool.
``eigh`` is not one of them: it stays numpy's everywhere (``fitting``; torch's took 25 ms against 38 ms), because
LAPACK builds pick eigenvector signs differently, so a low-rank bypass's two factors (not their product) would flip
sign with the library, and torch's flipped some of a format-1 plan's recorded factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TransposedProduct = Callable[[np.ndarray, np.ndarray], np.ndarray]


def numpy_tn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a.T @ b``; with ``b is a`` numpy hands it to BLAS syrk (half the work)."""
    return a.T @ b


def numpy_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a^-1 b``; least squares where ``a`` is singular (a fit with no ridge on collinear inputs)."""
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


@dataclass(frozen=True)
class LinearAlgebra:
    tn: TransposedProduct = numpy_tn  # one batch's X^T X and X^T Y
    solve: Callable[[np.ndarray, np.ndarray], np.ndarray] = numpy_solve  # symmetric positive (semi)definite a
    matmul: Callable[[np.ndarray, np.ndarray], np.ndarray] = np.matmul  # one batch's inputs times weights


NUMPY_LINALG = LinearAlgebra()
