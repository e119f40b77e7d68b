"""A gated FFN's matrices and neuron activations, read from an export (the ONNX Runtime backend).

``ffn_bypass`` neurons and auto fit a removed gated FFN with some of its own neurons (``neuron_fit``). That needs
the FFN's gate, up and down matrices and, while its layer runs, its neuron activations (the down projection's
input). The PyTorch backend reads them from the module. In an export they are the constant operands of the
unit's MatMuls, found here by dataflow rather than by name:
- two MatMuls read the unit's input (gate and up), or one whose columns the graph then cuts into both (Phi-3);
- a Mul joins them, with the activation on the gate's side only;
- one MatMul reads that product (down).
Which activation the gate's side computes is found by running that part of the graph on probe values (the runner
cuts it out with ``onnx_cut.extract_model``), not from a config: a model builder's genai_config.json names none.
Any other FFN, or one whose activation SubFit cannot build, keeps the linear bypass, as FFNs the PyTorch backend
cannot read do. That covers quantized ``MatMulNBits`` weights, biases and non-gated FFNs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..gated_ffn import ACTIVATIONS, GatedFFN
from ..passes.graph_tools import consumers, in_scope
from ..passes.structure import BYPASS_SCOPE, UnitBoundary

WEIGHT_OPS = ("MatMul", "Gemm", "MatMulNBits")  # ops that would mean a second projection on the gate's side
MAX_ACTIVATION_VALUES = 64  # values between the gate's MatMul and the Mul: an activation is a handful of ops
PROBE_ROWS = 4  # rows of d_ff probe values
ACTIVATION_TOLERANCE = 1e-4  # silu and gelu_tanh differ by up to 0.2 between -8 and 8; float32 rounding is ~1e-6
FP16_SLACK = 100.0
SELECTION_OPS = ("Slice", "Split", "Gather")  # how a fused gate_up product is cut into its gate and up parts
COLUMN_BASE = 64


@dataclass(frozen=True)
class FusedParts:
    """Gate and up computed by one MatMul (Phi-3's ``gate_up_proj``) and cut apart by the graph's own selections
    (``Slice``, ``Split`` or ``Gather``); which columns each takes is read by running them (``column_probes``)."""

    product: ir.Value  # x @ W, [..., 2 d_ff]
    gate: ir.Value  # the gate's columns of it
    up: ir.Value  # the up's columns of it


@dataclass(frozen=True)
class GraphFFN:
    """The constant matrices of one gated FFN (ONNX layout: ``x @ W``) and the values that hold its neurons.

    With ``fused``, ``gate`` and ``up`` are both the fused ``[d, 2 d_ff]`` matrix, and ``weights`` needs the
    columns each part takes.
    """

    gate: ir.Value  # [d, d_ff]
    up: ir.Value  # [d, d_ff]
    down: ir.Value  # [d_ff, d]
    neurons: ir.Value  # act(x Wg) * (x Wu), the down projection's input
    gate_out: ir.Value  # x Wg
    activated: ir.Value  # act(x Wg), what the join multiplies by x Wu
    fused: FusedParts | None = None

    def weights(self, activation: str, columns: tuple[np.ndarray, np.ndarray] | None = None) -> GatedFFN:
        """As float32 whatever the export's dtype, with ``out_weight`` from the down rows, as the PyTorch
        backend's ``torch_model.gated_ffn`` gives them; ``columns``: the gate's and the up's, when fused."""
        gate, up = _array(self.gate), _array(self.up)
        if columns is not None:
            gate, up = gate[:, columns[0]], up[:, columns[1]]
        down = _array(self.down).astype(np.float64)
        return GatedFFN(gate=np.ascontiguousarray(gate), up=np.ascontiguousarray(up), out_weight=(down * down).sum(1),
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


def _joined(up_value: ir.Value, gate_sources: list[ir.Value], scope: str,
            shape: tuple[int, int]) -> tuple[ir.Node, ir.Value, ir.Value, ir.Value] | None:
    """The Mul that joins ``up_value`` with an activation of one of ``gate_sources``, if the down projection
    (``[d_ff, d]`` for ``shape`` = (d, d_ff)) alone reads it: (join, activated, gate source, down matrix)."""
    uses = consumers(up_value)
    if len(uses) != 1 or uses[0].op_type != "Mul" or len(uses[0].inputs) != 2:
        return None
    join = uses[0]
    activated = join.inputs[1] if join.inputs[0] is up_value else join.inputs[0]
    if activated is None:
        return None
    source = next((s for s in gate_sources if _only_activation_of(activated, s, scope)), None)
    downs = consumers(join.outputs[0])
    if source is None or len(downs) != 1 or downs[0].op_type != "MatMul" or downs[0].inputs[0] is not join.outputs[0] \
            or _matrix_shape(downs[0].inputs[1]) != shape[::-1]:
        return None
    return join, activated, source, downs[0].inputs[1]  # type: ignore[return-value]


def find_gated_ffn(unit: UnitBoundary) -> GraphFFN | None:
    """Unit ``unit``'s gated FFN, or None when it is not one this reads (or is already a bypass)."""
    if unit.kind != "mlp" or unit.bypassed or unit.norm_output is None:
        return None
    scope = unit.scope
    projections = [n for n in _projections(unit.norm_output, scope) if not in_scope(n, scope + BYPASS_SCOPE)]
    shapes = {_matrix_shape(n.inputs[1]) for n in projections}
    if len(projections) == 2 and len(shapes) == 1:
        shape = shapes.pop()
        for up, gate in (projections, projections[::-1]):
            found = _joined(up.outputs[0], [gate.outputs[0]], scope, shape)  # type: ignore[arg-type]
            if found is not None:
                join, activated, source, down = found
                return GraphFFN(gate=gate.inputs[1], up=up.inputs[1], down=down,  # type: ignore[arg-type]
                                neurons=join.outputs[0], gate_out=source, activated=activated)
    if len(projections) == 1 and shapes.pop()[1] % 2 == 0:  # type: ignore[index]
        fused = projections[0]
        d, width = _matrix_shape(fused.inputs[1])  # type: ignore[misc]
        parts = [v for n in consumers(fused.outputs[0]) if n.op_type in SELECTION_OPS and n.inputs[0] is fused.outputs[0]
                 for v in n.outputs]
        for up_part in parts:
            found = _joined(up_part, [p for p in parts if p is not up_part], scope, (d, width // 2))
            if found is not None:
                join, activated, source, down = found
                return GraphFFN(gate=fused.inputs[1], up=fused.inputs[1], down=down,  # type: ignore[arg-type]
                                neurons=join.outputs[0], gate_out=source, activated=activated,
                                fused=FusedParts(product=fused.outputs[0], gate=source, up=up_part))
    return None


def column_probes(fused: FusedParts, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each column's index, as its high and low base-64 digits: a selection of the probes gives each part's
    columns, exactly even in float16 (integers above 2048 are not)."""
    index = np.arange(width)
    dtype = (fused.product.dtype or ir.DataType.FLOAT).numpy()
    rank = len(fused.product.shape) if fused.product.shape is not None else 3
    shape = (1,) * (rank - 1) + (width,)
    return (index // COLUMN_BASE).reshape(shape).astype(dtype), (index % COLUMN_BASE).reshape(shape).astype(dtype)


def read_columns(high: list[np.ndarray], low: list[np.ndarray], d_ff: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The gate's and the up's columns from the selections of ``column_probes``; None unless each part is d_ff
    distinct columns."""
    if len(high) != 2 or len(low) != 2 or any(h.shape != lo.shape for h, lo in zip(high, low)):
        return None
    columns = [(np.rint(h).astype(np.int64) * COLUMN_BASE + np.rint(lo).astype(np.int64)).reshape(-1)
               for h, lo in zip(high, low)]
    if any(c.size != d_ff or np.unique(c).size != d_ff for c in columns):
        return None
    return columns[0], columns[1]


def activation_probe(ffn: GraphFFN) -> np.ndarray:
    """Values from -8 to 8, shaped like ``x Wg`` ([batch, seq, d_ff]) in its dtype."""
    d_ff = _matrix_shape(ffn.down)[0]  # type: ignore[index]
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
