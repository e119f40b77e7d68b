"""A fitted linear bypass: what calibration hands to the plan, the PyTorch reference and the ONNX pass.

Kept apart from the fitting math so the ONNX passes and the plan can use the type without importing calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Bypass:
    """``y = x @ down @ up + bias`` (low rank), ``x @ weight + bias`` (full) or ``bias`` alone (constant)."""

    bias: np.ndarray
    weight: np.ndarray | None = None
    down: np.ndarray | None = None
    up: np.ndarray | None = None

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[1])

    @property
    def form(self) -> str:
        return "full" if self.weight is not None else ("lowrank" if self.down is not None else "constant")

    def dense(self) -> np.ndarray:
        """The effective d_in x d_out matrix."""
        if self.weight is not None:
            return self.weight
        if self.down is not None and self.up is not None:
            return self.down @ self.up
        raise ValueError("a constant bypass has no matrix")

    @property
    def num_params(self) -> int:
        arrays = [a for a in (self.weight, self.down, self.up, self.bias) if a is not None]
        return int(sum(a.size for a in arrays))

    def apply(self, x: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """The bypass on ``x``, computed in ``dtype`` (float32: what the deployed graph computes, and faster)."""
        out = np.asarray(x, dtype=dtype)
        cast = lambda a: np.asarray(a, dtype=dtype)
        if self.weight is not None:
            out = out @ cast(self.weight)
        elif self.down is not None and self.up is not None:
            out = (out @ cast(self.down)) @ cast(self.up)
        else:
            out = np.zeros(out.shape[:-1] + (self.bias.shape[0],), dtype=dtype)
        return out + cast(self.bias)
