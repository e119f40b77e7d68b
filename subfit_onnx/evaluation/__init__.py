"""Evaluation and benchmarking of ONNX decoder exports (dense or SubFit-rewritten), run with ONNX Runtime.

Modules, one job each: ``signature`` (what the graph takes; KV layout and bytes), ``decoder`` (the ORT session
fed by name), ``logprobs`` (token log-probabilities), ``perplexity``, ``multiple_choice``, ``evaluate`` (both, vs a
reference), ``latency`` / ``benchmark`` (timings, interleaved), ``runtimes`` (tokens/s per runtime), ``report``
(tables), ``lm_eval_model`` (the lm-eval ``subfit-ort`` model; needs the ``eval`` extra). File sizes come from
``subfit_onnx.onnx_files``.
Names below are imported on first use, so ``import subfit_onnx.evaluation`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BenchmarkReport": "benchmark", "BenchmarkSettings": "benchmark", "run_benchmark": "benchmark",
    "OnnxDecoder": "decoder", "evaluate_export": "evaluate",
    "MCItem": "multiple_choice", "MCResult": "multiple_choice", "evaluate_mc": "multiple_choice",
    "load_mc_items": "multiple_choice", "PerplexityResult": "perplexity", "TokenWindows": "perplexity",
    "make_windows": "perplexity", "window_perplexity": "perplexity", "RUNTIMES": "runtimes",
    "benchmark_runtimes": "runtimes", "DecoderSignature": "signature", "KVLayer": "signature",
    "read_signature": "signature",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
