"""Perplexity of an ONNX export over fixed token windows, identical for dense and compressed models.

Windows: ``num_windows`` windows of ``window_len`` tokens (default 48 x 256, the PyTorch yardstick used by
``benchmarks/method_variants.py``), spread evenly over the whole token stream by
``calibration.text.token_windows``, so the copy-heavy tail of wiki.utf8 counts as much as its head. The stride
between window starts is therefore ``(tokens - window_len) // (num_windows - 1)`` and is reported. Each window
is scored on its own from its first token (empty past, no overlap carried in): ``window_len - 1`` predictions
per window. Windows are cut as deployed: when the tokenizer adds BOS (Gemma, Llama-3), each window is BOS plus
``window_len - 1`` text tokens and only the predictions after BOS count (BOS itself is never a target); when it
adds none (SmolLM2), windows are plain text. The text is tokenized once, with the candidate's tokenizer, and the
same windows go to the reference, so ratios compare like with like.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..calibration.text import leading_bos, load_documents, token_windows, tokenize_documents, window_stride
from ..errors import SubFitError
from ..progress import ProgressFactory, progress_bar, silent
from .decoder import OnnxDecoder
from .logprobs import token_logprobs

DEFAULT_WINDOWS = 48
DEFAULT_WINDOW_LEN = 256


@dataclass(frozen=True)
class TokenWindows:
    """Evaluation windows and how they were cut, so reports can state them."""

    source: str
    windows: np.ndarray  # (num_windows, window_len) int64
    stream_tokens: int
    stride: int
    bos: int | None = None  # the BOS id every window starts with, None when the tokenizer adds none

    @property
    def num_windows(self) -> int:
        return int(self.windows.shape[0])

    @property
    def window_len(self) -> int:
        return int(self.windows.shape[1])


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    scored_tokens: int
    num_windows: int
    window_len: int
    stride: int
    source: str
    bos: bool = False  # windows started with BOS (not itself scored)


def make_windows(tokenizer, source: str | os.PathLike, num_windows: int = DEFAULT_WINDOWS,
                 window_len: int = DEFAULT_WINDOW_LEN) -> TokenWindows:
    """Tokenize ``source`` (file, folder or dataset spec, see ``calibration.text``) and cut evaluation windows."""
    bos = leading_bos(tokenizer)
    try:
        stream = tokenize_documents(tokenizer, load_documents(source))
        windows = token_windows(stream, num_windows, window_len, bos)
    except SubFitError as exc:  # calibration wording ("calibration source") would confuse an evaluation user
        raise SubFitError(str(exc).replace("calibration ", "evaluation ").replace("--num-samples/--seq-len",
                                                                                  "--windows/--window-len")) from None
    stride = window_stride(stream.size, num_windows, window_len - (bos is not None))
    name = str(Path(source).name) if Path(source).exists() else str(source)
    return TokenWindows(source=name, windows=windows, stream_tokens=int(stream.size), stride=int(stride), bos=bos)


def window_perplexity(decoder: OnnxDecoder, windows: TokenWindows, progress: ProgressFactory = silent) -> PerplexityResult:
    """exp(mean next-token NLL) over every window, each run as one prefill with an empty past."""
    if decoder.vocab_size and int(windows.windows.max()) >= decoder.vocab_size:
        raise SubFitError(f"token ids exceed the vocabulary of {decoder.model_dir}; tokenize with its own tokenizer")
    nll, count = 0.0, 0
    with progress_bar(progress, f"perplexity {decoder.name}", windows.num_windows) as bar:
        for window in windows.windows:
            logits = decoder.forward(window[None, :]).logits[0, :-1]
            lp = token_logprobs(logits, window[1:])
            nll -= float(lp.sum())
            count += lp.size
            bar.update(1)
    mean = nll / count
    return PerplexityResult(perplexity=math.exp(mean), mean_nll=mean, scored_tokens=count,
                            num_windows=windows.num_windows, window_len=windows.window_len,
                            stride=windows.stride, source=windows.source, bos=windows.bos is not None)
