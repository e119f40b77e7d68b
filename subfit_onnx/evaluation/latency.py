"""Timing primitives for one model: prefill, per-token decode, generate throughput.

Each function times one thing once and returns seconds (or a list of per-step seconds); repetition, medians and
the interleaving of reference and candidate live in ``benchmark.py``, so that every comparison is made side by
side in one process, where the noise of a shared machine hits both models alike.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .decoder import OnnxDecoder

FIRST_ORDINARY_ID = 100  # skip the special tokens that usually sit at the low ids


def prompt_ids(vocab_size: int, length: int, seed: int = 0) -> np.ndarray:
    """Deterministic ordinary token ids, shape (1, length): latency does not depend on which tokens they are."""
    rng = np.random.default_rng(seed)
    low = min(FIRST_ORDINARY_ID, max(vocab_size // 2, 1))
    return rng.integers(low, vocab_size, size=(1, length), dtype=np.int64)


def time_prefill(decoder: OnnxDecoder, ids: np.ndarray) -> float:
    """Seconds for one forward over ``ids`` from an empty past (logits and present included)."""
    t0 = time.perf_counter()
    decoder.forward(ids)
    return time.perf_counter() - t0


def time_decode(decoder: OnnxDecoder, context: np.ndarray, steps: int) -> list[float]:
    """Seconds of each of ``steps`` single-token forwards after an untimed prefill of ``context``.

    Without KV inputs each "step" re-runs the whole sequence, which is what decoding such a model costs.
    """
    step = decoder.forward(context)
    tokens = context[0].tolist()
    times = []
    for _ in range(steps):
        nxt = int(step.logits[0, -1].argmax())
        tokens.append(nxt)
        t0 = time.perf_counter()
        if decoder.signature.has_kv:
            step = decoder.forward(np.asarray([[nxt]], dtype=np.int64), step.past)
        else:
            step = decoder.forward(np.asarray([tokens], dtype=np.int64))
        times.append(time.perf_counter() - t0)
    return times


def time_generate(model: Any, ids: np.ndarray, new_tokens: int, *, force_with_min_new_tokens: bool = False) -> float:
    """Seconds for ``model.generate`` (an ``ORTModelForCausalLM``) to produce exactly ``new_tokens`` tokens.

    The length is forced by ``eos_token_id=None`` (generation cannot stop early) rather than ``min_new_tokens``,
    whose logits processor is one of the slow defaults; ``force_with_min_new_tokens`` measures that default.
    """
    import torch

    prompt = torch.as_tensor(ids, dtype=torch.long)
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(prompt), "max_new_tokens": new_tokens,
                              "do_sample": False}
    if force_with_min_new_tokens:
        kwargs["min_new_tokens"] = new_tokens
    else:
        kwargs["eos_token_id"] = None
    kwargs["pad_token_id"] = model.generation_config.pad_token_id or 0
    t0 = time.perf_counter()
    out = model.generate(prompt, **kwargs)
    elapsed = time.perf_counter() - t0
    produced = out.shape[1] - prompt.shape[1]
    if produced != new_tokens:
        raise RuntimeError(f"generate produced {produced} tokens instead of {new_tokens}")
    return elapsed
