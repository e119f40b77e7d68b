"""Where each layer's attention and FFN sit in a decoder export, found by name scope and then proven.

A name scope alone is a guess: TorchScript names nodes after the module that emitted them, but a graph that was
optimised, fused or exported another way keeps some names and loses others. A unit therefore counts only when
its boundary checks out: exactly one value from its pre-norm's scope flows in, and its result (through its
post-norm for Gemma-2 style layers, and through any dtype Cast) is one operand of a residual ``Add`` at layer
level (or the node its layout row names instead) whose other operand is the stream that entered the pre-norm. Operands are told apart by producer, never by
position (GPT-2 puts the residual second). Anything else is refused with one line naming what was expected.

What to look for comes from the rows of ``architectures.GRAPH_LAYOUTS`` (scopes, residual ops, KV names), tried
in order; nothing here names a family or an exporter. The table holds Optimum's ``text-generation-with-past``
export and onnxruntime-genai's model-builder graph (whose residual is the next SkipSimplifiedLayerNormalization's
skip input); what is refused, and why: graphs quantized or built by other tools (``graph_kinds`` names each),
ONNX Runtime-fused graphs (``com.microsoft`` ops no layout row is made of hide the units), legacy merged decoders (``If`` on
``use_cache_branch``), encoders and other non-LLM graphs (no ``logits``), and exports without a KV cache
(re-export with the ``-with-past`` task, so the rewritten model keeps incremental decoding).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from ..architectures import GRAPH_LAYOUTS, UNIT_KINDS, GraphLayout, UnitKind, family_for
from ..errors import UnsupportedModelError
from ..names import KVNames
from .graph_kinds import unreadable_reason
from .graph_tools import consumers, direct_child, in_scope, value_dtype

BYPASS_SCOPE = "subfit/"  # inserted bypass nodes live in <unit scope>subfit/
FUSED_DOMAINS = ("com.microsoft",)


@dataclass
class UnitBoundary:
    """One attention or FFN: what flows in (the bypass input) and which residual operand it produces."""

    layer: int
    kind: UnitKind
    scope: str
    norm_output: ir.Value | None = field(repr=False)  # None only for a constant (bias-only) bypass
    residual_add: ir.Node = field(repr=False)
    unit_operand: int  # index of the residual Add's input that carries this unit's contribution
    params: int
    bypassed: bool
    input_dtype: ir.DataType | None
    output_dtype: ir.DataType | None

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "scope": self.scope, "params": self.params,
                "bypassed": self.bypassed,
                "input": self.norm_output.name if self.norm_output is not None else None,
                "residual_add": self.residual_add.name}


@dataclass
class LayerKV:
    """The KV-cache graph inputs and outputs of one layer; absent once its attention is bypassed."""

    past_key: str
    past_value: str
    present_key: str
    present_value: str


@dataclass
class LayerStructure:
    index: int
    attention: UnitBoundary
    mlp: UnitBoundary
    kv: LayerKV | None

    def unit(self, kind: UnitKind) -> UnitBoundary:
        return self.attention if kind == "attention" else self.mlp


@dataclass
class DecoderStructure:
    """Everything the rewrite and ``inspect`` need to know about one decoder export.

    Found once (``find_decoder_structure``) and handed to the passes; ``set_unit`` keeps it true when a pass
    replaces a unit (``InsertBypassPass`` returns the new boundaries).
    """

    family: str
    family_candidates: tuple[str, ...]
    family_from_config: bool  # False: several families share this layout and the first was named
    layout: GraphLayout
    hidden_size: int
    dtype: ir.DataType | None  # of the weights (the embedding table); fp16 exports keep some math in fp32
    kv_dtype: ir.DataType | None
    num_kv_heads: int | None
    head_dim: int | None
    layers: list[LayerStructure]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_scope(self) -> str:
        return self.layout.layer_scope

    def unit(self, layer: int, kind: UnitKind) -> UnitBoundary:
        return self.layers[layer].unit(kind)

    def set_unit(self, unit: UnitBoundary) -> None:
        layer = self.layers[unit.layer]
        if unit.kind == "attention":
            layer.attention = unit
        else:
            layer.mlp = unit

    def units(self) -> list[UnitBoundary]:
        return [layer.unit(kind) for layer in self.layers for kind in UNIT_KINDS]

    def bypassed_units(self) -> list[UnitBoundary]:
        return [u for u in self.units() if u.bypassed]

    def kv_layers(self) -> list[int]:
        return [layer.index for layer in self.layers if layer.kv is not None]

    def kv_bytes_per_token(self) -> int | None:
        """Cache bytes each generated token adds (keys and values, all kept layers, one sequence)."""
        if not self.kv_layers():
            return 0
        if self.num_kv_heads is None or self.head_dim is None or self.kv_dtype is None:
            return None
        return int(2 * len(self.kv_layers()) * self.num_kv_heads * self.head_dim * self.kv_dtype.itemsize)

    def summary(self) -> dict[str, Any]:
        """Plain data for printing and JSON (``subfit-onnx inspect``)."""
        return {
            "family": self.family,
            "family_candidates": list(self.family_candidates),
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "dtype": self.dtype.name if self.dtype is not None else None,
            "kv_dtype": self.kv_dtype.name if self.kv_dtype is not None else None,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "kv_layers": self.kv_layers(),
            "kv_bytes_per_token": self.kv_bytes_per_token(),
            "units": [u.summary() for u in self.units()],
        }


class _Refusal(Exception):
    """A layout did not fit; carries the one-line reason for the user."""


def contrib_ops(graph: ir.Graph) -> Counter[str]:
    return Counter(n.op_type for n in graph if n.domain in FUSED_DOMAINS)


def check_plain_decoder(model: ir.Model, layouts: tuple[GraphLayout, ...] = GRAPH_LAYOUTS) -> None:
    """Refuse, by inputs, outputs and operator domains alone, graphs that are no decoder export SubFit reads.

    Fused operators are refused unless a layout row is made of them (the model builder's). The KV cache is checked
    once the layers are known (a graph whose every attention was bypassed has none).
    """
    graph = model.graph
    reason = unreadable_reason(model, layouts)
    if reason is not None:
        raise UnsupportedModelError(reason)
    fused = contrib_ops(graph)
    if fused and not any(row.reads(set(fused)) for row in layouts):
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(fused.items()))
        raise UnsupportedModelError(
            f"the graph was already optimized by ONNX Runtime (fused nodes: {ops}); fused nodes lose the layer "
            "names SubFit needs. Run SubFit on the plain Optimum export, then ORTOptimizer on SubFit's output"
        )
    inputs = {v.name for v in graph.inputs}
    outputs = {v.name for v in graph.outputs}
    if "use_cache_branch" in inputs or any(n.op_type == "If" for n in graph):
        raise UnsupportedModelError(
            "this is a legacy merged decoder (If on use_cache_branch); re-export with optimum-onnx's "
            "text-generation-with-past task, which gives one model.onnx without If branches"
        )
    if "logits" not in outputs or "input_ids" not in inputs:
        kind = "an encoder or feature-extraction export" if "last_hidden_state" in outputs else "not a decoder LLM"
        raise UnsupportedModelError(
            f"the graph is {kind}: expected an input_ids input and a logits output "
            f"(outputs: {', '.join(sorted(outputs)[:4]) or 'none'})"
        )


def _holds_units(nodes: list[ir.Node], layer: int, rows: list[GraphLayout]) -> bool:
    return any(in_scope(n, row.layer_scope.format(i=layer) + row.unit(kind).module + "/")
               for n in nodes for row in rows for kind in UNIT_KINDS)


def _layer_nodes(graph: ir.Graph, layouts: tuple[GraphLayout, ...]) -> tuple[str, dict[int, list[ir.Node]]]:
    """The layer-scope template the graph uses and its nodes grouped by layer index.

    A last scope holding no unit is not a layer: the model builder puts its final norm at ``/model/layers.N/``.
    """
    for template in dict.fromkeys(row.layer_scope for row in layouts):
        pattern = re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)"))
        grouped: dict[int, list[ir.Node]] = {}
        for node in graph:
            m = pattern.match(node.name or "")
            if m:
                grouped.setdefault(int(m.group(1)), []).append(node)
        rows = [row for row in layouts if row.layer_scope == template]
        if grouped and not _holds_units(grouped[max(grouped)], max(grouped), rows):
            del grouped[max(grouped)]
        if grouped:
            count = len(grouped)
            if sorted(grouped) != list(range(count)):
                raise UnsupportedModelError(
                    f"decoder layers under {template} are not numbered 0..{count - 1} (found {sorted(grouped)[:8]})"
                )
            return template, grouped
    scopes = ", ".join(dict.fromkeys(row.layer_scope.replace("{i}", "N") for row in layouts))
    raise UnsupportedModelError(f"no decoder layers found: expected node name scopes {scopes} (an Optimum export)")


def _through_casts(value: ir.Value, layer_scope: str) -> list[ir.Value]:
    """``value`` and what it was cast from by layer-level Casts (fp16 exports widen the stream)."""
    chain = [value]
    node = value.producer()
    while node is not None and node.op_type == "Cast" and direct_child(node, layer_scope) and node.inputs[0] is not None:
        chain.append(node.inputs[0])
        node = node.inputs[0].producer()
    return chain


def unit_params(nodes: list[ir.Node]) -> int:
    """Weight matrices the unit's MatMul/Gemm nodes read (norms and biases excluded, as in calibration); a
    quantized ``MatMulNBits`` counts its unquantized K x N matrix."""
    seen: dict[str, int] = {}
    for node in nodes:
        if node.op_type == "MatMulNBits" and node.inputs[1] is not None:
            seen[node.inputs[1].name] = node.attributes["K"].as_int() * node.attributes["N"].as_int()
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for inp in node.inputs:
            if inp is not None and inp.const_value is not None and len(inp.const_value.shape) >= 2:
                seen[inp.name] = inp.const_value.size
    return sum(seen.values())


def bypass_params(nodes: list[ir.Node]) -> int:
    """Every constant a SubFit bypass reads, its bias included: the count the plan records for it."""
    seen = {inp.name: inp.const_value.size for node in nodes for inp in node.inputs
            if inp is not None and inp.const_value is not None}
    return sum(seen.values())


def _residual_adds(nodes: list[ir.Node], layer_scope: str, unit_scope: str, row: GraphLayout, from_unit,
                   is_stream) -> list[tuple[ir.Node, int]]:
    """Residual nodes with one added operand from the unit and the other the stream; (node, unit operand index).

    Never a node of the unit itself (a bypass ends in an Add of its own)."""
    found = []
    for node in nodes:
        if node.op_type not in row.residual_ops or (row.residual_in_layer and not direct_child(node, layer_scope)):
            continue
        if in_scope(node, unit_scope):
            continue
        if row.residual_in_layer and len(node.inputs) != 2:
            continue
        i, j = row.residual_inputs
        if max(i, j) >= len(node.inputs) or node.inputs[i] is None or node.inputs[j] is None:
            continue
        for unit_index, stream_index in ((i, j), (j, i)):
            if any(from_unit(v) for v in _through_casts(node.inputs[unit_index], layer_scope)) and \
                    any(is_stream(v) for v in _through_casts(node.inputs[stream_index], layer_scope)):
                found.append((node, unit_index))
    return found


def _resolve_unit(layer: int, kind: UnitKind, row: GraphLayout, nodes: list[ir.Node],
                  residual_candidates: list[ir.Node]) -> UnitBoundary:
    names = row.unit(kind)
    layer_scope = row.layer_scope.format(i=layer)
    scope = f"{layer_scope}{names.module}/"
    bypass_scope = scope + BYPASS_SCOPE
    norm_scope = f"{layer_scope}{names.pre_norm}/"
    post_scope = f"{layer_scope}{names.post_norm}/" if names.post_norm else None
    unit_nodes = [n for n in nodes if in_scope(n, scope)]
    bypass_nodes = [n for n in unit_nodes if in_scope(n, bypass_scope)]
    what = f"layer {layer} {kind}"
    if not unit_nodes:
        raise _Refusal(f"{what}: no nodes under {scope}")

    readers = bypass_nodes or unit_nodes
    fed = {id(v): v for n in readers for v in n.inputs if v is not None and in_scope(v.producer(), norm_scope)}
    if len(fed) > 1 or (not fed and not bypass_nodes):  # a constant bypass reads nothing
        raise _Refusal(f"{what}: expected exactly one value from {norm_scope} into {scope}, found {len(fed)}")
    norm_output = next(iter(fed.values()), None)

    if bypass_nodes:  # written by InsertBypassPass: trust its own wiring
        adds = _residual_adds(residual_candidates, layer_scope, scope, row, lambda v: in_scope(v.producer(), bypass_scope),
                              lambda v: True)
    else:
        def from_unit(value: ir.Value) -> bool:
            producer = value.producer()
            return in_scope(producer, scope) or (post_scope is not None and in_scope(producer, post_scope))

        def enters_norm(value: ir.Value) -> bool:
            return in_scope(value.producer(), norm_scope) or any(in_scope(u, norm_scope) for u in consumers(value))

        adds = _residual_adds(residual_candidates, layer_scope, scope, row, from_unit, enters_norm)
    if len(adds) != 1:
        raise _Refusal(
            f"{what}: expected one residual {'/'.join(row.residual_ops)} "
            f"{'in ' + layer_scope + ' ' if row.residual_in_layer else ''}adding {scope}'s output to the stream "
            f"that enters {norm_scope}, found {len(adds)}"
        )
    add, unit_operand = adds[0]
    return UnitBoundary(
        layer=layer, kind=kind, scope=scope, norm_output=norm_output, residual_add=add, unit_operand=unit_operand,
        params=bypass_params(bypass_nodes) if bypass_nodes else unit_params(unit_nodes),
        bypassed=bool(bypass_nodes),
        input_dtype=value_dtype(norm_output) if norm_output is not None else None,
        output_dtype=value_dtype(add.inputs[unit_operand]),
    )


def _layer_kv(graph: ir.Graph, layer: int, attention: UnitBoundary, kv: KVNames) -> LayerKV | None:
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name for v in graph.outputs}
    names = LayerKV(kv.past_name(layer, "key"), kv.past_name(layer, "value"), kv.present_name(layer, "key"),
                    kv.present_name(layer, "value"))
    present = [n in inputs for n in (names.past_key, names.past_value)] + \
              [n in outputs for n in (names.present_key, names.present_value)]
    if not any(present):
        return None
    if not all(present):
        raise _Refusal(f"layer {layer}: its KV cache is incomplete (needs {kv.past}.{layer}.key/value "
                       f"inputs and {kv.present}.{layer}.key/value outputs)")
    for name in (names.past_key, names.past_value):
        if not any(in_scope(u, attention.scope) for u in consumers(inputs[name])):
            raise _Refusal(f"layer {layer}: {name} does not feed {attention.scope}")
    return names


def _resolve_layers(graph: ir.Graph, row: GraphLayout, grouped: dict[int, list[ir.Node]]) -> list[LayerStructure]:
    layers = []
    everywhere = [n for n in graph if n.op_type in row.residual_ops] if not row.residual_in_layer else None
    for i in range(len(grouped)):
        attention = _resolve_unit(i, "attention", row, grouped[i], everywhere or grouped[i])
        mlp = _resolve_unit(i, "mlp", row, grouped[i], everywhere or grouped[i])
        layers.append(LayerStructure(index=i, attention=attention, mlp=mlp, kv=_layer_kv(graph, i, attention, row.kv)))
    extra = sorted({kv[1] for v in [*graph.inputs, *graph.outputs]
                    if (kv := row.kv.parse(v.name or ""))} - set(range(len(grouped))))
    if extra:
        raise _Refusal(f"KV cache names for layers {extra} but the graph has {len(grouped)} layers")
    return layers


def _embedding_width(graph: ir.Graph) -> tuple[int, ir.DataType] | None:
    """Hidden size and dtype of the token embedding: a 2-D initializer gathered by input_ids (GPT-2 reshapes the
    ids first; the model builder gathers a tied lm_head's transpose)."""
    frontier = [next(v for v in graph.inputs if v.name == "input_ids")]
    for _ in range(4):
        following = []
        for value in frontier:
            for user in consumers(value):
                table = user.inputs[0]
                transposed = table is not None and table.producer() is not None \
                    and table.producer().op_type == "Transpose"
                if transposed:
                    table = table.producer().inputs[0]
                if user.op_type == "Gather" and table is not None and table.const_value is not None \
                        and len(table.const_value.shape) == 2 and user.inputs[1] is value:
                    return int(table.const_value.shape[0 if transposed else 1]), table.const_value.dtype
                if user.op_type in ("Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten") and user.inputs[0] is value:
                    following.extend(user.outputs)
        frontier = following
    return None


def _model_width(graph: ir.Graph, layers: list[LayerStructure]) -> tuple[int, ir.DataType]:
    """Hidden size and weight dtype: the embedding's, else (a quantized embedding) layer 0's input-norm weight's."""
    found = _embedding_width(graph)
    if found is not None:
        return found
    norm = layers[0].attention.norm_output.producer() if layers[0].attention.norm_output is not None else None
    weights = [v.const_value for v in (norm.inputs if norm is not None else ())
               if v is not None and v.const_value is not None and len(v.const_value.shape) == 1]
    if not weights:
        raise UnsupportedModelError("no token embedding found (a Gather of a 2-D initializer by input_ids)")
    return int(weights[0].shape[0]), weights[0].dtype


def _head_dim_from_attention(graph: ir.Graph, past: ir.Value) -> int | None:
    """Head size from the fused attention op reading ``past`` (``num_heads`` attribute) and the width of the
    output projection reading its result, for graphs whose past shape leaves it symbolic."""
    for user in consumers(past):
        if "num_heads" not in user.attributes:
            continue
        heads = user.attributes["num_heads"].as_int()
        for proj in consumers(user.outputs[0]):
            if proj.op_type == "MatMulNBits":
                return proj.attributes["K"].as_int() // heads
            weight = proj.inputs[1] if proj.op_type == "MatMul" else None
            if weight is not None and weight.const_value is not None:
                return int(weight.const_value.shape[0]) // heads
    return None


def _kv_dims(graph: ir.Graph, layers: list[LayerStructure]) -> tuple[int | None, int | None]:
    """Static KV heads and head size, from the declared past shape [batch, heads, past, head_dim]."""
    inputs = {v.name: v for v in graph.inputs}
    for layer in layers:
        if layer.kv is not None:
            shape = inputs[layer.kv.past_key].shape
            if shape is not None and len(shape) == 4:
                heads, dim = shape[1], shape[3]
                if not isinstance(dim, int):
                    dim = _head_dim_from_attention(graph, inputs[layer.kv.past_key])
                return (heads if isinstance(heads, int) else None), dim
    return None, None


def _kv_dtype(graph: ir.Graph, layers: list[LayerStructure]) -> ir.DataType | None:
    inputs = {v.name: v for v in graph.inputs}
    return next((inputs[layer.kv.past_key].dtype for layer in layers if layer.kv is not None), None)


def find_decoder_structure(model: ir.Model, model_type: str | None = None,
                           layouts: tuple[GraphLayout, ...] = GRAPH_LAYOUTS) -> DecoderStructure:
    """Locate and check every unit of a decoder export, trying the graph-layout rows in order.

    ``model_type`` (from the export's config.json) picks the family when several share one graph layout
    (llama, mistral, qwen2, phi3 and gemma do); without it the first matching family is named and the rest are
    kept in ``family_candidates``.
    """
    graph = model.graph
    check_plain_decoder(model, layouts)
    fused = set(contrib_ops(graph))
    layouts = tuple(row for row in layouts if row.reads(fused))
    template, grouped = _layer_nodes(graph, layouts)
    wanted = family_for(model_type).name if model_type else None
    outcomes: list[tuple[GraphLayout, list[LayerStructure] | str]] = []
    for row in layouts:
        if row.layer_scope != template:
            continue
        try:
            outcomes.append((row, _resolve_layers(graph, row, grouped)))
        except _Refusal as exc:
            outcomes.append((row, str(exc)))
    found = [(row, layers) for row, layers in outcomes if isinstance(layers, list)]
    candidates = [name for row, _ in found for name in row.families]
    if not found:
        first = min(outcomes, key=lambda outcome: wanted not in outcome[0].families)  # config's family first
        raise UnsupportedModelError(f"unexpected decoder structure: {first[1]}")
    if wanted is not None and wanted not in candidates:
        raise UnsupportedModelError(
            f"config.json says {model_type}, but the graph's layers match {', '.join(candidates)}, not {wanted}"
        )
    row, resolved = next(((r, ls) for r, ls in found if wanted in r.families), found[0])
    if not any(layer.kv for layer in resolved) and not all(layer.attention.bypassed for layer in resolved):
        raise UnsupportedModelError(
            f"the export has no KV cache inputs ({row.kv.past_prefix}*): it was exported for text-generation, not "
            "text-generation-with-past. SubFit rewrites only KV-cache exports, so the result keeps incremental "
            "decoding; pass the PyTorch model as SOURCE (SubFit then exports it itself) or re-export with "
            "`optimum-cli export onnx --task text-generation-with-past`"
        )
    heads, head_dim = _kv_dims(graph, resolved)
    hidden_size, dtype = _model_width(graph, resolved)
    return DecoderStructure(
        family=wanted if wanted is not None else candidates[0],
        family_candidates=tuple(candidates),
        family_from_config=wanted is not None,
        layout=row,
        hidden_size=hidden_size,
        dtype=dtype,
        kv_dtype=_kv_dtype(graph, resolved),
        num_kv_heads=heads,
        head_dim=head_dim,
        layers=resolved,
    )
