"""Latency benchmark of a candidate export against its dense reference, interleaved in one process.

What is measured (medians over ``repeats``; each repeat runs both models, order alternating A-B, B-A, so drift
and neighbours' load on a shared machine hit both alike):
- prefill latency at 128 and 512 prompt tokens (one forward from an empty past);
- per-token decode latency at context 512 (``decode_steps`` single-token forwards after a 512-token prefill);
- generate throughput through ``ORTModelForCausalLM`` set up by ``runtime.load_for_generation`` (tokens/s for
  ``generate_tokens`` new tokens after a ``generate_prompt``-token prompt);
- KV-cache bytes per token and at context 2048, from the graph's KV inputs and dtype (batch 1);
- model file size: ``model.onnx`` plus its external data.
Ratios are candidate / reference for every metric (for tokens/s, above 1 is faster).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..onnx_files import checked_exports, model_file_bytes
from ..progress import ProgressFactory, progress_bar, silent
from ..runtime import load_for_generation, ort_provider, ort_session_options
from .decoder import OnnxDecoder, check_same_vocab
from .latency import prompt_ids, time_decode, time_generate, time_prefill


@dataclass(frozen=True)
class BenchmarkSettings:
    provider: str = "cpu"
    repeats: int = 5
    prefill_lengths: tuple[int, ...] = (128, 512)
    decode_context: int = 512
    decode_steps: int = 16
    generate_prompt: int = 32
    generate_tokens: int = 64
    kv_context: int = 2048


@dataclass
class ModelBenchmark:
    """Static facts and medians for one export; ``samples`` keeps every timing for re-analysis."""

    name: str
    path: str
    file_bytes: int
    kv_layers: list[int]
    kv_dtype: str | None
    kv_bytes_per_token: int
    kv_bytes_at_context: int
    metrics: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class BenchmarkReport:
    settings: BenchmarkSettings
    candidate: ModelBenchmark
    reference: ModelBenchmark | None
    ratios: dict[str, float] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def alternating(items: Sequence[Any], repeat: int) -> list[Any]:
    """Items in order on even repeats and reversed on odd ones (A-B, B-A): position bias cancels in medians."""
    return list(items) if repeat % 2 == 0 else list(reversed(items))


def ratios(candidate: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    return {k: candidate[k] / reference[k] for k in candidate if reference.get(k)}


def _static_facts(decoder: OnnxDecoder, kv_context: int) -> ModelBenchmark:
    sig = decoder.signature
    return ModelBenchmark(
        name=decoder.name, path=str(decoder.model_dir), file_bytes=model_file_bytes(decoder.model_path),
        kv_layers=list(sig.kv_layers), kv_dtype=str(sig.kv_dtype) if sig.kv_dtype is not None else None,
        kv_bytes_per_token=sig.kv_bytes_per_token, kv_bytes_at_context=sig.kv_bytes(kv_context))


def _measure_once(decoder: OnnxDecoder, generator: Any, s: BenchmarkSettings, vocab: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for n in s.prefill_lengths:
        out[f"prefill_{n}_ms"] = [1e3 * time_prefill(decoder, prompt_ids(vocab, n, seed=n))]
    steps = time_decode(decoder, prompt_ids(vocab, s.decode_context, seed=1), s.decode_steps)
    out[f"decode_{s.decode_context}_ms_per_token"] = [1e3 * t for t in steps]
    seconds = time_generate(generator, prompt_ids(vocab, s.generate_prompt, seed=2), s.generate_tokens)
    out["generate_tokens_per_s"] = [s.generate_tokens / seconds]
    return out


def run_benchmark(candidate_dir: str | os.PathLike, reference_dir: str | os.PathLike | None = None,
                  settings: BenchmarkSettings = BenchmarkSettings(), progress: ProgressFactory = silent) -> BenchmarkReport:
    """Measure the candidate (and the reference, interleaved) as described in the module docstring.

    Loads each model twice: a raw ORT session for prefill/decode and ``load_for_generation`` for generate (which
    sets ``torch.set_num_threads(1)`` for the process, as generation should run).
    """
    ort_provider(settings.provider)  # fail early with a clear error when e.g. CUDA is not available
    dirs = [Path(candidate_dir)] + ([Path(reference_dir)] if reference_dir is not None else [])
    checked_exports(*dirs)
    if len(dirs) == 2:
        check_same_vocab(*dirs)
    decoders = [OnnxDecoder(d, settings.provider, ort_session_options()) for d in dirs]
    generators = [load_for_generation(d, settings.provider) for d in dirs]
    vocab = min(d.vocab_size or 32000 for d in decoders)
    results = [_static_facts(d, settings.kv_context) for d in decoders]
    for d, g in zip(decoders, generators):  # warm-up: first runs allocate arenas and are not representative
        _measure_once(d, g, BenchmarkSettings(**{**asdict(settings), "decode_steps": 2, "generate_tokens": 4}), vocab)
    with progress_bar(progress, "benchmark", settings.repeats * len(decoders)) as bar:
        for r in range(settings.repeats):
            for i in alternating(range(len(decoders)), r):
                for key, values in _measure_once(decoders[i], generators[i], settings, vocab).items():
                    results[i].samples.setdefault(key, []).extend(values)
                bar.update(1)
    for res in results:
        res.metrics = {k: statistics.median(v) for k, v in res.samples.items()}
        res.metrics.update(kv_bytes_per_token=float(res.kv_bytes_per_token),
                           kv_bytes_at_context=float(res.kv_bytes_at_context), file_bytes=float(res.file_bytes))
    reference = results[1] if len(results) == 2 else None
    return BenchmarkReport(settings=settings, candidate=results[0], reference=reference,
                           ratios=ratios(results[0].metrics, reference.metrics) if reference else None)

