"""InsertBypassPass: the residual Add receives exactly N(h) @ W + b, in the graph's dtypes, and nothing else moves."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass

from rewrite_helpers import random_bypass, session
from subfit_onnx.errors import PlanMismatchError, SubFitError
from subfit_onnx.exporters.optimum_export import export_decoder
from subfit_onnx.passes.bypass import InsertBypassPass
from subfit_onnx.passes.structure import find_decoder_structure
from tiny_models import HIDDEN, tiny_model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("bypass")
    tiny_model("llama").save_pretrained(root / "hf")
    return {dtype: export_decoder(root / "hf", root / dtype, dtype=dtype) for dtype in ("fp32", "fp16")}


def probe(model: ir.Model, layer: int, kind: str, path) -> dict[str, np.ndarray]:
    """Run ORT with the unit's input, the residual operand and the Add's result exposed as outputs."""
    unit = find_decoder_structure(model).unit(layer, kind)
    resid = unit.residual_add.inputs[1 - unit.unit_operand]
    exposed = {"x": unit.norm_output, "resid": resid, "sum": unit.residual_add.outputs[0]}
    exposed = {k: v for k, v in exposed.items() if v is not None}  # a constant bypass reads no norm output
    model.graph.outputs.extend(v for v in exposed.values() if v not in model.graph.outputs)
    ir.save(model, path)
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    feeds = {"input_ids": np.array([[3, 17, 99, 4]]), "attention_mask": np.ones((1, 4), np.int64),
             "position_ids": np.arange(4)[None]}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float16 if "16" in i.type else np.float32)
    got = dict(zip(names, sess.run(None, feeds)))
    return {k: got[v.name].astype(np.float64) for k, v in exposed.items()}


@pytest.mark.parametrize("form,layer,kind", [("full", 1, "mlp"), ("lowrank", 0, "attention"), ("constant", 2, "mlp")])
def test_residual_add_gets_the_bypass(exports, tmp_path, form, layer, kind):
    bypass = random_bypass(HIDDEN, form, np.random.default_rng(1))
    model = ir.load(exports["fp32"])
    InsertBypassPass(find_decoder_structure(model), {(layer, kind): bypass})(model)
    RemoveUnusedNodesPass()(model)
    unit = find_decoder_structure(model).unit(layer, kind)
    assert unit.bypassed
    assert unit.params == bypass.num_params  # bias included, as the plan counts it
    names = {n for n in model.graph.initializers if n.startswith("subfit.")}
    roles = {"full": {"weight", "bias"}, "lowrank": {"down", "up", "bias"}, "constant": {"bias"}}[form]
    assert names == {f"subfit.layers.{layer}.{kind}.{r}" for r in roles}
    out = probe(model, layer, kind, tmp_path / "probe.onnx")
    expected = out["resid"] + bypass.apply(out["x"]) if form != "constant" else out["resid"] + bypass.bias
    assert np.max(np.abs(out["sum"] - expected)) < 1e-5 * max(1.0, np.max(np.abs(expected)))


def test_fp16_weights_and_cast_to_the_wider_stream(exports, tmp_path):
    """Optimum's CPU fp16 export keeps the residual stream in fp32: bypass in fp16, then Cast, like down_proj."""
    bypass = random_bypass(HIDDEN, "full", np.random.default_rng(2))
    model = ir.load(exports["fp16"])
    before = find_decoder_structure(model).unit(1, "mlp")
    assert (before.input_dtype, before.output_dtype) == (ir.DataType.FLOAT16, ir.DataType.FLOAT)
    InsertBypassPass(find_decoder_structure(model), {(1, "mlp"): bypass})(model)
    RemoveUnusedNodesPass()(model)
    assert model.graph.initializers["subfit.layers.1.mlp.weight"].const_value.dtype == ir.DataType.FLOAT16
    cast = [n for n in model.graph if n.name.startswith("/model/layers.1/mlp/subfit/") and n.op_type == "Cast"]
    assert len(cast) == 1 and cast[0].attributes["to"].as_int() == ir.DataType.FLOAT.value
    out = probe(model, 1, "mlp", tmp_path / "probe16.onnx")
    w16 = bypass.weight.astype(np.float16).astype(np.float64)
    expected = out["resid"] + out["x"] @ w16 + bypass.bias.astype(np.float16)
    assert np.max(np.abs(out["sum"] - expected)) < 2e-2 * np.max(np.abs(expected))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("form,layer,kind", [("full", 1, "mlp"), ("lowrank", 0, "attention"), ("constant", 2, "mlp")])
def test_returned_boundary_is_what_a_fresh_search_finds(exports, dtype, form, layer, kind):
    """The pass hands back the unit's new boundary, so callers keep their structure instead of searching again."""
    model = ir.load(exports[dtype])
    structure = find_decoder_structure(model)
    result = InsertBypassPass(structure, {(layer, kind): random_bypass(HIDDEN, form, np.random.default_rng(4))})(model)
    assert not structure.unit(layer, kind).bypassed  # the structure handed in is only read
    new, fresh = result.units[(layer, kind)], find_decoder_structure(model).unit(layer, kind)
    assert new.summary() == fresh.summary() and new.bypassed
    assert (new.norm_output, new.input_dtype, new.output_dtype) == (fresh.norm_output, fresh.input_dtype,
                                                                   fresh.output_dtype)


def test_shared_rope_of_layer_zero_survives(exports):
    """Layer 0's attention scope computes cos/sin for every layer; bypassing it must keep those nodes."""
    model = ir.load(exports["fp32"])
    shared = [n for n in model.graph if n.name.startswith("/model/layers.0/self_attn/")
              and any(u.name.startswith("/model/layers.1/") for o in n.outputs for u, _ in o.uses())]
    assert shared
    InsertBypassPass(find_decoder_structure(model), {(0, "attention"): random_bypass(HIDDEN, "lowrank", np.random.default_rng(3))})(model)
    RemoveUnusedNodesPass()(model)
    alive = {n.name for n in model.graph}
    assert all(n.name in alive for n in shared)
    assert find_decoder_structure(model).unit(1, "attention").bypassed is False


def test_refuses_wrong_shapes_and_double_bypass(exports):
    model = ir.load(exports["fp32"])
    with pytest.raises(PlanMismatchError, match=r"bias has shape \(72,\), the graph needs \(64,\)"):
        InsertBypassPass(find_decoder_structure(model), {(1, "mlp"): random_bypass(HIDDEN + 8, "full", np.random.default_rng(0))})(model)
    with pytest.raises(PlanMismatchError, match="graph has 4 layers"):
        InsertBypassPass(find_decoder_structure(model), {(7, "mlp"): random_bypass(HIDDEN, "full", np.random.default_rng(0))})(model)
    InsertBypassPass(find_decoder_structure(model), {(1, "mlp"): random_bypass(HIDDEN, "full", np.random.default_rng(0))})(model)
    with pytest.raises(SubFitError, match="already a bypass"):
        InsertBypassPass(find_decoder_structure(model), {(1, "mlp"): random_bypass(HIDDEN, "full", np.random.default_rng(0))})(model)
