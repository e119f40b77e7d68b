"""Bring into memory the external tensors that ``onnx_ir.save`` would otherwise leave pointing at old bytes.

``onnx_ir.save(..., external_data=NAME)`` rewrites initializers above its size threshold into the new data file
and loads smaller external initializers inline, but leaves external tensors inside node attributes (a
``Constant``'s value) untouched. Torch puts such a constant's bytes into ``model.onnx_data`` for exports over
2 GB; saved beside a new ``model.onnx_data`` it would point at the old offset in the new file, and ONNX Runtime
refuses to load the model. An inline save (no external data) must load every external tensor. Both cases are
small or bounded, so loading them keeps the rewrite's memory far below the model's size.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir


def _attribute_tensors(model: ir.Model) -> Iterator[tuple[ir.Node, ir.Attr]]:
    """(node, attribute) for every tensor-valued node attribute, subgraphs included."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
                yield node, attr


def _in_memory(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    data = tensor.numpy().copy()  # copy: the mapped file may be replaced by the save that follows
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return ir.Tensor(data, dtype=tensor.dtype, name=tensor.name)


class LoadExternalTensorsPass(ir.passes.InPlacePass):
    """Load external tensors into memory: all attribute tensors, and initializers up to ``max_bytes``.

    ``max_bytes=None`` loads every initializer too (for an inline save); pass the save's size threshold
    otherwise, since ``onnx_ir.save`` rewrites the larger ones itself.
    """

    def __init__(self, max_bytes: int | None = 0) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.loaded_bytes = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for graph in model.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor) and (self.max_bytes is None or tensor.nbytes <= self.max_bytes):
                    value.const_value = _in_memory(tensor)
                    self.loaded_bytes += tensor.nbytes
                    count += 1
        for node, attr in list(_attribute_tensors(model)):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                node.attributes[attr.name] = ir.AttrTensor(attr.name, _in_memory(attr.value))
                self.loaded_bytes += attr.value.nbytes
                count += 1
            elif attr.type == ir.AttributeType.TENSORS and any(isinstance(t, ir.ExternalTensor) for t in attr.value):
                tensors = [_in_memory(t) if isinstance(t, ir.ExternalTensor) else t for t in attr.value]
                self.loaded_bytes += sum(t.nbytes for t in attr.value if isinstance(t, ir.ExternalTensor))
                node.attributes[attr.name] = ir.AttrTensors(attr.name, tensors)
                count += 1
        return ir.passes.PassResult(model, modified=bool(count))
