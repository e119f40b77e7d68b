"""A gated FFN's matrices and neuron activations, read from an export (the ONNX Runtime backend).

``ffn_bypass`` neurons and auto fit a removed gated FFN with some of its own neurons (``neuron_fit``). That needs
the FFN's gate, up and down matrices and, while its layer runs, its neuron activations (the down projection's
input). The PyTorch backend reads them from the module. In an export they are the constant operands of the
unit's MatMuls, found here by dataflow rather than by name:
- two MatMuls read the unit's input (gate and up);
- a Mul joins them, with the activation on the gate's side only;
- one MatMul reads that product (down).
Which activation the gate's side computes is found by running it on probe values. Any other FFN, or one whose
activation SubFit cannot build, keeps the linear bypass, as FFNs the PyTorch backend cannot read do. That covers a fused gate_up
projection, quantized ``MatMulNBits`` weights, biases and non-gated FFNs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..gated_ffn import ACTIVATIONS, GatedFFN
from ..passes.graph_tools import consumers, in_scope, value_dtype
from ..passes.structure import BYPASS_SCOPE, UnitBoundary

WEIGHT_OPS = ("MatMul", "Gemm", "MatMulNBits")  # ops that would mean a second projection on the gate's side
MAX_ACTIVATION_VALUES = 64  # values between the gate's MatMul and the Mul: an activation is a handful of ops
PROBE_ROWS = 4  # rows of d_ff probe values
ACTIVATION_TOLERANCE = 1e-4  # silu and gelu_tanh differ by up to 0.2 between -8 and 8; float32 rounding is ~1e-6
FP16_SLACK = 100.0


@dataclass(frozen=True)
class GraphFFN:
    """The constant matrices of one gated FFN (ONNX layout: ``x @ W``) and the value that holds its neurons."""

    gate: ir.Value  # [d, d_ff]
    up: ir.Value  # [d, d_ff]
    down: ir.Value  # [d_ff, d]
    neurons: ir.Value  # act(x Wg) * (x Wu), the down projection's input
    gate_out: ir.Value  # x Wg
    activated: ir.Value  # act(x Wg), what the join multiplies by x Wu

    def weights(self, activation: str) -> GatedFFN:
        """As float32 whatever the export's dtype, with ``out_weight`` from the down rows, as the PyTorch
        backend's ``torch_model.gated_ffn`` gives them."""
        down = _array(self.down).astype(np.float64)
        return GatedFFN(gate=_array(self.gate), up=_array(self.up), out_weight=(down * down).sum(1),
                        activation=activation)


def _array(value: ir.Value) -> np.ndarray:
    assert value.const_value is not None
    return np.asarray(value.const_value.numpy(), dtype=np.float32)


def _matrix_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.const_value is None or len(value.const_value.shape) != 2:
        return None
    return tuple(value.const_value.shape)


def _projections(x: ir.Value, scope: str) -> list[ir.Node]:
    """The unit's MatMuls that multiply ``x`` by a constant matrix."""
    return [n for n in consumers(x) if n.op_type == "MatMul" and in_scope(n, scope) and len(n.inputs) == 2
            and n.inputs[0] is x and _matrix_shape(n.inputs[1]) is not None]


def _only_activation_of(value: ir.Value, source: ir.Value, scope: str) -> bool:
    """Whether ``value`` is computed from ``source`` and constants alone, by the unit's own elementwise ops."""
    stack, seen, reached = [value], set(), False
    while stack:
        current = stack.pop()
        if current is source:
            reached = True
            continue
        if current in seen or current.const_value is not None:
            continue
        seen.add(current)
        node = current.producer()
        if node is None or not in_scope(node, scope) or node.op_type in WEIGHT_OPS \
                or len(seen) > MAX_ACTIVATION_VALUES:
            return False
        stack.extend(v for v in node.inputs if v is not None)
    return reached


def find_gated_ffn(unit: UnitBoundary) -> GraphFFN | None:
    """Unit ``unit``'s gated FFN, or None when it is not one this reads (or is already a bypass)."""
    if unit.kind != "mlp" or unit.bypassed or unit.norm_output is None:
        return None
    scope = unit.scope
    projections = [n for n in _projections(unit.norm_output, scope) if not in_scope(n, scope + BYPASS_SCOPE)]
    if len(projections) != 2 or _matrix_shape(projections[0].inputs[1]) != _matrix_shape(projections[1].inputs[1]):
        return None
    d, d_ff = _matrix_shape(projections[0].inputs[1])  # type: ignore[misc]
    for up, gate in (projections, projections[::-1]):
        joins = [n for n in consumers(up.outputs[0]) if n.op_type == "Mul" and len(n.inputs) == 2]
        if len(joins) != 1 or len(consumers(up.outputs[0])) != 1:
            continue
        join = joins[0]
        other = join.inputs[1] if join.inputs[0] is up.outputs[0] else join.inputs[0]
        if other is None or not _only_activation_of(other, gate.outputs[0], scope):
            continue
        downs = consumers(join.outputs[0])
        if len(downs) == 1 and downs[0].op_type == "MatMul" and downs[0].inputs[0] is join.outputs[0] \
                and _matrix_shape(downs[0].inputs[1]) == (d_ff, d):
            return GraphFFN(gate=gate.inputs[1], up=up.inputs[1], down=downs[0].inputs[1],  # type: ignore[arg-type]
                            neurons=join.outputs[0], gate_out=gate.outputs[0], activated=other)
    return None


def activation_model(model: ir.Model, ffn: GraphFFN) -> ir.Model:
    """The FFN's activation alone, ``x Wg`` in and ``act(x Wg)`` out, to run on probe values
    (``identify_activation``): which activation a graph computes is read from what it computes, not from a
    config (a model builder's genai_config.json names none)."""
    for value in (ffn.gate_out, ffn.activated):
        if value.dtype is None:
            value.dtype = value_dtype(value)
    graph = ir.convenience.extract(model.graph, [ffn.gate_out], [ffn.activated])
    graph.opset_imports.update(model.graph.opset_imports)
    return ir.Model(graph, ir_version=model.ir_version, producer_name="subfit-onnx")


def activation_probe(ffn: GraphFFN) -> np.ndarray:
    """Values from -8 to 8, shaped like ``x Wg`` ([batch, seq, d_ff]) in its dtype."""
    d_ff = _matrix_shape(ffn.gate)[1]  # type: ignore[index]
    rank = len(ffn.gate_out.shape) if ffn.gate_out.shape is not None else 3
    dtype = (ffn.gate_out.dtype or ir.DataType.FLOAT).numpy()
    values = np.linspace(-8.0, 8.0, PROBE_ROWS * d_ff).reshape(PROBE_ROWS, d_ff)
    return values.reshape((1,) * (rank - 2) + values.shape).astype(dtype)


def identify_activation(probe: np.ndarray, activated: np.ndarray) -> str | None:
    """The ``gated_ffn.ACTIVATIONS`` entry that maps ``probe`` to ``activated``; None when none does (the FFN then
    keeps the linear bypass)."""
    x = probe.astype(np.float64)
    tolerance = ACTIVATION_TOLERANCE * max(1.0, float(np.abs(activated).max()))
    if probe.dtype == np.float16:
        tolerance *= FP16_SLACK
    for name, function in ACTIVATIONS.items():
        if np.abs(function(x) - activated.astype(np.float64)).max() <= tolerance:
            return name
    return None
