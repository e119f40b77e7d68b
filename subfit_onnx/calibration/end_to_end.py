"""How far a compressed model's last residual stream is from the dense model's, token by token.

Local scores (each unit's bypass error relative to its stream) rank units well on some models and badly on
others: on Gemma-3-270m every unit SubFit removed had a stream error of 0.1-0.6%, yet together they raised
perplexity 5x. What the language-model head sees is the final stream after the final norm, which removes each
token's scale; so the end-to-end damage is measured as the mean over tokens of ``1 - cos(h, h_dense)`` of the
last layer's output. It needs no head and no vocabulary, so both calibration backends compute it the same way.
"""

from __future__ import annotations

import numpy as np


def stream_distance(final: np.ndarray, dense_final: np.ndarray) -> float:
    """Mean over tokens of ``1 - cos`` between two ``[rows, seq, hidden]`` streams (float64 arithmetic)."""
    if final.shape != dense_final.shape:
        raise ValueError(f"stream shapes differ: {final.shape} and {dense_final.shape}")
    total, count = 0.0, 0
    for start in range(0, final.shape[0], 8):
        a = np.asarray(final[start : start + 8], dtype=np.float64)
        b = np.asarray(dense_final[start : start + 8], dtype=np.float64)
        dot = np.einsum("bsd,bsd->bs", a, b)
        norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
        total += float((1.0 - dot / np.maximum(norms, 1e-30)).sum())
        count += dot.size
    return total / max(count, 1)
