"""ONNX Runtime calibration backend: calibrate from an Optimum export alone, no PyTorch checkpoint and no torch.

``OrtLayerRunner`` implements ``LayerRunner`` the way ``TorchLayerRunner`` does, so ``run_calibration`` (scoring,
selection, fitting) is shared. The export is loaded once into a private in-memory copy (the user's file is only
read) and cut per layer (``onnx_cut``): a prelude computes the embeddings ``B_0`` and the values every layer
shares (RoPE tables, causal mask), and each layer runs as its own small session from the residual stream at its
boundary, read from and written to the ``ActivationStore``, with each unit's bypass input and contribution as
extra outputs. One sweep is therefore one layer's share of a forward pass. Pass 2 runs each layer as two cuts that
meet at the FFN's residual Add (``GraphCutter.half``), so the attention is decided before the FFN runs, as on the
PyTorch backend. Measured on SmolLM2 at 25%, the whole calibration takes about 1.5x the PyTorch backend's time
(76 s against 52 s): ONNX Runtime runs the cut layers slower than PyTorch runs the modules, every bypass tried is a
new session, and the statistics run on one BLAS thread. The private copy drops the softmax NaN guards, which a
calibration prefill never needs (``DropSoftmaxNanGuardPass``).

Installing a bypass applies ``InsertBypassPass`` to the private copy, the same rewrite the final export gets, and
re-cuts only that layer, so later layers are measured on the compressed upstream as the deployed graph computes
it (fp16 exports included: the bypass runs in the graph's own dtype). Statistics are float64 whatever the graph
dtype, and bypass tensors leave as float32 in the plan. FFN bypasses that keep neurons read the FFN's matrices from
the graph and its neurons from a tap on each layer's cut (``onnx_ffn``), as the PyTorch backend reads the module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import ShapeInferencePass

from ..architectures import UnitKind
from ..bypass import Bypass
from ..config import SubFitConfig
from ..errors import SubFitError
from ..gated_ffn import GatedFFN
from ..graph_checks import load_onnx, require_dense
from ..identity import export_identity, structure_facts
from ..model_config import config_value, model_type, read_config
from ..onnx_files import export_file
from ..passes.builder_unfuse import UnfuseSkipNormsPass, WidenSlidingWindowsPass
from ..passes.bypass import InsertBypassPass, bypass_initializer_name
from ..passes.nan_guard import DropSoftmaxNanGuardPass
from ..passes.structure import BYPASS_SCOPE, DecoderStructure, UnitBoundary, find_decoder_structure
from ..progress import ProgressFactory, progress_bar, silent
from .activations import ActivationStore
from .budget import Budget
from .calibrate import CalibrationResult, DensePass, run_calibration
from .dense_targets import DenseTargets
from .neuron_fit import NeuronEnergy
from .onnx_cut import NEURON_TAP, GraphCutter, LayerGraph, extract_model
from .onnx_ffn import (
    GraphFFN,
    activation_probe,
    column_probes,
    find_gated_ffn,
    identify_activation,
    read_columns,
)
from .onnx_session import SessionFactory, prefill_inputs
from .runner import RowBatches
from .stats import AnyStats, Weightings

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}




def check_tokens(tokens: np.ndarray, vocab: int | None) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 2 or not np.issubdtype(arr.dtype, np.integer):
        raise SubFitError(f"calibration tokens must be an integer array [samples, seq_len >= 2], got {arr.dtype} "
                          f"{list(arr.shape)}")
    if arr.min() < 0 or (vocab is not None and arr.max() >= vocab):
        raise SubFitError(f"calibration token ids must lie in [0, {vocab}); tokenize with the export's own tokenizer")
    return arr.astype(np.int64, copy=False)


@dataclass
class RunnerTimes:
    """Seconds by kind of work, so benchmarks can tell this backend's own cost from the shared fitting math."""

    load: float = 0.0  # reading the export, shape inference, structure
    build: float = 0.0  # cutting graphs and creating sessions
    graph: float = 0.0  # ONNX Runtime inference (prelude and layers)
    statistics: float = 0.0  # UnitStats updates (the same work the PyTorch backend does)
    counts: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, what, getattr(self, what) + time.perf_counter() - start)
            self.counts[what] = self.counts.get(what, 0) + 1


@dataclass
class _LayerSession:
    """One cut layer and its session; ``run`` feeds a batch of the stream and returns the named outputs."""

    graph: LayerGraph
    session: ort.InferenceSession
    part: str = "layer"  # the whole layer, or its "attention" or "mlp" sub-block
    stream_dtype: type = np.float32

    def __post_init__(self) -> None:
        kind = next(i.type for i in self.session.get_inputs() if i.name == self.graph.stream_in)
        if kind not in _NUMPY:
            raise SubFitError(f"layer {self.index}: the residual stream is {kind}; calibration handles float, "
                              "float16 and double graphs")
        self.stream_dtype = _NUMPY[kind]

    @property
    def index(self) -> int:
        return self.graph.index

    def run(self, h: np.ndarray, shared: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        feed = {self.graph.stream_in: np.ascontiguousarray(h, dtype=self.stream_dtype)}
        feed.update({name: shared[name] for name in self.graph.shared})
        return dict(zip(outputs, self.session.run(outputs, feed)))


@dataclass
class BypassSwap:
    """Undoes one ``install_bypass`` on the runner's private graph (the residual Add gets its unit back)."""

    runner: OrtLayerRunner
    unit: UnitBoundary  # the unit's boundary before the bypass
    original: ir.Value  # what its residual Add read

    def undo(self) -> None:
        self.runner.remove_bypass(self)


class OrtLayerRunner(RowBatches):
    """Owns a private copy of the export, the activation store and one layer session at a time."""

    backend = "onnx"

    def __init__(self, export: str | os.PathLike, tokens: np.ndarray, batch_size: int = 8,
                 workdir: str | None = None, progress: ProgressFactory = silent,
                 providers: list[str] | None = None, threads: int = 0) -> None:
        self.path = export_file(export)
        config = read_config(self.path.parent)
        if config is None:
            raise SubFitError(f"{self.path.parent} has no config.json (nor a model builder's genai_config.json); the ONNX backend reads the model's shape from it")
        self.tokens = check_tokens(tokens, config_value(config, "vocab_size"))  # before any heavy work
        self.sessions = SessionFactory.create(self.path.parent, providers, threads)
        self.times = RunnerTimes()
        with self.times.timed("load"):
            self.model = load_onnx(self.path)  # external data checked before anything is read
            UnfuseSkipNormsPass()(self.model)  # model-builder graphs: a cut point per layer (no-op elsewhere)
            WidenSlidingWindowsPass(int(self.tokens.shape[1]))(self.model)
            DropSoftmaxNanGuardPass()(self.model)  # no masked-out rows in a calibration prefill
            ShapeInferencePass(strict_mode=False)(self.model)  # element types for the values the cuts expose
            self.structure = find_decoder_structure(self.model, model_type(config))
        require_dense(self.structure, self.path)
        self.identity, self.unit_params = export_identity(config, structure_facts(self.structure), self.path.parent)
        self._ffn_readings: dict[int, tuple[str, Any] | None] = {}  # ``_read_ffn``, per layer
        self.batch_size = batch_size
        self.progress = progress
        with self.times.timed("build"):
            self.cutter = GraphCutter(self.model, self.structure)
        self.store = ActivationStore(self.tokens.shape[0], self.tokens.shape[1], self.structure.hidden_size, workdir)
        self._layer: _LayerSession | None = None
        self._shared: dict[int, dict[str, np.ndarray]] = {}
        self._prelude: _Prelude | None = None
        self._prelude_gives: set[str] = set()
        try:
            self._fill_embeddings()
        except BaseException:
            self.close()
            raise

    # ---- LayerRunner ------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.structure.num_layers

    @property
    def providers(self) -> list[str]:
        return list(self.sessions.providers)

    def dense_targets(self) -> DenseTargets:
        return DenseTargets(self.store)

    reads_ffn_neurons = True

    def gated_ffn(self, index: int) -> GatedFFN | None:
        """Layer ``index``'s FFN weights from the graph (``onnx_ffn``); None where they cannot be read there or its
        activation is none that SubFit builds (``gated_ffn.ACTIVATIONS``)."""
        found = find_gated_ffn(self.structure.unit(index, "mlp"))
        if found is None:
            return None
        if index not in self._ffn_readings:
            with self.times.timed("graph"):
                self._ffn_readings[index] = self._read_ffn(found)
        reading = self._ffn_readings[index]
        return None if reading is None else found.weights(*reading)

    def _read_ffn(self, found: GraphFFN) -> tuple[str, tuple[np.ndarray, np.ndarray] | None] | None:
        """What running parts of the graph tells about an FFN: its activation and, when gate and up are one
        MatMul, the columns each takes (``onnx_ffn``)."""
        activation_part = extract_model(self.model, [found.gate_out], [found.activated])  # types gate_out
        probe = activation_probe(found)
        activation = identify_activation(probe, self._run_part(activation_part, [probe])[0])
        if activation is None:
            return None
        if found.fused is None:
            return activation, None
        selections = extract_model(self.model, [found.fused.product], [found.fused.gate, found.fused.up])
        high, low = column_probes(found.fused, found.gate.shape[1])
        columns = read_columns(self._run_part(selections, [high]), self._run_part(selections, [low]), probe.shape[-1])
        return None if columns is None else (activation, columns)

    def _run_part(self, model: ir.Model, inputs: list[np.ndarray]) -> list[np.ndarray]:
        session = self.sessions.session(model)
        return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs)})

    def install_bypass(self, index: int, kind: UnitKind, bypass: Bypass) -> BypassSwap:
        unit = self.structure.unit(index, kind)
        original = unit.residual_add.inputs[unit.unit_operand]
        assert original is not None
        result = InsertBypassPass(self.structure, {(index, kind): bypass})(self.model)
        self.structure.set_unit(result.units[(index, kind)])
        self._refresh(index)
        return BypassSwap(self, unit, original)

    def remove_bypass(self, swap: BypassSwap) -> None:
        unit = swap.unit
        scope = unit.scope + BYPASS_SCOPE
        graph = self.model.graph
        unit.residual_add.replace_input_with(unit.unit_operand, swap.original)
        graph.remove([n for n in graph if n.name and n.name.startswith(scope)], safe=True)
        prefix = bypass_initializer_name(unit.layer, unit.kind, "")  # neurons and activation constants included
        for name in [name for name in graph.initializers if name.startswith(prefix)]:
            graph.initializers.pop(name)
        self.structure.set_unit(unit)
        self._refresh(unit.layer)

    def sweep(self, index: int, collect: tuple[UnitKind, ...], weighting: Weightings, desc: str,
              dense: DenseTargets | None = None, neurons: NeuronEnergy | None = None) -> dict[UnitKind, AnyStats]:
        """Run layer ``index`` on every calibration batch, writing its outputs and collecting unit stats.

        With ``dense``, each unit's fit target restores the dense stream (``h_dense_after - h_in``), as in
        ``TorchLayerRunner.sweep``. ``neurons`` sums the energies of the layer's gated FFN's neurons, fetched from
        the graph's ``mlp.a`` tap (the FFN must run as itself, not as a bypass).
        """
        layer = self._session(index)
        hidden = self.store.shape[2]
        stats = {kind: self.new_stats(hidden, weighting) for kind in collect}
        taps = self._tap_names(layer, collect, neurons is not None)
        with progress_bar(self.progress, desc, self.active_rows) as bar:
            for rows in self.batches():
                h = np.asarray(self.store.current[rows])
                shared = self._shared_values(rows)
                with self.times.timed("graph"):
                    out = layer.run(h, shared, [layer.graph.stream_out, *taps])
                self.store.next[rows] = out[layer.graph.stream_out]
                if neurons is not None:
                    with self.times.timed("statistics"):
                        self._add_neuron_energy(neurons, out[layer.graph.taps[NEURON_TAP]],
                                                out[layer.graph.stream_out])
                if collect:
                    with self.times.timed("statistics"):
                        arrays = self._tap_arrays(layer, out, h.shape)
                        self.collect_batch(stats, rows, np.asarray(h, dtype=np.float32), arrays,
                                           dense.batch(rows) if dense else None)
                bar.update(rows.stop - rows.start)
        return stats

    splits_layers = True

    def sweep_attention(self, index: int, collect: bool, weighting: Weightings,
                        desc: str) -> dict[UnitKind, AnyStats]:
        """Layer ``index``'s attention sub-block on every batch: the stream entering its FFN goes to the store
        (``ActivationStore.mlp_inputs``) for ``sweep_mlp``, and with ``collect`` the attention's statistics come
        back. Pass 2 decides the attention before the FFN runs, as on the PyTorch backend."""
        half = self._session(index, "attention")
        stats = {"attention": self.new_stats(self.store.shape[2], weighting)} if collect else {}
        taps = self._tap_names(half, ("attention",)) if collect else []
        mid_store, _ = self.store.mlp_inputs()
        with progress_bar(self.progress, desc, self.active_rows) as bar:
            for rows in self.batches():
                h = np.asarray(self.store.current[rows])
                with self.times.timed("graph"):
                    out = half.run(h, self._shared_values(rows), [half.graph.stream_out, *taps])
                mid_store[rows] = out[half.graph.stream_out]
                if collect:
                    with self.times.timed("statistics"):
                        arrays = self._tap_arrays(half, out, h.shape)
                        self.add_batch(stats, rows, {"attention": np.asarray(h, dtype=np.float32)}, arrays, None)
                bar.update(rows.stop - rows.start)
        return stats

    def sweep_mlp(self, index: int, weighting: Weightings, desc: str,
                  neurons: NeuronEnergy | None = None) -> dict[UnitKind, AnyStats]:
        """Layer ``index``'s FFN sub-block on the stream ``sweep_attention`` kept; the layer's outputs go to the
        store, the FFN's statistics come back (and its neurons' energies into ``neurons``)."""
        half = self._session(index, "mlp")
        stats = {"mlp": self.new_stats(self.store.shape[2], weighting)}
        taps = self._tap_names(half, ("mlp",), neurons is not None)
        mid_store, _ = self.store.mlp_inputs()
        with progress_bar(self.progress, desc, self.active_rows) as bar:
            for rows in self.batches():
                mid = np.asarray(mid_store[rows])
                with self.times.timed("graph"):
                    out = half.run(mid, self._shared_values(rows), [half.graph.stream_out, *taps])
                self.store.next[rows] = out[half.graph.stream_out]
                with self.times.timed("statistics"):
                    if neurons is not None:
                        self._add_neuron_energy(neurons, out[half.graph.taps[NEURON_TAP]], out[half.graph.stream_out])
                    arrays = self._tap_arrays(half, out, mid.shape)
                    if self.keep_mlp_inputs:
                        self.keep_ffn_inputs(rows, None, arrays["mlp.x"])
                    self.add_batch(stats, rows, {"mlp": mid}, arrays, None)
                bar.update(rows.stop - rows.start)
        return stats

    def dense_sweep(self, index: int, dense: DenseTargets, desc: str) -> None:
        """Advance the dense reference stream through layer ``index`` (not yet bypassed when this runs)."""
        layer = self._session(index)
        y_att = layer.graph.taps["attention.y"]
        with progress_bar(self.progress, desc, self.active_rows) as bar:
            for rows in self.batches():
                h = np.asarray(dense.store.current[rows])
                shared = self._shared_values(rows)
                with self.times.timed("graph"):
                    out = layer.run(h, shared, [layer.graph.stream_out, y_att])
                dense.after_attention[rows] = h + np.asarray(out[y_att], dtype=np.float32)
                dense.store.next[rows] = out[layer.graph.stream_out]
                bar.update(rows.stop - rows.start)

    def close(self) -> None:
        self._layer = None
        self._prelude = None
        self._shared.clear()
        if hasattr(self, "store"):
            self.store.close()

    # ---- internals --------------------------------------------------------------------------------------------
    def _refresh(self, changed: int) -> None:
        """Re-cut after a graph change (the structure was updated by the caller); only the changed layer's
        session is rebuilt."""
        with self.times.timed("build"):
            self.cutter = GraphCutter(self.model, self.structure)
        if self._layer is not None and self._layer.index == changed:
            self._layer = None
        if not {v.name for v in self.cutter.shared_values(changed)} <= self._prelude_gives:
            self._renew_prelude()

    def _renew_prelude(self) -> None:
        """A bypass can make a layer read a value no prelude computes yet: one that depends on the embeddings
        only, such as layer 0's bypass of the norm an fp16 export applies before widening the stream."""
        with self.times.timed("build"):
            prelude = _Prelude(self.cutter, self.sessions, self.structure)
        self._prelude_gives = prelude.gives
        self._shared.clear()
        self._keep_or_cache(prelude)

    def _keep_or_cache(self, prelude: _Prelude) -> None:
        """Keep ``prelude`` when the shared values depend on the token ids; otherwise run it once per batch size a
        sweep can ask for (1 to ``batch_size`` rows: the probes run odd row counts) and let it go.

        Its session holds the embedding table (671 MB on Gemma-3-270m), so it is not kept for shape-only values;
        building it again for each new batch size took 40 s of a Gemma-3-270m calibration's 99.
        """
        if prelude.per_batch:
            self._prelude = prelude
            return
        with self.times.timed("graph"):
            for size in range(1, min(self.batch_size, self.tokens.shape[0]) + 1):
                if size not in self._shared:
                    self._shared[size] = prelude.run(self.tokens[:size])[1]
        self._prelude = None

    def _session(self, index: int, part: str = "layer") -> _LayerSession:
        """Layer ``index`` whole, or one of its sub-blocks (``part``: attention or mlp, ``GraphCutter.half``)."""
        if self._layer is None or (self._layer.index, self._layer.part) != (index, part):
            self._layer = None  # free the previous layer's session before building the next
            with self.times.timed("build"):
                graph = self.cutter.layer(index) if part == "layer" else self.cutter.half(index, part)  # type: ignore[arg-type]
                self._layer = _LayerSession(graph, self.sessions.session(graph.model), part=part)
        return self._layer

    @staticmethod
    def _tap_names(layer: _LayerSession, collect: tuple[UnitKind, ...], neurons: bool = False) -> list[str]:
        """The outputs a run fetches: the collected units' x and y (and on a whole layer ``attention.y``, which
        gives its FFN's input stream), and with ``neurons`` the FFN's neurons."""
        names = []
        if neurons:
            if NEURON_TAP not in layer.graph.taps:
                raise SubFitError(f"layer {layer.index}: its FFN's neurons cannot be read from the export")
            names.append(layer.graph.taps[NEURON_TAP])
        if not collect:
            return names
        if layer.part == "layer":
            names.append(layer.graph.taps["attention.y"])
        for kind in collect:
            key = f"{kind}.x"
            if key not in layer.graph.taps:
                raise SubFitError(f"layer {layer.index} {kind} is a constant bypass; it has no input to measure")
            names += [layer.graph.taps[key], layer.graph.taps[f"{kind}.y"]]
        return list(dict.fromkeys(names))

    @staticmethod
    def _tap_arrays(layer: _LayerSession, out: dict[str, np.ndarray],
                    shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The run's taps by unit name (``attention.y``, ``mlp.x``, ...), float32 and broadcast to the
        stream's shape, as the PyTorch backend hands them over."""
        return {key: np.broadcast_to(np.asarray(out[name], dtype=np.float32), shape)
                for key, name in layer.graph.taps.items() if name in out and key != NEURON_TAP}

    def _add_neuron_energy(self, neurons: NeuronEnergy, a: np.ndarray, out: np.ndarray) -> None:
        """One batch's neuron energies, weighted by its layer outputs as ``TorchLayerRunner.sweep`` weights them."""
        a = np.asarray(a, dtype=np.float32)
        out = np.asarray(out, dtype=np.float32)
        neurons.add(a.reshape(-1, a.shape[-1]), np.square(out).sum(-1), self.linalg.matmul)

    def _fill_embeddings(self) -> None:
        """Run the prelude on every batch: ``B_0`` into the store, shared values kept per batch size."""
        with self.times.timed("build"):
            self._prelude = _Prelude(self.cutter, self.sessions, self.structure)
        self._prelude_gives = self._prelude.gives
        with progress_bar(self.progress, "embedding calibration tokens", self.tokens.shape[0]) as bar:
            for rows in self.batches():
                with self.times.timed("graph"):
                    stream, shared = self._prelude.run(self.tokens[rows])
                self.store.current[rows] = stream
                self._shared.setdefault(rows.stop - rows.start, shared)
                bar.update(rows.stop - rows.start)
        self.store.snapshot()
        self._keep_or_cache(self._prelude)

    def _shared_values(self, rows: slice) -> dict[str, np.ndarray]:
        if self._prelude is not None:  # shared values that depend on the token ids: recompute per batch
            with self.times.timed("graph"):
                return self._prelude.run(self.tokens[rows])[1]
        return self._shared[rows.stop - rows.start]  # every size ``batches`` yields (``_keep_or_cache``)


class _Prelude:
    """The graph inputs' share of the model: embeddings ``B_0`` and every value the layers share."""

    def __init__(self, cutter: GraphCutter, sessions: SessionFactory, structure: DecoderStructure) -> None:
        self.graph = cutter.prelude()
        self.session = sessions.session(self.graph.model)
        self.graph_inputs = list(cutter.model.graph.inputs)
        self.kv = (structure.num_kv_heads, structure.head_dim)
        self.per_batch = cutter.depends_on_token_values(self.graph.shared)
        self.gives = {*self.graph.shared, *(v.name for v in self.graph_inputs)}  # what run()'s shared dict holds

    def run(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        batch, seq = ids.shape
        inputs = prefill_inputs(self.graph_inputs, batch, seq, *self.kv)
        inputs["input_ids"] = ids
        feed = {name: inputs[name] for name in self.graph.inputs}
        names = [self.graph.stream, *self.graph.shared]
        values = dict(zip(names, self.session.run(names, feed)))
        shared = {name: values[name] for name in self.graph.shared}
        shared.update({k: v for k, v in inputs.items() if k != "input_ids"})  # past KV, mask: graph inputs
        return np.asarray(values[self.graph.stream], dtype=np.float32), shared


def calibrate_export(export: str | os.PathLike, tokens: np.ndarray, config: SubFitConfig,
                     progress: ProgressFactory = silent, calibration_info: dict[str, Any] | None = None,
                     workdir: str | None = None, providers: list[str] | None = None, threads: int = 0,
                     dense: DensePass | None = None, budget: Budget | None = None) -> CalibrationResult:
    """Calibrate from an Optimum export with ONNX Runtime (no checkpoint, no torch); same result type as
    ``calibrate_model``. ``providers`` defaults to CUDA when available, else CPU."""
    runner = OrtLayerRunner(export, tokens, config.batch_size, workdir, progress, providers, threads)
    try:
        info = {"export": str(runner.path), "onnx_providers": runner.providers, **(calibration_info or {})}
        return run_calibration(runner, config, info, dense=dense, budget=budget)
    finally:
        runner.close()
