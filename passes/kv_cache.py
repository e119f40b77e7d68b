"""Take a bypassed attention's KV cache out of the model's signature.

Two steps with dead-node elimination between them. First the ``present.N.*`` outputs go, which leaves the
attention's K/V projections and cache Concat dead. Once those are eliminated, any remaining reader of
``past_key_values.N.*`` is a bookkeeping one: the export reads the past length off ``past_key_values.0.key``
(``/model/Shape``) for the causal mask and, in Gemma-2, the positions. Those readers are moved to a kept
layer's past of the same role (every layer caches the same length), or, when no attention is left at all,
are given the shape ``[batch, heads, past, head_dim]`` computed from ``attention_mask`` and ``input_ids``.
Optimum finds KV inputs by name and never counts layers, so the gaps this leaves in layer numbers are fine.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from ..architectures import GRAPH_LAYOUTS, GraphLayout
from ..errors import UnsupportedModelError
from ..names import KV, KV_ROLES, KVNames
from .graph_tools import consumers, in_scope

_SUBSTITUTE_SCOPE = "/subfit/past_shape/"


class DropPresentOutputsPass(ir.passes.InPlacePass):
    """Remove ``present.N.key`` and ``present.N.value`` for each listed layer from the graph outputs."""

    def __init__(self, layers: Iterable[int], kv: KVNames = KV) -> None:
        super().__init__()
        self.layers = sorted(set(layers))
        self.kv = kv

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = {self.kv.present_name(i, role) for i in self.layers for role in KV_ROLES}
        outputs = model.graph.outputs
        missing = names - {v.name for v in outputs}
        if missing:
            raise UnsupportedModelError(f"the graph has no output {min(missing)} to remove")
        kept = [v for v in outputs if v.name not in names]
        outputs.clear()
        outputs.extend(kept)
        return ir.passes.PassResult(model, modified=bool(names))


def _int64(graph: ir.Graph, name: str, values: list[int]) -> ir.Value:
    data = np.asarray(values, dtype=np.int64)
    value = ir.Value(name=name, shape=ir.Shape(data.shape), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(data, name=name))
    graph.register_initializer(value)
    return value


def _past_shape_from_mask(graph: ir.Graph, past: ir.Value, before: ir.Node) -> ir.Value:
    """``[batch, heads, attention_mask length - input_ids length, head_dim]``, inserted before ``before``."""
    inputs = {v.name: v for v in graph.inputs}
    shape = past.shape
    if "attention_mask" not in inputs or shape is None or len(shape) != 4 \
            or not isinstance(shape[1], int) or not isinstance(shape[3], int):
        raise UnsupportedModelError(
            f"{past.name} still sets the past length but no attention is left to take it from, and it cannot be "
            "computed from attention_mask (no attention_mask input or no static heads/head_dim)"
        )
    nodes: list[ir.Node] = []

    def op(op_type: str, args: list[ir.Value], **attrs: int) -> ir.Value:
        name = f"{_SUBSTITUTE_SCOPE}{past.name}/{op_type}_{len(nodes)}"
        node = ir.Node("", op_type, args, [ir.Attr(k, ir.AttributeType.INT, v) for k, v in attrs.items()],
                       name=name, num_outputs=1)
        node.outputs[0].name = f"{name}_output_0"
        nodes.append(node)
        return node.outputs[0]

    prefix = f"subfit.past_shape.{past.name}"
    batch = op("Shape", [inputs["input_ids"]], start=0, end=1)
    seq = op("Shape", [inputs["input_ids"]], start=1, end=2)
    total = op("Shape", [inputs["attention_mask"]], start=1, end=2)
    length = op("Sub", [total, seq])
    heads = _int64(graph, f"{prefix}.heads", [shape[1]])
    head_dim = _int64(graph, f"{prefix}.head_dim", [shape[3]])
    result = op("Concat", [batch, heads, length, head_dim], axis=0)
    graph.insert_before(before, nodes)
    return result


def _replace_shape_readers(graph: ir.Graph, past: ir.Value) -> None:
    """Every reader must be a Shape node; each gets the computed shape (sliced as its start/end ask)."""
    readers = consumers(past)
    others = sorted({n.op_type for n in readers if n.op_type != "Shape"})
    if others:
        raise UnsupportedModelError(
            f"{past.name} still feeds {', '.join(others)} after every attention was removed; only Shape readers "
            "can be rewired"
        )
    first = min(readers, key=graph.index)
    full = _past_shape_from_mask(graph, past, first)
    for reader in readers:
        start = reader.attributes["start"].as_int() if "start" in reader.attributes else 0
        end = reader.attributes["end"].as_int() if "end" in reader.attributes else None
        if (start, end) in ((0, None), (0, 4), (-4, None)):
            replacement = full
        else:
            name = f"{_SUBSTITUTE_SCOPE}{past.name}/{reader.name.strip('/').replace('/', '_')}"
            starts = _int64(graph, f"{name}.starts", [start])
            ends = _int64(graph, f"{name}.ends", [4 if end is None else end])
            node = ir.Node("", "Slice", [full, starts, ends], name=f"{name}/Slice", num_outputs=1)
            node.outputs[0].name = f"{name}/Slice_output_0"
            graph.insert_after(full.producer(), node)
            replacement = node.outputs[0]
        reader.outputs[0].replace_all_uses_with(replacement, replace_graph_outputs=True)
        graph.remove(reader, safe=True)


class DropPastInputsPass(ir.passes.InPlacePass):
    """Remove ``past_key_values.N.*`` inputs of the listed layers, moving any remaining readers elsewhere.

    Run after ``DropPresentOutputsPass`` and dead-node elimination: a reader still inside the layer's own scope
    (``layout``'s, or any known layout's when not given) means the attention was not bypassed, and is refused.
    """

    def __init__(self, layers: Iterable[int], layout: GraphLayout | None = None) -> None:
        super().__init__()
        self.layers = sorted(set(layers))
        self.layouts = (layout,) if layout is not None else GRAPH_LAYOUTS
        self.kv = layout.kv if layout is not None else KV

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        dropped = {self.kv.past_name(i, role) for i in self.layers for role in KV_ROLES}
        missing = sorted(dropped - set(inputs))
        if missing:
            raise UnsupportedModelError(f"the graph has no input {missing[0]} to remove")
        for layer in self.layers:
            for role in KV_ROLES:
                past = inputs[self.kv.past_name(layer, role)]
                if not past.uses():
                    continue
                scopes = {row.layer_scope.format(i=layer) for row in self.layouts}
                own = [n.name for n in consumers(past) if any(in_scope(n, s) for s in scopes)]
                if own:
                    raise UnsupportedModelError(
                        f"{past.name} still feeds its own layer ({own[0]}); bypass the attention, drop its present "
                        "outputs and remove dead nodes first"
                    )
                kept = sorted(kv[1] for name in inputs if name not in dropped
                              and (kv := self.kv.parse(name)) and kv[0] == "past" and kv[2] == role)
                if kept:  # the lowest kept layer's past of the same role (key or value)
                    past.replace_all_uses_with(inputs[self.kv.past_name(kept[0], role)])
                else:
                    _replace_shape_readers(graph, past)
        remaining = [v for v in graph.inputs if v.name not in dropped]
        graph.inputs.clear()
        graph.inputs.extend(remaining)
        return ir.passes.PassResult(model, modified=bool(dropped))
