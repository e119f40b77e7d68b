"""A fitted bypass: what calibration hands to the plan, the PyTorch reference and the ONNX pass.

Kept apart from the fitting math so the ONNX passes and the plan can use the type without importing calibration.
A bypass is linear, except that a removed gated FFN may keep k of its own neurons beside a low-rank linear part
(``MethodSettings.ffn_bypass``; ``gated_ffn``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gated_ffn import neuron_activations


@dataclass
class Bypass:
    """``y = x @ down @ up + bias`` (low rank), ``x @ weight + bias`` (full) or ``bias`` alone (constant).

    ``neurons``: the low-rank or full map plus ``act(x @ neuron_gate) * (x @ neuron_up) @ neuron_out``, k kept
    neurons of a gated FFN (``neuron_gate`` and ``neuron_up`` are d x k, ``neuron_out`` k x d).
    """

    bias: np.ndarray
    weight: np.ndarray | None = None
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    neuron_gate: np.ndarray | None = None
    neuron_up: np.ndarray | None = None
    neuron_out: np.ndarray | None = None
    activation: str | None = None

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[1])

    @property
    def neurons(self) -> int:
        return 0 if self.neuron_out is None else int(self.neuron_out.shape[0])

    @property
    def form(self) -> str:
        if self.neuron_out is not None:
            return "neurons"
        return "full" if self.weight is not None else ("lowrank" if self.down is not None else "constant")

    def dense(self) -> np.ndarray:
        """The effective d_in x d_out matrix (of the linear part, for a bypass with neurons)."""
        if self.weight is not None:
            return self.weight
        if self.down is not None and self.up is not None:
            return self.down @ self.up
        raise ValueError("a constant bypass has no matrix")

    @property
    def num_params(self) -> int:
        arrays = [a for a in (self.weight, self.down, self.up, self.bias, self.neuron_gate, self.neuron_up,
                              self.neuron_out) if a is not None]
        return int(sum(a.size for a in arrays))

    def apply(self, x: np.ndarray, dtype: type = np.float64) -> np.ndarray:
        """The bypass on ``x``, computed in ``dtype`` (float32: what the deployed graph computes, and faster)."""
        x = np.asarray(x, dtype=dtype)
        cast = lambda a: np.asarray(a, dtype=dtype)
        if self.weight is not None:
            out = x @ cast(self.weight)
        elif self.down is not None and self.up is not None:
            out = (x @ cast(self.down)) @ cast(self.up)
        else:
            out = np.zeros(x.shape[:-1] + (self.bias.shape[0],), dtype=dtype)
        if self.neuron_out is not None:
            assert self.neuron_gate is not None and self.neuron_up is not None and self.activation is not None
            out = out + neuron_activations(x, self.neuron_gate, self.neuron_up, self.activation) @ cast(self.neuron_out)
        return out + cast(self.bias)
