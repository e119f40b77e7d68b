"""Small graph queries the passes share: name scopes and element types of values.

TorchScript exports carry element types only on graph inputs, outputs and initializers, and the rewrite needs
the type of two interior values per unit (the norm output it reads and the residual operand it replaces).
Running ONNX shape inference over a billion-parameter graph for two facts is wasteful, so the type is followed
back through producers instead; ops whose output type is fixed or taken from a given input are listed.
"""

from __future__ import annotations

import onnx_ir as ir

# op -> index of the input whose element type the output shares
_SAME_TYPE_AS_INPUT: dict[str, int] = {
    "Add": 0, "Sub": 0, "Mul": 0, "Div": 0, "Pow": 0, "Neg": 0, "Sqrt": 0, "Reciprocal": 0, "Abs": 0,
    "MatMul": 0, "Gemm": 0, "Reshape": 0, "Transpose": 0, "Squeeze": 0, "Unsqueeze": 0, "Flatten": 0,
    "Slice": 0, "Gather": 0, "Concat": 0, "Expand": 0, "Identity": 0, "Softmax": 0, "Tanh": 0, "Sigmoid": 0,
    "Erf": 0, "Relu": 0, "Gelu": 0, "LayerNormalization": 0, "SimplifiedLayerNormalization": 0,
    "ReduceMean": 0, "ReduceSum": 0,
    # ONNX Runtime contrib ops of model-builder graphs (ONNX shape inference does not type their outputs)
    "SkipSimplifiedLayerNormalization": 0, "MatMulNBits": 0, "GroupQueryAttention": 0, "GatherBlockQuantized": 2, "Max": 0, "Min": 0, "Where": 1, "Split": 0, "Tile": 0, "Cos": 0, "Sin": 0,
}
_FIXED_TYPE: dict[str, ir.DataType] = {"Shape": ir.DataType.INT64, "Size": ir.DataType.INT64,
                                       "Equal": ir.DataType.BOOL, "Less": ir.DataType.BOOL,
                                       "Greater": ir.DataType.BOOL, "Not": ir.DataType.BOOL}


def value_dtype(value: ir.Value) -> ir.DataType | None:
    """The element type of ``value``, declared or followed back through its producers; None when unknown."""
    seen = 0
    current: ir.Value | None = value
    while current is not None and seen < 10_000:
        seen += 1
        if current.dtype is not None:
            return current.dtype
        if current.const_value is not None:
            return current.const_value.dtype
        node = current.producer()
        if node is None:
            return None
        if node.op_type == "Cast":
            return ir.DataType(node.attributes["to"].as_int())
        if node.op_type == "Constant" and "value" in node.attributes:
            return node.attributes["value"].as_tensor().dtype
        if node.op_type in _FIXED_TYPE:
            return _FIXED_TYPE[node.op_type]
        index = _SAME_TYPE_AS_INPUT.get(node.op_type)
        if index is None or index >= len(node.inputs):
            return None
        current = node.inputs[index]
    return None


def in_scope(node: ir.Node | None, scope: str) -> bool:
    """Whether ``node`` was exported from the module whose name scope is ``scope`` (ending in ``/``)."""
    return node is not None and bool(node.name) and node.name.startswith(scope)


def direct_child(node: ir.Node, scope: str) -> bool:
    """A node of ``scope`` itself, not of a submodule (``/model/layers.3/Add``, not ``.../mlp/Add``)."""
    return in_scope(node, scope) and "/" not in node.name[len(scope):]


def consumers(value: ir.Value) -> list[ir.Node]:
    return [user for user, _ in value.uses()]
