"""Log-probabilities of given tokens under a model, computed from ORT logits in NumPy.

Shared by perplexity, multiple choice and the lm-eval adapter so that all three score tokens the same way.
A context prefill is cached because multiple-choice questions score several continuations after one context.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .decoder import OnnxDecoder, Past


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target_i | logits_i) for rows of ``logits`` (seq, vocab), in float64, via a shifted log-sum-exp."""
    logits = np.asarray(logits, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int64)
    top = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(axis=-1, dtype=np.float64)) + top[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked.astype(np.float64) - lse


class ContinuationScorer:
    """Per-token log-probs of a continuation after a context, reusing the last context's prefill.

    With a KV cache the context runs once and each continuation runs on top of its past; a graph without KV
    inputs (every attention removed) runs context + continuation as one sequence instead.
    """

    def __init__(self, decoder: OnnxDecoder, max_length: int | None = None, chunk: int = 512):
        self.decoder = decoder
        self.max_length = max_length
        self.chunk = chunk  # continuation tokens per forward: bounds the (tokens x vocab) logits held at once
        self._key: tuple[int, ...] | None = None
        self._last: np.ndarray | None = None
        self._past: Past | None = None

    def _prefill(self, context: tuple[int, ...]) -> tuple[np.ndarray, Past]:
        """Last-position logits and past after ``context``, run in chunks; cached for the next call."""
        if context != self._key:
            past = None
            for start in range(0, len(context), self.chunk):
                step = self.decoder.forward(np.asarray([context[start : start + self.chunk]], dtype=np.int64), past)
                past = step.past
            self._key, self._last, self._past = context, step.logits[0, -1], past
        return self._last, self._past  # type: ignore[return-value]

    def score(self, context: Sequence[int], continuation: Sequence[int]) -> tuple[np.ndarray, bool]:
        """(log-prob of each continuation token, whether greedy decoding would produce it)."""
        cont = list(continuation)
        if not cont:
            return np.zeros(0), True
        ctx = list(context)
        if not ctx:
            raise ValueError("a continuation needs at least one context token (pass a BOS/EOS prefix)")
        if self.max_length and len(ctx) + len(cont) - 1 > self.max_length:
            # the model reads ctx + cont[:-1]; keep its last max_length tokens (lm-eval's HF model does the same),
            # with at least one context token, dropping leading continuation tokens only if they cannot fit
            full = (ctx + cont)[-(self.max_length + 1):]
            n_ctx = max(len(full) - len(cont), 1)
            ctx, cont = full[:n_ctx], full[n_ctx:]
        if self.decoder.signature.has_kv:
            return self._score_with_past(tuple(ctx), cont)
        logits = self.decoder.forward(np.asarray([ctx + cont], dtype=np.int64)).logits[0, len(ctx) - 1 : -1]
        targets = np.asarray(cont, dtype=np.int64)
        return token_logprobs(logits, targets), bool((logits.argmax(axis=-1) == targets).all())

    def _score_with_past(self, ctx: tuple[int, ...], cont: list[int]) -> tuple[np.ndarray, bool]:
        last, past = self._prefill(ctx)
        lps = [token_logprobs(last[None, :], np.asarray(cont[:1]))]
        greedy = int(last.argmax()) == cont[0]
        for start in range(0, len(cont) - 1, self.chunk):  # feed cont[:-1]; row i predicts cont[i + 1]
            feed = cont[start : min(start + self.chunk, len(cont) - 1)]
            step = self.decoder.forward(np.asarray([feed], dtype=np.int64), past)
            past = step.past
            targets = np.asarray(cont[start + 1 : start + 1 + len(feed)], dtype=np.int64)
            logits = step.logits[0, : len(targets)]
            lps.append(token_logprobs(logits, targets))
            greedy = greedy and bool((logits.argmax(axis=-1) == targets).all())
        return np.concatenate(lps), greedy
