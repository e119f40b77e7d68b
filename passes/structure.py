"""Where each layer's attention and FFN sit in a decoder export, found by name scope and then proven.

A name scope alone is a guess: TorchScript names nodes after the module that emitted them, but a graph that was
optimised, fused or exported another way keeps some names and loses others. A unit therefore counts only when
its boundary checks out: exactly one value from its pre-norm's scope flows in, and its result (through its
post-norm for Gemma-2 style layers, and through any dtype Cast) is one operand of a residual ``Add`` at layer
level whose other operand is the stream that entered the pre-norm. Operands are told apart by producer, never by
position (GPT-2 puts the residual second). Anything else is refused with one line naming what was expected.

What to look for comes from the rows of ``architectures.GRAPH_LAYOUTS`` (scopes, residual ops, KV names), tried
in order; nothing here names a family or an exporter. Optimum's ``text-generation-with-past`` export is the
layout in the table today; what is refused, and why:
ONNX Runtime-fused graphs (``com.microsoft`` ops hide the units), legacy merged decoders (``If`` on
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


def check_plain_decoder(model: ir.Model) -> None:
    """Refuse, by inputs, outputs and operator domains alone, graphs that are no plain decoder export.

    The KV cache is checked once the layers are known (a graph whose every attention was bypassed has none).
    """
    graph = model.graph
    fused = Counter(n.op_type for n in graph if n.domain in FUSED_DOMAINS)
    if fused:
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


def _layer_nodes(graph: ir.Graph, layouts: tuple[GraphLayout, ...]) -> tuple[str, dict[int, list[ir.Node]]]:
    """The layer-scope template the graph uses and its nodes grouped by layer index."""
    for template in dict.fromkeys(row.layer_scope for row in layouts):
        pattern = re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)"))
        grouped: dict[int, list[ir.Node]] = {}
        for node in graph:
            m = pattern.match(node.name or "")
            if m:
                grouped.setdefault(int(m.group(1)), []).append(node)
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
    """Weight matrices the unit's MatMul/Gemm nodes read (norms and biases excluded, as in calibration)."""
    seen: dict[str, int] = {}
    for node in nodes:
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


def _residual_adds(nodes: list[ir.Node], layer_scope: str, ops: tuple[str, ...], from_unit,
                   is_stream) -> list[tuple[ir.Node, int]]:
    """Layer-level residual nodes with one operand from the unit and the other the stream; (node, unit operand)."""
    found = []
    for node in nodes:
        if node.op_type not in ops or not direct_child(node, layer_scope) or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if a is None or b is None:
            continue
        for idx, (unit_in, resid) in enumerate(((a, b), (b, a))):
            if any(from_unit(v) for v in _through_casts(unit_in, layer_scope)) and \
                    any(is_stream(v) for v in _through_casts(resid, layer_scope)):
                found.append((node, idx))
    return found


def _resolve_unit(layer: int, kind: UnitKind, row: GraphLayout, nodes: list[ir.Node]) -> UnitBoundary:
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
        adds = _residual_adds(nodes, layer_scope, row.residual_ops, lambda v: in_scope(v.producer(), bypass_scope),
                              lambda v: True)
    else:
        def from_unit(value: ir.Value) -> bool:
            producer = value.producer()
            return in_scope(producer, scope) or (post_scope is not None and in_scope(producer, post_scope))

        def enters_norm(value: ir.Value) -> bool:
            return in_scope(value.producer(), norm_scope) or any(in_scope(u, norm_scope) for u in consumers(value))

        adds = _residual_adds(nodes, layer_scope, row.residual_ops, from_unit, enters_norm)
    if len(adds) != 1:
        raise _Refusal(
            f"{what}: expected one residual Add in {layer_scope} adding {scope}'s output to the stream that "
            f"enters {norm_scope}, found {len(adds)}"
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
    for i in range(len(grouped)):
        attention = _resolve_unit(i, "attention", row, grouped[i])
        mlp = _resolve_unit(i, "mlp", row, grouped[i])
        layers.append(LayerStructure(index=i, attention=attention, mlp=mlp, kv=_layer_kv(graph, i, attention, row.kv)))
    extra = sorted({kv[1] for v in [*graph.inputs, *graph.outputs]
                    if (kv := row.kv.parse(v.name or ""))} - set(range(len(grouped))))
    if extra:
        raise _Refusal(f"KV cache names for layers {extra} but the graph has {len(grouped)} layers")
    return layers


def _embedding_table(graph: ir.Graph) -> ir.TensorProtocol:
    """The token embedding: a 2-D initializer gathered by input_ids (GPT-2 reshapes the ids first)."""
    frontier = [next(v for v in graph.inputs if v.name == "input_ids")]
    for _ in range(4):
        following = []
        for value in frontier:
            for user in consumers(value):
                table = user.inputs[0]
                if user.op_type == "Gather" and table is not None and table.const_value is not None \
                        and len(table.const_value.shape) == 2 and user.inputs[1] is value:
                    return table.const_value
                if user.op_type in ("Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten") and user.inputs[0] is value:
                    following.extend(user.outputs)
        frontier = following
    raise UnsupportedModelError("no token embedding found (a Gather of a 2-D initializer by input_ids)")


def _kv_dims(graph: ir.Graph, layers: list[LayerStructure]) -> tuple[int | None, int | None]:
    """Static KV heads and head size, from the declared past shape [batch, heads, past, head_dim]."""
    inputs = {v.name: v for v in graph.inputs}
    for layer in layers:
        if layer.kv is not None:
            shape = inputs[layer.kv.past_key].shape
            if shape is not None and len(shape) == 4:
                heads, dim = shape[1], shape[3]
                return (heads if isinstance(heads, int) else None), (dim if isinstance(dim, int) else None)
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
    check_plain_decoder(model)
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
    table = _embedding_table(graph)
    return DecoderStructure(
        family=wanted if wanted is not None else candidates[0],
        family_candidates=tuple(candidates),
        family_from_config=wanted is not None,
        layout=row,
        hidden_size=int(table.shape[1]),
        dtype=table.dtype,
        kv_dtype=_kv_dtype(graph, resolved),
        num_kv_heads=heads,
        head_dim=head_dim,
        layers=resolved,
    )
