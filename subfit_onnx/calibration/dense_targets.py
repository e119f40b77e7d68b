"""The dense model's residual stream, advanced beside the compressed one (``target="dense_stream"``).

Backend-neutral (numpy memmaps only), so the PyTorch and ONNX Runtime runners share it: each runner's
``dense_sweep`` writes the dense stream after the attention and after the whole layer, and ``batch`` hands the
fit targets to ``UnitStats.update``.
"""

from __future__ import annotations

import numpy as np

from ..architectures import UnitKind
from .activations import ActivationStore


class DenseTargets:
    """The dense model's stream, advanced beside the compressed one, for fits that restore it."""

    def __init__(self, compressed: ActivationStore) -> None:
        n, seq, hidden = compressed.shape
        self.store = ActivationStore(n, seq, hidden, compressed.workdir)
        self.store.current[:] = compressed.current
        self.after_attention = self.store.extra("mid")

    def batch(self, rows: slice) -> dict[UnitKind, np.ndarray]:
        return {"attention": np.asarray(self.after_attention[rows], dtype=np.float64),
                "mlp": np.asarray(self.store.next[rows], dtype=np.float64)}

    def close(self) -> None:
        del self.after_attention
        self.store.close()
