"""RecordSubFitMetadataPass: the removed units travel inside the ONNX file."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from subfit_onnx.passes.metadata import METADATA_KEY, RecordSubFitMetadataPass, read_subfit_metadata


def test_metadata_survives_a_save(tmp_path):
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
    node = ir.Node("", "Identity", [x], name="id")
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18}), ir_version=10)
    assert read_subfit_metadata(model) is None
    RecordSubFitMetadataPass([(7, "mlp"), (0, "attention"), (7, "mlp")], {"format": 1})(model)
    ir.save(model, tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert METADATA_KEY in props
    record = read_subfit_metadata(ir.load(tmp_path / "m.onnx"))
    assert record == {"format": 1, "removed": [{"layer": 0, "kind": "attention"}, {"layer": 7, "kind": "mlp"}]}
