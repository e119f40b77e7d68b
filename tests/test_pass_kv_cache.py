"""DropPresentOutputsPass and DropPastInputsPass: the KV signature shrinks to the kept attentions, past length intact."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rewrite_helpers import random_bypass, session
from subfit_onnx.errors import UnsupportedModelError
from subfit_onnx.exporters.optimum_export import export_decoder
from subfit_onnx.passes.bypass import InsertBypassPass
from subfit_onnx.passes.kv_cache import DropPastInputsPass, DropPresentOutputsPass
from subfit_onnx.passes.structure import find_decoder_structure
from tiny_models import HIDDEN, LAYERS, tiny_model


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    tiny_model("llama").save_pretrained(root / "hf")
    return export_decoder(root / "hf", root / "onnx")


def bypass_attention(model: ir.Model, layers: list[int]) -> None:
    rng = np.random.default_rng(0)
    bypasses = {(i, "attention"): random_bypass(HIDDEN, "lowrank", rng) for i in layers}
    InsertBypassPass(find_decoder_structure(model), bypasses)(model)


def test_present_outputs_removed_and_projections_become_dead(export):
    model = ir.load(export)
    bypass_attention(model, [1])
    RemoveUnusedNodesPass()(model)
    assert any(n.name.startswith("/model/layers.1/self_attn/k_proj") for n in model.graph)  # kept by present.1
    DropPresentOutputsPass([1])(model)
    RemoveUnusedNodesPass()(model)
    assert [v.name for v in model.graph.outputs if ".1." in v.name] == []
    assert len(model.graph.outputs) == 1 + 2 * (LAYERS - 1)
    assert not any(n.name.startswith("/model/layers.1/self_attn/k_proj") for n in model.graph)
    with pytest.raises(UnsupportedModelError, match="no output present.1.key"):
        DropPresentOutputsPass([1])(model)


def test_layer_zero_past_length_moves_to_a_kept_layer(export):
    """/model/Shape reads past_key_values.0.key for the mask and positions; it must follow the cache."""
    model = ir.load(export)
    shape = next(n for n in model.graph if n.name == "/model/Shape")
    assert shape.inputs[0].name == "past_key_values.0.key"
    bypass_attention(model, [0, 2])
    DropPresentOutputsPass([0, 2])(model)
    RemoveUnusedNodesPass()(model)
    DropPastInputsPass([0, 2])(model)
    RemoveUnusedNodesPass()(model)
    assert shape.inputs[0].name == "past_key_values.1.key"
    assert [v.name for v in model.graph.inputs if v.name.startswith("past")] == [
        "past_key_values.1.key", "past_key_values.1.value", "past_key_values.3.key", "past_key_values.3.value"]


def test_refuses_while_the_layer_still_reads_its_cache(export):
    model = ir.load(export)
    with pytest.raises(UnsupportedModelError, match="still feeds its own layer"):
        DropPastInputsPass([2])(model)
    with pytest.raises(UnsupportedModelError, match="no input past_key_values.9.key"):
        DropPastInputsPass([9])(model)


def _past_length_graph() -> ir.Model:
    """input_ids, attention_mask and one past; the output is past.shape (what /model/Shape computes)."""
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "s"]))
    mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "t"]))
    past, value = (ir.Value(name=f"past_key_values.0.{role}", type=ir.TensorType(ir.DataType.FLOAT),
                            shape=ir.Shape(["b", 2, "p", 16])) for role in ("key", "value"))
    full = ir.Node("", "Shape", [past], name="/model/Shape")
    part = ir.Node("", "Shape", [past], [ir.AttrInt64("start", 2), ir.AttrInt64("end", 3)], name="/model/Shape_1")
    full.outputs[0].name, part.outputs[0].name = "shape", "length"
    graph = ir.Graph([ids, mask, past, value], [full.outputs[0], part.outputs[0]], nodes=[full, part],
                     opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def test_no_attention_left_computes_past_shape_from_the_mask(tmp_path):
    model = _past_length_graph()
    DropPastInputsPass([0])(model)
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]
    ir.save(model, tmp_path / "m.onnx")
    shape, length = session(tmp_path / "m.onnx").run(
        None, {"input_ids": np.zeros((3, 2), np.int64), "attention_mask": np.ones((3, 9), np.int64)})
    assert shape.tolist() == [3, 2, 7, 16]
    assert length.tolist() == [7]
