"""A gated FFN's own neurons, as numpy: what an FFN bypass that keeps a few of them computes.

A gated FFN is ``down(act(x Wg) * (x Wu))``. A removed one may keep k of its neurons beside its linear bypass
(``MethodSettings.ffn_bypass``); calibration, the plan, the PyTorch reference and the ONNX pass then all compute
``act(x Wg[:, K]) * (x Wu[:, K])``, so the activation is named here once, by the names transformers configs use.
Only activations that ONNX builds exactly from standard ops are listed; an FFN with another one keeps the linear
bypass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

GELU_TANH_SCALE = float(np.sqrt(2.0 / np.pi))
GELU_TANH_CUBIC = 0.044715


def silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x) written with tanh, which does not overflow for large negative x
    return 0.5 * x * (1.0 + np.tanh(0.5 * x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(GELU_TANH_SCALE * (x + GELU_TANH_CUBIC * x * x * x)))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"silu": silu, "gelu_pytorch_tanh": gelu_tanh}
ACTIVATION_ALIASES = {"swish": "silu", "gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh"}


def equal_cost_shape(hidden: int) -> tuple[int, int]:
    """(rank, neurons) of a bypass with neurons that costs what a d x d bypass costs: ``2 d r + 3 d k = d^2`` at
    r = d/8 and k = d/4."""
    return max(1, hidden // 8), max(1, hidden // 4)


def config_activation(config: object) -> str | None:
    """The FFN activation a transformers config names (a config object or its config.json dict), canonical."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return activation_name(get("hidden_activation") or get("hidden_act"))


def activation_name(name: str | None) -> str | None:
    """The canonical name of a config's activation, or None when SubFit cannot compute it in ONNX."""
    if name is None:
        return None
    name = ACTIVATION_ALIASES.get(name, name)
    return name if name in ACTIVATIONS else None


Matmul = Callable[[np.ndarray, np.ndarray], np.ndarray]


def neuron_activations(x: np.ndarray, gate: np.ndarray, up: np.ndarray, activation: str,
                       matmul: Matmul = np.matmul) -> np.ndarray:
    """``act(x gate) * (x up)`` in the dtype of ``x``; ``matmul`` is where the products run (calibration hands
    them to torch's thread pool, ``calibration.linalg``)."""
    return ACTIVATIONS[activation](matmul(x, gate.astype(x.dtype, copy=False))) \
        * matmul(x, up.astype(x.dtype, copy=False))


@dataclass(frozen=True)
class GatedFFN:
    """One FFN's gate and up projections (``d x d_ff``, float32) and how much each neuron's output weighs.

    ``out_weight[j]`` is ``|Wd_j|^2``, the squared norm of neuron j's row of the down projection: with
    ``E[a_j^2]`` it says how much neuron j adds to the FFN's output.
    """

    gate: np.ndarray
    up: np.ndarray
    out_weight: np.ndarray
    activation: str

    def activations(self, x: np.ndarray, matmul: Matmul = np.matmul) -> np.ndarray:
        return neuron_activations(x, self.gate, self.up, self.activation, matmul)
