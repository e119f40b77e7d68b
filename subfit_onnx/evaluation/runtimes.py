"""Generation throughput (tokens/s) of each way to run an export: why ``load_for_generation`` exists.

Runtimes compared, each producing exactly ``new_tokens`` greedy tokens after the same ``prompt_tokens``:
- ``ort-loop``: the hand-written loop of ``OnnxDecoder.greedy`` (raw session, KV fed back by name);
- ``optimum-default``: ``ORTModelForCausalLM.from_pretrained`` as shipped, torch's default thread count, length
  forced with ``min_new_tokens`` (how a generate benchmark is usually written);
- ``optimum-tuned``: ``runtime.load_for_generation`` (torch 1 thread, no ORT spinning, no ``min_new_tokens``);
- ``genai``: onnxruntime-genai with the ``genai_config.json`` of ``runtime_genai`` (skipped when not installed).
For each runtime both models are loaded, then timed interleaved (A-B, B-A) for ``repeats`` rounds; the ratio
candidate / reference of tokens/s is the speed-up that runtime delivers. A runtime that fails records its error.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SubFitError
from ..model_config import config_value, read_config
from ..names import ONNX_FILE
from ..onnx_files import checked_exports, export_paths
from ..progress import ProgressFactory, progress_bar, silent
from ..runtime import (
    load_for_generation,
    ort_provider,
    set_torch_threads,
    torch_default_threads,
)
from .benchmark import alternating
from .decoder import OnnxDecoder
from .latency import prompt_ids, time_generate

RUNTIMES = ("ort-loop", "optimum-default", "optimum-tuned", "genai")


@dataclass
class RuntimeResult:
    runtime: str
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # model name -> median tokens/s
    samples: dict[str, list[float]] = field(default_factory=dict)
    ratio: float | None = None  # candidate / reference tokens/s
    error: str | None = None


@dataclass
class RuntimeReport:
    prompt_tokens: int
    new_tokens: int
    repeats: int
    provider: str
    models: list[str]
    results: list[RuntimeResult]
    torch_default_threads: int  # what optimum-default ran with (optimum-tuned: 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Runner:
    """Load one runtime for one model; ``run(ids, n)`` returns seconds for n new tokens."""

    def __init__(self, kind: str, model_dir: Path, provider: str, default_threads: int):
        self.kind, self.model_dir, self.provider = kind, model_dir, provider
        self.torch_threads = default_threads if kind == "optimum-default" else 1
        self._tmp: str | None = None
        self.model = self._load()

    def _load(self) -> Any:
        if self.kind == "ort-loop":
            return OnnxDecoder(self.model_dir, self.provider)
        if self.kind == "optimum-default":
            from optimum.onnxruntime import ORTModelForCausalLM

            from ..runtime import _quiet_optimum

            with _quiet_optimum():
                return ORTModelForCausalLM.from_pretrained(self.model_dir, file_name=ONNX_FILE,
                                                           provider=ort_provider(self.provider))
        if self.kind == "optimum-tuned":
            return load_for_generation(self.model_dir, self.provider, torch_threads=None)
        if self.kind == "genai":
            return self._load_genai()
        raise SubFitError(f"unknown runtime {self.kind!r}; choose from {', '.join(RUNTIMES)}")

    def _load_genai(self) -> Any:
        """onnxruntime-genai on a scratch folder of symlinks plus a generated config: the export is not touched."""
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise SubFitError("onnxruntime-genai is not installed (pip install 'subfit-onnx[genai]')") from None
        from ..names import GENAI_CONFIG_FILE
        from ..runtime_genai import genai_config

        root, _ = export_paths(self.model_dir)
        self._tmp = tempfile.mkdtemp(prefix="subfit-genai-")
        for f in root.iterdir():
            if f.is_file() and f.name != GENAI_CONFIG_FILE:
                os.symlink(f.resolve(), Path(self._tmp) / f.name)
        cfg = genai_config(root, provider=self.provider)
        (Path(self._tmp) / GENAI_CONFIG_FILE).write_text(json.dumps(cfg), encoding="utf-8")
        return og.Model(self._tmp)

    def run(self, ids: np.ndarray, n: int) -> float:
        set_torch_threads(self.torch_threads)
        if self.kind == "ort-loop":
            t0 = time.perf_counter()
            produced = len(self.model.greedy(ids[0].tolist(), n))
            elapsed = time.perf_counter() - t0
            if produced != n:
                raise RuntimeError(f"ort-loop produced {produced} tokens instead of {n}")
            return elapsed
        if self.kind == "genai":
            return self._run_genai(ids, n)
        return time_generate(self.model, ids, n, force_with_min_new_tokens=self.kind == "optimum-default")

    def _run_genai(self, ids: np.ndarray, n: int) -> float:
        t0 = time.perf_counter()
        produced = genai_greedy(self.model, ids, n)
        elapsed = time.perf_counter() - t0
        if produced != n:
            raise RuntimeError(f"genai produced {produced} tokens instead of {n}")
        return elapsed

    def close(self) -> None:
        self.model = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def genai_greedy(model: Any, ids: np.ndarray, n: int) -> int:
    """Generate ``n`` greedy tokens after ``ids`` with an ``onnxruntime_genai.Model``; the count it produced."""
    import onnxruntime_genai as og

    total = ids.shape[1] + n
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return len(gen.get_sequence(0)) - ids.shape[1]


def benchmark_runtimes(candidate_dir: str | os.PathLike, reference_dir: str | os.PathLike | None = None, *,
                       provider: str = "cpu", prompt_tokens: int = 32, new_tokens: int = 64, repeats: int = 3,
                       runtimes: tuple[str, ...] = RUNTIMES, progress: ProgressFactory = silent) -> RuntimeReport:
    """Tokens/s of every runtime for the candidate (and the reference, interleaved); see module docstring."""
    ort_provider(provider)
    dirs = [Path(candidate_dir)] + ([Path(reference_dir)] if reference_dir is not None else [])
    checked_exports(*dirs)
    names = _unique_names(dirs)
    vocab = min(int(config_value(read_config(d, required=True), "vocab_size") or 32000) for d in dirs)
    ids = prompt_ids(vocab, prompt_tokens, seed=3)
    import torch

    before = torch.get_num_threads()  # restored at the end: the runners switch it per runtime
    default_threads = torch_default_threads()
    results = []
    try:
        with progress_bar(progress, "runtimes", len(runtimes) * repeats * len(dirs)) as bar:
            for kind in runtimes:
                results.append(_one_runtime(kind, dirs, names, provider, default_threads, ids, new_tokens, repeats,
                                            bar))
    finally:
        torch.set_num_threads(before)
    return RuntimeReport(prompt_tokens=prompt_tokens, new_tokens=new_tokens, repeats=repeats, provider=provider,
                         models=names, results=results, torch_default_threads=default_threads)


def _one_runtime(kind: str, dirs: list[Path], names: list[str], provider: str, default_threads: int,
                 ids: np.ndarray, n: int, repeats: int, bar: Any) -> RuntimeResult:
    res = RuntimeResult(runtime=kind)
    runners: list[_Runner] = []
    try:
        runners = [_Runner(kind, d, provider, default_threads) for d in dirs]
        for r in runners:  # warm-up
            r.run(ids, min(n, 4))
        for rep in range(repeats):
            for i in alternating(range(len(runners)), rep):
                res.samples.setdefault(names[i], []).append(n / runners[i].run(ids, n))
                bar.update(1)
    except Exception as exc:  # noqa: BLE001 - a runtime that cannot run this export is a result, not a crash
        res.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    finally:
        for r in runners:
            r.close()
    res.tokens_per_s = {k: statistics.median(v) for k, v in res.samples.items() if v}
    if len(names) == 2 and all(k in res.tokens_per_s for k in names):
        res.ratio = res.tokens_per_s[names[0]] / res.tokens_per_s[names[1]]
    return res


def _unique_names(dirs: list[Path]) -> list[str]:
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in dirs]
    return names

