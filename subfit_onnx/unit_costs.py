"""What each attention and FFN unit costs per decoded token, measured on the graph that will be deployed.

A latency budget ("1.3x faster decode") needs each unit's share of a decode step, and that share is not its
share of the parameters: on a small model a decode step is mostly per-node overhead and the KV-cache read, so an
attention (about 85 nodes in an Optimum export, one fused node after the model builder) costs far more than its
weights suggest, and after int4 quantization the FFN weights become cheap to read. So the costs are measured, on
the execution provider, precision and context the user deploys with, in two steps:

1. **How much a kind saves.** The dense graph and two ablations of it, every attention or every FFN replaced by
   a zero bypass of the shape calibration will fit (same rank, same nodes), are timed decoding at ``context``,
   interleaved in one process. ``dense - ablated`` is what removing all units of that kind saves, bypass cost,
   KV read and node overhead included.
2. **How it splits across layers.** One profiled run attributes kernel time to each unit's node scope; each kind's
   measured saving is split in proportion (layers differ: Gemma's global attention at long contexts, say).

With ``quantize`` ("int4", "int8") all three graphs are timed after ``--quantize``'s quantization, against the
dense graph quantized the same way: int4 makes FFN weights cheap to read, so attention and its KV read take a
larger share of a step and the best units to remove for speed change.

The prediction for a plan is then ``1 - sum(saved) / dense step``; reports set it against the rewritten model's
measured decode time, so a wrong cost model shows. Measurements are cached per graph, precision, provider, context
and bypass shape (``$XDG_CACHE_HOME/subfit-onnx/unit-costs``): they take seconds to a minute and do not change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .architectures import UNIT_KINDS, UnitKind
from .bypass import Bypass
from .config import MethodSettings
from .gated_ffn import config_activation, equal_cost_shape
from .names import unit_key
from .progress import ProgressFactory, progress_bar, silent

CACHE_FORMAT = 1
DEFAULT_CONTEXT = 512


@dataclass
class UnitCosts:
    """Measured decode costs of one graph; ``unit_ms`` is what replacing a unit by its bypass saves per token."""

    graph: str
    provider: str
    context: int
    step_ms: float  # dense decode step at ``context``, median of interleaved repeats
    ablated_ms: dict[str, float]  # kind -> step with every unit of that kind bypassed
    unit_ms: dict[str, float]  # unit key ("layers.3.attention") -> ms saved per token
    kv_bytes: dict[str, int]  # unit key -> KV-cache bytes per token it holds (0 for FFNs)
    repeats: int = 0
    steps: int = 0
    profile_shares: dict[str, float] = field(default_factory=dict)  # unit key -> share of its kind's kernel time
    quantize: str | None = None  # the precision the graphs were timed at (None: the export's own)

    def savings(self, what: str) -> dict[tuple[int, UnitKind], float]:
        """Per-unit savings for a budget: ``"latency"`` (ms) or ``"kv"`` (bytes), keyed ``(layer, kind)``.

        The two kinds are timed in separate ablations; on a noisy machine their savings can add up to more than
        the whole step, which no removal achieves, so latency savings are scaled to fit inside it.
        """
        table = self.unit_ms if what == "latency" else self.kv_bytes
        scale = 1.0
        if what == "latency" and sum(table.values()) > self.step_ms > 0:
            scale = self.step_ms / sum(table.values())
        return {_parse_key(k): float(v) * scale for k, v in table.items()}

    def predicted_ratio(self, removed: list[tuple[int, UnitKind]]) -> float:
        """Predicted decode-time ratio (compressed / dense) once ``removed`` are bypassed."""
        saved = sum(self.unit_ms[unit_key(layer, kind)] for layer, kind in removed)
        return max(0.0, 1.0 - saved / self.step_ms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_key(key: str) -> tuple[int, UnitKind]:
    _, layer, kind = key.split(".")
    return int(layer), kind  # type: ignore[return-value]


# ---- the ablation graphs ------------------------------------------------------------------------------------------
def _zero_bypass(hidden: int, rank: int | None, activation: str | None = None) -> Bypass:
    """A bypass of calibration's shape with zero weights: it costs what a fitted one costs and adds nothing.

    With ``activation``, the shape of an FFN bypass that keeps neurons (``ffn_bypass``): the same parameters as a
    d x d map, in three more MatMuls, the activation and a Mul.
    """
    zeros = np.zeros(hidden, dtype=np.float32)
    if activation is not None:
        r, k = equal_cost_shape(hidden)
        z = lambda *shape: np.zeros(shape, dtype=np.float32)
        return Bypass(bias=zeros, down=z(hidden, r), up=z(r, hidden), neuron_gate=z(hidden, k),
                      neuron_up=z(hidden, k), neuron_out=z(k, hidden), activation=activation)
    if rank is None:
        return Bypass(bias=zeros, weight=np.zeros((hidden, hidden), dtype=np.float32))
    return Bypass(bias=zeros, down=np.zeros((hidden, rank), dtype=np.float32),
                  up=np.zeros((rank, hidden), dtype=np.float32))


def _neuron_activation(config: dict[str, Any], method: MethodSettings) -> str | None:
    """The kept neurons' activation when FFN bypasses may keep neurons (timed with them: under ``auto`` that is
    the costlier of the two shapes), else None."""
    from .architectures import family_for
    from .model_config import model_type, text_config

    if not method.refits_ffn_neurons(backend_reads_neurons=True) \
            or not family_for(model_type(config) or "unknown").gated_ffn:
        return None
    return config_activation(text_config(config))


def _ablated_layers(kind: UnitKind, num_layers: int) -> list[int]:
    """Layers whose ``kind`` unit the ablation bypasses: all of them, except one attention (layer 0).

    With no attention left a graph has no KV cache and "decoding" re-reads the whole context every token, which
    is not the cost of a model that keeps some attention; one kept attention keeps the cache and its read.
    """
    return list(range(1, num_layers)) if kind == "attention" else list(range(num_layers))


def _ablated_export(onnx_file: Path, kind: UnitKind | None, method: MethodSettings, out: Path,
                    quantize: str | None = None) -> Path:
    """``out``: the export with the ``_ablated_layers`` of ``kind`` replaced by zero bypasses (the real rewrite),
    quantized as ``--quantize`` would; ``kind=None`` bypasses nothing (the dense reference at that precision)."""
    from .calibration.calibrate import package_versions
    from .exporters.rewrite import rewrite_into
    from .graph_checks import load_decoder_structure
    from .identity import export_identity, structure_facts
    from .plan import Plan, RemovedUnit, bypass_spec, bypass_tensors, sparsity_report

    _, config, structure = load_decoder_structure(onnx_file)
    identity, params = export_identity(config, structure_facts(structure), onnx_file.parent)
    rank = method.rank_for(kind, structure.hidden_size)
    activation = _neuron_activation(config, method) if kind == "mlp" else None
    removed, tensors = [], {}
    for layer in _ablated_layers(kind, structure.num_layers) if kind is not None else []:
        key = unit_key(layer, kind)
        bypass = _zero_bypass(structure.hidden_size, rank, activation)
        tensors.update(bypass_tensors(key, bypass))
        removed.append(RemovedUnit(layer=layer, kind=kind, score=0.0, fit_error=1.0, stream_error=0.0,
                                   params_removed=params[(layer, kind)], bypass=bypass_spec(key, bypass)))
    plan = Plan(model=identity, removed=removed, method=method, versions=package_versions(),
                sparsity=sparsity_report(removed, sum(params.values()), 0.5))
    rewrite_into(onnx_file, plan, tensors, out, quantize=quantize)
    return out


def quantized_dense(onnx_file: str | os.PathLike, quantize: str, out: str | os.PathLike) -> Path:
    """``out``: the dense export quantized exactly as ``--quantize`` quantizes a compressed one (the reference
    a quantized output's speed and quality are read against)."""
    return _ablated_export(Path(onnx_file), None, MethodSettings(), Path(out), quantize)


# ---- timing and profiling -----------------------------------------------------------------------------------------
def _step_ms(decoder: Any, context_ids: np.ndarray, steps: int) -> float:
    from .evaluation.latency import time_decode

    return 1e3 * statistics.median(time_decode(decoder, context_ids, steps))


def _interleaved_step_ms(decoders: dict[str, Any], context_ids: np.ndarray, steps: int, repeats: int,
                         bar: Any) -> dict[str, float]:
    """Median decode step of each decoder, the decoders taken in alternating order each repeat (the machine drifts)."""
    from .evaluation.benchmark import alternating

    samples: dict[str, list[float]] = defaultdict(list)
    for r in range(repeats):
        for name in alternating(list(decoders), r):
            samples[name].append(_step_ms(decoders[name], context_ids, steps))
            bar.update(1)
    return {name: statistics.median(v) for name, v in samples.items()}


def _kernel_us_by_unit(onnx_dir: Path, structure: Any, provider: str, context_ids: np.ndarray,
                       steps: int, scratch: Path) -> dict[str, float]:
    """Kernel time per unit scope over ``steps`` profiled decode steps (the prefill is left out)."""
    from .evaluation.decoder import OnnxDecoder
    from .runtime import ort_session_options

    options = ort_session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(scratch / "decode-profile")
    decoder = OnnxDecoder(onnx_dir, provider, options)
    step = decoder.forward(context_ids)
    nxt = np.asarray([[int(step.logits[0, -1].argmax())]], dtype=np.int64)
    for _ in range(steps):
        decoder.forward(nxt, step.past)
    events = json.loads(Path(decoder.session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    prefill_end = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    scopes = [(u.scope, unit_key(u.layer, u.kind)) for u in structure.units()]
    out: dict[str, float] = defaultdict(float)
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time") or e["ts"] < prefill_end:
            continue
        node = name[: -len("_kernel_time")]
        for scope, key in scopes:
            if node.startswith(scope):
                out[key] += float(e["dur"])
                break
    return dict(out)


def unit_kv_bytes(structure: Any) -> dict[tuple[int, UnitKind], int]:
    """KV-cache bytes per token each unit holds: its layer's share for an attention with a cache, 0 otherwise."""
    kv_layers = structure.kv_layers()
    per_layer = (structure.kv_bytes_per_token() or 0) // max(len(kv_layers), 1)
    return {(u.layer, u.kind): (per_layer if u.kind == "attention" and u.layer in kv_layers else 0)
            for u in structure.units()}


def decode_ratio(dense_dir: str | os.PathLike, compressed_dir: str | os.PathLike, *, provider: str = "cpu",
                 context: int = DEFAULT_CONTEXT, steps: int = 16, repeats: int = 5, quantize: str | None = None,
                 progress: ProgressFactory = silent) -> dict[str, float]:
    """Measured decode step of both graphs at ``context``, interleaved in one process (the machine drifts).

    A ``compressed_dir`` quantized with ``quantize`` is timed against the dense export quantized the same way
    (built here and deleted), so the ratio is what SubFit adds on top of quantization.
    """
    from .evaluation.decoder import OnnxDecoder
    from .evaluation.latency import prompt_ids
    from .names import ONNX_FILE
    from .runtime import ort_session_options
    from .staging import owned_tempdir

    work = owned_tempdir("subfit-decode-ratio-") if quantize is not None else None
    try:
        if work is not None:
            dense_dir = quantized_dense(Path(dense_dir) / ONNX_FILE, quantize, work / "dense")
        decoders = {name: OnnxDecoder(d, provider, ort_session_options())
                    for name, d in (("dense", dense_dir), ("compressed", compressed_dir))}
        ids = prompt_ids(decoders["dense"].vocab_size or 32000, context, seed=4)
        with progress_bar(progress, "timing decode", 2 * repeats) as bar:
            medians = _interleaved_step_ms(decoders, ids, steps, repeats, bar)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    dense, compressed = medians["dense"], medians["compressed"]
    return {"dense_ms": dense, "compressed_ms": compressed, "ratio": compressed / dense, "context": context}


def _cache_path(onnx_file: Path, provider: str, context: int, method: MethodSettings, quantize: str | None) -> Path:
    digest = hashlib.sha256()
    with open(onnx_file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    import onnxruntime

    shape = f"{method.attention_rank.model_dump_json()}|{method.mlp_rank.model_dump_json()}"
    if method.ffn_bypass != "linear":
        shape += f"|{method.ffn_bypass}"
    digest.update(f"|{provider}|{context}|{shape}|{quantize}|{onnxruntime.__version__}|{CACHE_FORMAT}".encode())
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "subfit-onnx" / "unit-costs"
    return root / f"{digest.hexdigest()[:24]}.json"


def measure_unit_costs(onnx_file: str | os.PathLike, method: MethodSettings, *, provider: str = "cpu",
                       context: int = DEFAULT_CONTEXT, steps: int = 16, repeats: int = 5, use_cache: bool = True,
                       quantize: str | None = None, progress: ProgressFactory = silent) -> UnitCosts:
    """Measure (or read from the cache) every unit's decode cost on ``onnx_file``; see the module docstring."""
    from .evaluation.decoder import OnnxDecoder
    from .evaluation.latency import prompt_ids
    from .graph_checks import load_decoder_structure
    from .model_config import config_value
    from .runtime import ort_session_options
    from .staging import owned_tempdir

    onnx_file = Path(onnx_file)
    cache = _cache_path(onnx_file, provider, context, method, quantize) if use_cache else None
    if cache is not None and cache.is_file():
        return UnitCosts(**json.loads(cache.read_text()))
    _, config, structure = load_decoder_structure(onnx_file)
    vocab = int(config_value(config, "vocab_size") or 32000)
    ids = prompt_ids(vocab, context, seed=4)
    kv_bytes = {unit_key(*k): v for k, v in unit_kv_bytes(structure).items()}
    work = owned_tempdir("subfit-unit-costs-")
    try:
        with progress_bar(progress, "measuring unit costs", 4 + repeats * 3) as bar:
            dirs = {"dense": onnx_file.parent}
            if quantize is not None:
                dirs["dense"] = _ablated_export(onnx_file, None, method, work / "dense", quantize)
            bar.update(1)
            for kind in UNIT_KINDS:
                dirs[kind] = _ablated_export(onnx_file, kind, method, work / kind, quantize)
                bar.update(1)
            kernel = _kernel_us_by_unit(dirs["dense"], structure, provider, ids, steps, work)
            bar.update(1)
            decoders = {name: OnnxDecoder(d, provider, ort_session_options()) for name, d in dirs.items()}
            medians = _interleaved_step_ms(decoders, ids, steps, repeats, bar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    unit_ms, shares = {}, {}
    for kind in UNIT_KINDS:
        keys = [unit_key(u.layer, u.kind) for u in structure.units() if u.kind == kind]
        ablated = {unit_key(layer, kind) for layer in _ablated_layers(kind, structure.num_layers)}
        total_kernel = sum(kernel.get(k, 0.0) for k in keys)
        for k in keys:
            shares[k] = kernel.get(k, 0.0) / total_kernel if total_kernel > 0 else 1.0 / len(keys)
        saved = max(medians["dense"] - medians[kind], 0.0)  # by the ablated units together
        ablated_share = sum(shares[k] for k in ablated) or 1.0
        for k in keys:
            unit_ms[k] = saved * shares[k] / ablated_share
    costs = UnitCosts(graph=str(onnx_file), provider=provider, context=context, step_ms=medians["dense"],
                      ablated_ms={k: medians[k] for k in UNIT_KINDS}, unit_ms=unit_ms, kv_bytes=kv_bytes,
                      repeats=repeats, steps=steps, profile_shares=shares, quantize=quantize)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(costs.to_dict(), indent=1))
    return costs
