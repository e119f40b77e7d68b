"""The quality ``optimize`` states: held-out perplexity of the compressed model against the dense export.

A parameter count says nothing about what a user loses, and local fit errors do not add up to end-to-end damage
(on Gemma-3-270m every removed unit's stream error was under 1%, together they cost 5x perplexity). So after the
rewrite both graphs run in ONNX Runtime on windows at the end of the calibration text, whose share of the text no
calibration window reads (``calibration.text.split_stream``): the user's own domain, in documents no score or fit
saw. Both go through ``window_perplexity``, the code
``subfit-onnx evaluate`` uses, so the figure means the same thing there and here.
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


@dataclass(frozen=True)
class HeldoutQuality:
    dense_ppl: float
    compressed_ppl: float
    num_windows: int
    window_len: int
    bos: bool
    warn_above: float | None = None

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
                "warn_ppl_ratio": self.warn_above, "warning": self.warned}


def heldout_quality(dense_dir: str | os.PathLike, compressed_dir: str | os.PathLike, windows: np.ndarray,
                    bos: int | None, warn_above: float | None = DEFAULT_WARN_PPL_RATIO,
                    progress: ProgressFactory = silent, dense_ppl: float | None = None) -> HeldoutQuality:
    """Perplexity of both exports on the same held-out ``windows`` (one prefill each, as ``evaluate`` runs them).

    ``dense_ppl`` is the dense export's, when already measured on these windows (a search compares many models).
    """
    cut = TokenWindows(source="calibration text (held out)", windows=windows, stream_tokens=int(windows.size),
                       stride=0, bos=bos)
    if dense_ppl is None:
        dense_ppl = window_perplexity(OnnxDecoder(dense_dir), cut, progress).perplexity
    compressed = window_perplexity(OnnxDecoder(compressed_dir), cut, progress).perplexity
    return HeldoutQuality(dense_ppl, compressed, cut.num_windows, cut.window_len, bos is not None, warn_above)
