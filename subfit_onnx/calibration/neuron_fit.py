"""FFN bypasses that keep a few of the removed gated FFN's own neurons (``MethodSettings.ffn_bypass``).

A linear map cannot follow a gated FFN's nonlinearity: on SmolLM2 at 25% the linear fits of the removed FFNs leave
27-49% of their output unexplained. The bypass with neurons is

    y = (x P) Wx + a_K(x) Wk + b,    a_K(x) = act(x Wg[:, K]) * (x Wu[:, K])

with ``P`` the top-r principal directions of the FFN's input, ``K`` the k neurons with the most output energy
(``E[a_j^2] |Wd_j|^2``), and ``Wx``, ``Wk``, ``b`` one ridge fit on the features ``[x P, a_K]``: the same
closed-form ``fit_bypass``, on the same token weights, as every linear bypass. Rank d/8 with d/4 neurons costs
``2 d r + 3 d k = d^2`` parameters, exactly a d x d bypass, so the sparsity does not move (wiki perplexity ratio at
that cost, ``benchmarks/neuron_bypass.py``: SmolLM2 1.938 -> 1.810 at 25%, Gemma-3-270m 2.241 -> 2.249; the
per-FFN choice by fit error 1.832 and 2.129).

Statistics come from a sweep of the FFN's layer: the neurons' energies from the FFN's own activations as it runs
(``NeuronEnergy``), then the FFN inputs the store keeps (``ActivationStore.mlp_inputs``) and the layer's outputs,
whose difference is the FFN's contribution, in one pass over those stored rows for the features' sums.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..bypass import Bypass
from ..config import TokenWeighting
from ..gated_ffn import GatedFFN, Matmul, neuron_activations
from .fitting import centered, fit_bypass
from .linalg import LinearAlgebra
from .stats import UnitStats, token_weights


@dataclass(frozen=True)
class NeuronFeatures:
    """What a bypass with neurons reads: principal directions of x and kept neurons."""

    basis: np.ndarray  # d x r, orthonormal
    kept: np.ndarray  # neuron indices, most output energy first
    ffn: GatedFFN

    @property
    def gate(self) -> np.ndarray:
        return self.ffn.gate[:, self.kept]

    @property
    def up(self) -> np.ndarray:
        return self.ffn.up[:, self.kept]

    def of(self, x: np.ndarray, matmul: Matmul = np.matmul) -> np.ndarray:
        """``[x P, a_K(x)]`` for [tokens, d] inputs, in float32."""
        x = np.asarray(x, dtype=np.float32)
        return np.concatenate([matmul(x, self.basis.astype(np.float32)),
                               neuron_activations(x, self.gate, self.up, self.ffn.activation, matmul)], axis=-1)

    def bypass(self, fitted: Bypass) -> Bypass:
        """The bypass from a full-rank fit on the features: its first r rows act on ``x P``, the rest on the neurons."""
        assert fitted.weight is not None
        r = self.basis.shape[1]
        return Bypass(bias=fitted.bias, down=self.basis.copy(), up=fitted.weight[:r], neuron_gate=self.gate,
                      neuron_up=self.up, neuron_out=fitted.weight[r:], activation=self.ffn.activation)


def principal_directions(stats: UnitStats, rank: int) -> np.ndarray:
    """The top-``rank`` eigenvectors of x's weighted, centred second moment (from a unit's linear statistics)."""
    cov = centered(stats)[2]
    eigvals, eigvecs = np.linalg.eigh((cov + cov.T) / 2)
    return eigvecs[:, np.argsort(eigvals)[::-1][:rank]]


@dataclass
class StoredRows:
    """One FFN's tokens as its layer's sweep left them: its inputs ``x``, the stream before it ``mid`` and the
    layer's outputs ``out`` (``out - mid`` is what the FFN adds), read in the sweep's batches."""

    x: np.ndarray
    mid: np.ndarray
    out: np.ndarray
    batches: Iterable[slice]

    def parts(self) -> Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(x, mid, y) per batch, float32 [rows, seq, d]."""
        for rows in self.batches:
            x, mid = np.asarray(self.x[rows]), np.asarray(self.mid[rows])
            yield x, mid, np.asarray(self.out[rows]) - mid


@dataclass
class NeuronEnergy:
    """Each neuron's output energy ``sum_t w_t a_tj^2 |Wd_j|^2``, summed from the FFN's own activations while its
    layer runs (``TorchLayerRunner.sweep``): the FFN computes them anyway, and computing ``x Wg`` and ``x Wu``
    again for every token took 3 of the refit's 11 s on SmolLM2 at 25%."""

    weighting: TokenWeighting
    total: np.ndarray | None = None  # sum_t w_t a_tj^2, float64

    def add(self, a: np.ndarray, out_sq: np.ndarray, matmul: Matmul = np.matmul) -> None:
        """One batch: activations ``a`` [tokens, d_ff] and the squared norms [batch, seq] of the layer's outputs."""
        self.add_sums(matmul(self.weights(out_sq)[None], a * a)[0])

    def weights(self, out_sq: np.ndarray) -> np.ndarray:
        """The batch's token weights, flat, in float32 (``out_sq``: as for ``add``)."""
        return token_weights(self.weighting, out_sq.astype(np.float64)).reshape(-1).astype(np.float32)

    def add_sums(self, part: np.ndarray) -> None:
        """One batch's ``sum_t w_t a_tj^2``, computed where the activations are (the backend's own tensors)."""
        part = np.asarray(part, dtype=np.float64)
        self.total = part if self.total is None else self.total + part

    def of(self, ffn: GatedFFN) -> np.ndarray:
        assert self.total is not None, "no batch was added"
        return self.total * ffn.out_weight


def choose_features(linear: UnitStats, energy: np.ndarray, ffn: GatedFFN, rank: int, neurons: int) -> NeuronFeatures:
    """The principal directions of x (from the unit's linear statistics) and the ``neurons`` with the most
    ``energy``."""
    kept = np.argsort(energy, kind="stable")[::-1][:neurons]
    return NeuronFeatures(basis=principal_directions(linear, rank), kept=kept, ffn=ffn)


def feature_stats(features: NeuronFeatures, rows: StoredRows, linear: UnitStats, linalg: LinearAlgebra) -> UnitStats:
    """Sufficient statistics of the features and the FFN's contribution, weighted as ``linear`` is."""
    dim = features.basis.shape[1] + len(features.kept)
    stats = UnitStats(dim, linear.dim_out, linear.weighting, products=linalg.tn)
    for x, mid, y in rows.parts():
        stats.update(features.of(x.reshape(-1, x.shape[-1]), linalg.matmul).reshape(*x.shape[:-1], dim), y, mid)
    return stats


def fit_neurons(features: NeuronFeatures, stats: UnitStats, ridge: float,
                linalg: LinearAlgebra) -> tuple[Bypass, float]:
    """The bypass with neurons and its weighted error (as ``fit_bypass`` reports it)."""
    fitted, err = fit_bypass(stats, rank=None, ridge=ridge, linalg=linalg)
    return features.bypass(fitted), err
