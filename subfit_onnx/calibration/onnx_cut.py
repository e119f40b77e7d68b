"""Cut an Optimum decoder export into a prelude and one small graph per decoder layer.

Layer-by-layer calibration on ONNX Runtime must run layer i alone, on residual-stream activations read from the
``ActivationStore``, exactly as the PyTorch backend calls one ``DecoderLayer``. So the graph is cut at the
residual stream between layers: ``B_i`` (the stream operand of layer i's attention residual Add) is the input of
layer i's graph and ``B_{i+1}`` its output; the last layer ends at its FFN residual Add.

A layer also reads values it does not compute: RoPE cos/sin (Optimum computes them once, some under
``/model/layers.0/self_attn/``), the causal mask, its empty past KV. These are found by *dependence*, not by
name: every value is tagged with the latest layer whose stream it depends on (data or shape), and whether it
depends on the stream's data or only on its shape (``Shape``/``Size``). Walking back from a layer's outputs,
everything tagged with that layer is inside it; anything tagged earlier that is not stream data is a *shared*
value, computed once per batch by the prelude (the graph inputs to ``B_0`` and to all shared values). Shapes
of the stream are the same at every layer boundary, so a shape-derived value is correct whatever upstream
layers have been replaced by bypasses. A layer that reads another layer's stream *data* is refused: its
calibration would not be layer-local.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from ..architectures import UnitKind
from ..errors import UnsupportedModelError
from ..passes.graph_tools import value_dtype
from ..passes.structure import DecoderStructure, UnitBoundary
from .onnx_ffn import find_gated_ffn

SHAPE_OPS = ("Shape", "Size")
PRELUDE = -1
NEURON_TAP = "mlp.a"  # the key of a gated FFN's neurons in ``LayerGraph.taps``


@dataclass(frozen=True)
class Tap:
    """Which graph value carries a unit's bypass input (``x``), its contribution (``y``) or, for a gated FFN, its
    neurons (``a``, ``onnx_ffn``; fetched only by sweeps that sum their energies)."""

    kind: UnitKind
    role: str  # "x" | "y" | "a"
    value: ir.Value

    @property
    def key(self) -> str:
        return f"{self.kind}.{self.role}"


@dataclass
class LayerGraph:
    """One layer as a standalone model: stream in, shared values in, stream and unit taps out."""

    index: int
    model: ir.Model
    stream_in: str
    stream_out: str
    shared: list[str]  # names of shared values (prelude outputs or graph inputs) it reads
    taps: dict[str, str]  # "attention.x", "mlp.a" etc. -> output name


@dataclass
class PreludeGraph:
    model: ir.Model
    stream: str  # B_0
    shared: list[str]  # prelude outputs besides B_0
    inputs: list[str]


def stream_into(unit: UnitBoundary) -> ir.Value:
    """The residual stream a unit's output is added to: the other operand of its residual Add."""
    stream = unit.residual_add.inputs[1 - unit.unit_operand]
    assert stream is not None
    return stream


def stream_boundaries(structure: DecoderStructure) -> list[ir.Value]:
    """``B_0 .. B_n``: the residual stream entering each layer, and leaving the last one."""
    values = [stream_into(layer.attention) for layer in structure.layers]
    values.append(structure.layers[-1].mlp.residual_add.outputs[0])
    return values


def unit_taps(structure: DecoderStructure, index: int) -> list[Tap]:
    layer = structure.layers[index]
    taps = []
    for kind in ("attention", "mlp"):
        unit = layer.unit(kind)  # type: ignore[arg-type]
        if unit.norm_output is not None:
            taps.append(Tap(kind, "x", unit.norm_output))  # type: ignore[arg-type]
        y = unit.residual_add.inputs[unit.unit_operand]
        assert y is not None
        taps.append(Tap(kind, "y", y))  # type: ignore[arg-type]
    ffn = find_gated_ffn(layer.mlp)
    if ffn is not None:
        taps.append(Tap("mlp", "a", ffn.neurons))
    return taps


class StreamTags:
    """For every value: the latest layer whose stream it depends on, and whether on its data or its shape."""

    def __init__(self, graph: ir.Graph, boundaries: list[ir.Value]) -> None:
        self.boundary = {v: i for i, v in enumerate(boundaries)}
        self.layer: dict[ir.Value, int] = {boundaries[0]: 0}
        self.data: set[ir.Value] = {boundaries[0]}
        for node in graph:
            inputs = [v for v in node.inputs if v is not None]
            tagged = [self.layer[v] for v in inputs if v in self.layer]
            if not tagged:
                continue
            latest = max(tagged)
            carries_data = node.op_type not in SHAPE_OPS and any(v in self.data for v in inputs)
            for out in node.outputs:
                self.layer[out] = self.boundary.get(out, latest)
                if carries_data:
                    self.data.add(out)

    def tag(self, value: ir.Value) -> int:
        return self.layer.get(value, PRELUDE)


def _walk_layer(index: int, outputs: list[ir.Value], stream_in: ir.Value, stream_out: ir.Value,
                tags: StreamTags) -> list[ir.Value]:
    """Walk back from a layer's outputs; returns the shared values it reads (checks it is layer-local).

    ``stream_out`` is inside the layer even when its producer is named after the next layer (a Cast that the
    exporter placed in the next layer's norm and both the norm and the residual Add read).
    """
    shared: dict[ir.Value, None] = {}
    seen: set[ir.Value] = set()
    stack = list(outputs)
    while stack:
        value = stack.pop()
        if value in seen or value is stream_in or value.is_initializer():
            continue
        seen.add(value)
        producer = value.producer()
        tag = tags.tag(value)
        if producer is None:  # a graph input (past KV, attention mask)
            shared[value] = None
        elif tag == index or producer.op_type == "Constant" or value is stream_out:
            stack.extend(v for v in producer.inputs if v is not None)
        elif tag < index and value not in tags.data:
            shared[value] = None
        else:
            raise UnsupportedModelError(
                f"layer {index} reads {value.name!r}, which depends on the residual stream of layer {tag}; "
                "layer-by-layer ONNX calibration needs layers that only see their own input stream"
            )
    return list(shared)


def _type(values: list[ir.Value]) -> None:
    """Graph inputs and outputs must declare their element type; TorchScript leaves interior values untyped.

    A cut's inputs are typed in the source graph, before extraction: their clones have no producer to tell.
    """
    for value in values:
        if value.dtype is None:
            dtype = value_dtype(value)
            if dtype is None:
                raise UnsupportedModelError(f"cannot tell the element type of {value.name!r} to cut the graph there")
            value.dtype = dtype


def _typed(graph: ir.Graph) -> ir.Graph:
    _type([*graph.inputs, *graph.outputs])
    return graph


def _named_model(source: ir.Model, graph: ir.Graph) -> ir.Model:
    _typed(graph).opset_imports.update(source.graph.opset_imports)
    return ir.Model(graph, ir_version=source.ir_version, producer_name="subfit-onnx")


def extract_model(source: ir.Model, inputs: list[ir.Value], outputs: list[ir.Value]) -> ir.Model:
    """The values of ``source`` between ``inputs`` and ``outputs`` as a standalone model (a layer, or the part of
    one that ``onnx_ffn`` runs on probe values)."""
    _type(inputs)
    return _named_model(source, ir.convenience.extract(source.graph, inputs, outputs))


def _drop_unused_inputs(graph: ir.Graph) -> None:
    for value in [v for v in graph.inputs if not v.uses()]:
        graph.inputs.remove(value)


def _unique(values: list[ir.Value]) -> list[ir.Value]:
    return list(dict.fromkeys(values))


class GraphCutter:
    """Analyses a (possibly partly bypassed) decoder graph and extracts its prelude and layer graphs.

    The source model is only read; each extracted graph is a clone that shares tensors with it.
    """

    def __init__(self, model: ir.Model, structure: DecoderStructure) -> None:
        self.model = model
        self.structure = structure
        self.boundaries = stream_boundaries(structure)
        self.tags = StreamTags(model.graph, self.boundaries)
        self._shared: dict[int, list[ir.Value]] = {}

    @property
    def num_layers(self) -> int:
        return self.structure.num_layers

    def layer_outputs(self, index: int) -> tuple[ir.Value, list[Tap]]:
        return self.boundaries[index + 1], unit_taps(self.structure, index)

    def shared_values(self, index: int) -> list[ir.Value]:
        if index not in self._shared:
            out, taps = self.layer_outputs(index)
            self._shared[index] = _walk_layer(index, [out, *(t.value for t in taps)], self.boundaries[index],
                                              out, self.tags)
        return self._shared[index]

    def layer(self, index: int) -> LayerGraph:
        out, taps = self.layer_outputs(index)
        return self._cut(index, self.boundaries[index], out, taps, self.shared_values(index))

    def half(self, index: int, part: UnitKind) -> LayerGraph:
        """Layer ``index``'s attention sub-block (its stream in, the FFN's stream out) or its FFN sub-block (that
        stream in, the layer's stream out), each with its own unit's taps; run in turn they compute the layer."""
        ffn_stream = stream_into(self.structure.layers[index].mlp)
        if part == "attention":
            stream_in, out = self.boundaries[index], ffn_stream
        else:
            stream_in, out = ffn_stream, self.boundaries[index + 1]
        taps = [t for t in unit_taps(self.structure, index) if t.kind == part]
        shared = _walk_layer(index, _unique([out, *(t.value for t in taps)]), stream_in, out, self.tags)
        return self._cut(index, stream_in, out, taps, shared)

    def _cut(self, index: int, stream_in: ir.Value, out: ir.Value, taps: list[Tap],
             shared: list[ir.Value]) -> LayerGraph:
        outputs = _unique([out, *(t.value for t in taps)])
        return LayerGraph(index=index, model=extract_model(self.model, [stream_in, *shared], outputs),
                          stream_in=stream_in.name, stream_out=out.name, shared=[v.name for v in shared],
                          taps={t.key: t.value.name for t in taps})

    def prelude(self) -> PreludeGraph:
        """The graph inputs to ``B_0`` and to every shared value that is not itself a graph input."""
        graph_inputs = set(self.model.graph.inputs)
        computed = _unique([v for i in range(self.num_layers) for v in self.shared_values(i) if v not in graph_inputs])
        outputs = _unique([self.boundaries[0], *computed])
        graph = ir.convenience.extract(self.model.graph, list(self.model.graph.inputs), outputs)
        _drop_unused_inputs(graph)
        return PreludeGraph(model=_named_model(self.model, graph), stream=self.boundaries[0].name,
                            shared=[v.name for v in computed], inputs=[v.name for v in graph.inputs])

    def depends_on_token_values(self, names: list[str]) -> bool:
        """Whether any of ``names`` depends on the *values* of input_ids (not only on its shape)."""
        ids = next(v for v in self.model.graph.inputs if v.name == "input_ids")
        reached: set[ir.Value] = {ids}
        for node in self.model.graph:
            if node.op_type in SHAPE_OPS:
                continue
            if any(v in reached for v in node.inputs if v is not None):
                reached.update(node.outputs)
        return any(v.name in names for v in reached)
