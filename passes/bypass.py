"""Replace removed units by their linear bypass: the residual Add takes ``N(h) @ W + b`` instead of the unit.

Only the residual Add's unit operand is rewired; the unit's own nodes are left for dead-node elimination, so
anything they also computed for the rest of the graph (layer 0's attention scope computes RoPE cos/sin for every
layer) survives. Reading the pre-norm output and writing the Add operand also skips the Gemma-2 post-norm, as
the bypass was fitted to do. Weights are stored in the dtype of the value they multiply, and the result is cast
to the dtype of the operand it replaces (fp16 exports widen the residual stream to fp32).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from ..architectures import UnitKind
from ..bypass import Bypass
from ..errors import PlanMismatchError, SubFitError
from ..gated_ffn import ACTIVATIONS, GELU_TANH_CUBIC, GELU_TANH_SCALE
from .graph_tools import value_dtype
from .structure import BYPASS_SCOPE, DecoderStructure, UnitBoundary, bypass_params


def bypass_initializer_name(layer: int, kind: UnitKind, role: str) -> str:
    return f"subfit.layers.{layer}.{kind}.{role}"


def _check_shapes(bypass: Bypass, hidden: int, where: str) -> None:
    expected = {"bias": (hidden,)}
    if bypass.weight is not None:
        expected["weight"] = (hidden, hidden)
    if bypass.down is not None or bypass.up is not None:
        if bypass.down is None or bypass.up is None:
            raise PlanMismatchError(f"{where}: a low-rank bypass needs both down and up")
        rank = bypass.down.shape[-1]
        expected.update(down=(hidden, rank), up=(rank, hidden))
    if bypass.neuron_out is not None or bypass.neuron_gate is not None or bypass.neuron_up is not None:
        if bypass.neuron_out is None or bypass.neuron_gate is None or bypass.neuron_up is None:
            raise PlanMismatchError(f"{where}: a bypass with neurons needs their gate, up and out tensors")
        if bypass.activation not in ACTIVATIONS:
            raise PlanMismatchError(f"{where}: no ONNX form for the neurons' activation {bypass.activation!r}")
        k = bypass.neuron_out.shape[0]
        expected.update(neuron_gate=(hidden, k), neuron_up=(hidden, k), neuron_out=(k, hidden))
    for role, shape in expected.items():
        actual = tuple(np.shape(getattr(bypass, role)))
        if actual != shape:
            raise PlanMismatchError(f"{where}: bypass {role} has shape {actual}, the graph needs {shape}")


class _Builder:
    """Appends the nodes of one bypass, named in ``<unit scope>subfit/`` so profilers attribute them."""

    def __init__(self, graph: ir.Graph, unit: UnitBoundary, dtype: ir.DataType) -> None:
        self.graph = graph
        self.unit = unit
        self.dtype = dtype
        self.scope = unit.scope + BYPASS_SCOPE
        self.nodes: list[ir.Node] = []

    def weight(self, role: str, array: np.ndarray) -> ir.Value:
        name = bypass_initializer_name(self.unit.layer, self.unit.kind, role)
        if name in self.graph.initializers:
            raise SubFitError(f"the graph already holds {name}; was it rewritten before?")
        data = np.ascontiguousarray(np.asarray(array, dtype=np.float32).astype(self.dtype.numpy()))
        value = ir.Value(name=name, shape=ir.Shape(data.shape), type=ir.TensorType(self.dtype),
                         const_value=ir.tensor(data, dtype=self.dtype, name=name))
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: list[ir.Value], attributes: dict | None = None) -> ir.Value:
        count = sum(n.op_type == op_type for n in self.nodes)
        name = f"{self.scope}{op_type}" + (f"_{count}" if count else "")
        node = ir.Node("", op_type, inputs, attributes=[ir.Attr(k, ir.AttributeType.INT, v) for k, v in (attributes or {}).items()],
                       name=name, num_outputs=1)
        node.outputs[0].name = f"{name}_output_0"
        self.nodes.append(node)
        return node.outputs[0]

    def constant(self, role: str, value: float) -> ir.Value:
        return self.weight(role, np.asarray(value, dtype=np.float32))

    def activation(self, name: str, h: ir.Value) -> ir.Value:
        """The activation of ``gated_ffn.ACTIVATIONS`` from standard ops (ONNX has no SiLU, and ``Gelu`` needs
        opset 20, later than exporters write)."""
        if name == "silu":
            return self.op("Mul", [h, self.op("Sigmoid", [h])])
        # gelu_pytorch_tanh: 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))
        cube = self.op("Mul", [self.op("Mul", [h, h]), h])
        inner = self.op("Add", [h, self.op("Mul", [cube, self.constant("gelu_cubic", GELU_TANH_CUBIC)])])
        tanh = self.op("Tanh", [self.op("Mul", [inner, self.constant("gelu_scale", GELU_TANH_SCALE)])])
        half = self.op("Mul", [h, self.constant("gelu_half", 0.5)])
        return self.op("Mul", [half, self.op("Add", [tanh, self.constant("gelu_one", 1.0)])])

    def neurons(self, x: ir.Value, bypass: Bypass) -> ir.Value:
        """``act(x Wg) * (x Wu) @ Wo`` for the bypass's kept FFN neurons."""
        assert bypass.neuron_gate is not None and bypass.neuron_up is not None and bypass.neuron_out is not None
        assert bypass.activation is not None
        gate = self.activation(bypass.activation, self.op("MatMul", [x, self.weight("neuron_gate", bypass.neuron_gate)]))
        up = self.op("MatMul", [x, self.weight("neuron_up", bypass.neuron_up)])
        return self.op("MatMul", [self.op("Mul", [gate, up]), self.weight("neuron_out", bypass.neuron_out)])


def _insert(graph: ir.Graph, unit: UnitBoundary, bypass: Bypass, fallback: ir.DataType) -> UnitBoundary:
    """Build one bypass before its residual Add and rewire the Add; returns the unit's new boundary.

    The boundary is what ``find_decoder_structure`` would now find there, worked out from the nodes just built.
    """
    dtype = unit.input_dtype or fallback
    b = _Builder(graph, unit, dtype)
    x = unit.norm_output
    assert x is not None, "a dense unit always has its norm output"
    if bypass.weight is not None:
        y: ir.Value | None = b.op("MatMul", [x, b.weight("weight", bypass.weight)])
    elif bypass.down is not None and bypass.up is not None:
        y = b.op("MatMul", [b.op("MatMul", [x, b.weight("down", bypass.down)]), b.weight("up", bypass.up)])
    else:  # constant bypass: the residual Add broadcasts the bias over the stream
        y = None
    if bypass.neuron_out is not None:
        neurons = b.neurons(x, bypass)
        y = neurons if y is None else b.op("Add", [y, neurons])
    bias = b.weight("bias", bypass.bias)
    out = b.op("Add", [y, bias]) if y is not None else b.op("Identity", [bias])  # a node marks the unit bypassed
    target = unit.output_dtype or dtype
    if target != dtype:
        out = b.op("Cast", [out], {"to": target.value})
    graph.insert_before(unit.residual_add, b.nodes)
    unit.residual_add.replace_input_with(unit.unit_operand, out)
    reads = x if y is not None else None  # a constant bypass reads nothing
    return replace(unit, norm_output=reads, params=bypass_params(b.nodes), bypassed=True,
                   input_dtype=value_dtype(reads) if reads is not None else None, output_dtype=value_dtype(out))


@dataclass
class BypassResult(ir.passes.PassResult):
    """The pass's result plus each replaced unit's new boundary, for callers that keep the structure."""

    units: dict[tuple[int, UnitKind], UnitBoundary] = field(default_factory=dict)


class InsertBypassPass(ir.passes.InPlacePass):
    """Rewire each listed unit's residual Add to a MatMul(+MatMul)+Add bypass of its pre-norm output (plus the
    kept neurons' MatMuls, activation and Mul, for a bypass with neurons).

    ``structure`` is the graph's ``find_decoder_structure``, found by the caller and not searched again; it is
    only read. The units' old nodes become dead but stay in the graph; run ``RemoveUnusedNodesPass`` afterwards
    (after dropping removed attentions' ``present`` outputs, which keep their K/V projections alive).
    """

    def __init__(self, structure: DecoderStructure, bypasses: Mapping[tuple[int, UnitKind], Bypass]) -> None:
        super().__init__()
        self.structure = structure
        self.bypasses = dict(bypasses)

    def call(self, model: ir.Model) -> BypassResult:
        structure = self.structure
        fallback = structure.dtype or ir.DataType.FLOAT
        units = {}
        for (layer, kind), bypass in sorted(self.bypasses.items()):
            where = f"layer {layer} {kind}"
            if not 0 <= layer < structure.num_layers:
                raise PlanMismatchError(f"{where}: the graph has {structure.num_layers} layers")
            unit = structure.unit(layer, kind)
            if unit.bypassed:
                raise SubFitError(f"{where} is already a bypass in this graph")
            _check_shapes(bypass, structure.hidden_size, where)
            units[(layer, kind)] = _insert(model.graph, unit, bypass, fallback)
        return BypassResult(model, modified=bool(self.bypasses), units=units)
