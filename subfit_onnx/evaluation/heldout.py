"""The quality ``optimize`` states: held-out perplexity of the compressed model against the dense export.

A parameter count says nothing about what a user loses, and local fit errors do not add up to end-to-end damage
(on Gemma-3-270m every removed unit's stream error was under 1%, together they cost 5x perplexity). So after the
rewrite the compressed graph runs in ONNX Runtime on windows at the end of the calibration text, whose share of
the text no calibration window reads (``calibration.text.split_stream``): the user's own domain, in documents no
score or fit saw. The compressed export goes through ``window_perplexity``, the code ``subfit-onnx evaluate``
uses, so the figure means the same thing there and here. The dense export does too, unless the caller already has
its perplexity on these windows: a quality search measures it once, and ``optimize`` takes it from the fp32
PyTorch checkpoint calibration ran (``DENSE_FROM_CHECKPOINT``), which computes what an fp32 export computes (4e-8
apart on SmolLM2) in less time than an ONNX Runtime session takes to load and run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import DEFAULT_WARN_PPL_RATIO
from ..progress import ProgressFactory, silent
from .decoder import OnnxDecoder
from .perplexity import TokenWindows, window_perplexity

DENSE_FROM_EXPORT = "the dense export in ONNX Runtime"
DENSE_FROM_CHECKPOINT = "the fp32 PyTorch checkpoint calibration ran"


@dataclass(frozen=True)
class HeldoutQuality:
    dense_ppl: float
    compressed_ppl: float
    num_windows: int
    window_len: int
    bos: bool
    warn_above: float | None = None
    dense_from: str = DENSE_FROM_EXPORT

    @property
    def ratio(self) -> float:
        return self.compressed_ppl / self.dense_ppl

    @property
    def warned(self) -> bool:
        return self.warn_above is not None and self.ratio > self.warn_above

    def as_report(self) -> dict[str, Any]:
        return {"heldout_ppl_ratio": round(self.ratio, 4), "dense_ppl": round(self.dense_ppl, 4),
                "compressed_ppl": round(self.compressed_ppl, 4), "windows": self.num_windows,
                "window_len": self.window_len, "bos_led": self.bos,
                "text": "the end of the calibration text, which no calibration window reads",
                "dense_measured_on": self.dense_from, "warn_ppl_ratio": self.warn_above, "warning": self.warned}


def heldout_quality(dense_dir: str | os.PathLike, compressed_dir: str | os.PathLike, windows: np.ndarray,
                    bos: int | None, warn_above: float | None = DEFAULT_WARN_PPL_RATIO,
                    progress: ProgressFactory = silent, dense_ppl: float | None = None,
                    dense_from: str = DENSE_FROM_EXPORT) -> HeldoutQuality:
    """Perplexity of the compressed export, and of the dense one unless given, on the same held-out ``windows``
    (one prefill each, as ``evaluate`` runs them).

    ``dense_ppl`` is the dense model's, when already measured on these windows, ``dense_from`` says on what.
    """
    cut = TokenWindows(source="calibration text (held out)", windows=windows, stream_tokens=int(windows.size),
                       stride=0, bos=bos)
    if dense_ppl is None:
        dense_ppl = window_perplexity(OnnxDecoder(dense_dir), cut, progress).perplexity
    compressed = window_perplexity(OnnxDecoder(compressed_dir), cut, progress).perplexity
    return HeldoutQuality(dense_ppl, compressed, cut.num_windows, cut.window_len, bos is not None, warn_above,
                          dense_from)
