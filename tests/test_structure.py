"""find_decoder_structure: units found by scope and boundary on real tiny exports, and clear refusals otherwise."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from subfit_onnx.errors import UnsupportedModelError
from subfit_onnx.exporters.optimum_export import export_decoder
from subfit_onnx.passes.structure import find_decoder_structure
from subfit_onnx.torch_model import unit_param_table
from tiny_models import FAMILY_CONFIGS, HIDDEN, LAYERS, tiny_model

FAMILIES = ("llama", "gpt2", "gemma2")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("structure")
    out = {}
    for family in FAMILIES:
        tiny_model(family).save_pretrained(root / f"{family}-hf")
        out[family] = export_decoder(root / f"{family}-hf", root / family)
    return out


def load(exports, family):
    path = exports[family]
    return ir.load(path), json.loads((path.parent / "config.json").read_text())["model_type"]


@pytest.mark.parametrize("family", FAMILIES)
def test_units_kv_and_params_match_the_pytorch_model(exports, family):
    model, model_type = load(exports, family)
    s = find_decoder_structure(model, model_type)
    params = unit_param_table(tiny_model(family))
    heads = FAMILY_CONFIGS[family].get("num_key_value_heads", FAMILY_CONFIGS[family].get("n_head"))
    assert s.family == family and s.family_from_config
    assert (s.num_layers, s.hidden_size, s.num_kv_heads, s.head_dim) == (LAYERS, HIDDEN, heads, 16)
    assert s.kv_layers() == list(range(LAYERS))
    assert s.kv_bytes_per_token() == 2 * LAYERS * heads * 16 * 4
    for unit in s.units():
        assert unit.params == params[(unit.layer, unit.kind)]
        assert not unit.bypassed
        assert unit.input_dtype == ir.DataType.FLOAT
        # the boundary: the unit reads its own pre-norm and its Add is a direct child of the layer scope
        assert unit.norm_output.producer().name.startswith(s.layer_scope.format(i=unit.layer))
        assert "/" not in unit.residual_add.name[len(s.layer_scope.format(i=unit.layer)):]
    layer = s.layers[2]
    assert (layer.kv.past_key, layer.kv.present_value) == ("past_key_values.2.key", "present.2.value")
    json.dumps(s.summary())  # plain data for the CLI


def test_gpt2_residual_operand_found_by_producer_not_position(exports):
    """GPT-2 adds (attention output, stream), Llama adds (stream, attention output)."""
    gpt2 = find_decoder_structure(load(exports, "gpt2")[0])
    llama = find_decoder_structure(load(exports, "llama")[0])
    assert gpt2.unit(1, "attention").unit_operand == 0
    assert llama.unit(1, "attention").unit_operand == 1
    assert gpt2.unit(1, "mlp").unit_operand == 1


def test_family_without_config_lists_every_layout_match(exports):
    llama = find_decoder_structure(load(exports, "llama")[0])
    gemma2 = find_decoder_structure(load(exports, "gemma2")[0])
    assert not llama.family_from_config
    assert {"llama", "mistral", "qwen2", "phi3", "gemma"} <= set(llama.family_candidates)
    assert "gemma2" not in llama.family_candidates  # its FFN norm is pre_feedforward_layernorm
    assert gemma2.family_candidates == ("gemma2",)


def test_config_family_must_match_the_graph(exports):
    model, _ = load(exports, "llama")
    with pytest.raises(UnsupportedModelError, match="config.json says gemma2"):
        find_decoder_structure(model, "gemma2")


def test_refuses_fused_graph(exports):
    model, _ = load(exports, "llama")
    x = model.graph.inputs[0]
    model.graph.append(ir.Node("com.microsoft", "SkipSimplifiedLayerNormalization", [x], name="fused"))
    with pytest.raises(UnsupportedModelError, match="already optimized by ONNX Runtime"):
        find_decoder_structure(model)


def test_refuses_encoder_like_graph(exports):
    model, _ = load(exports, "llama")
    next(v for v in model.graph.outputs if v.name == "logits").name = "last_hidden_state"
    with pytest.raises(UnsupportedModelError, match="encoder"):
        find_decoder_structure(model)


def test_refuses_merged_decoder(exports):
    model, _ = load(exports, "llama")
    model.graph.inputs.append(ir.Value(name="use_cache_branch", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([1])))
    with pytest.raises(UnsupportedModelError, match="merged decoder"):
        find_decoder_structure(model)


def test_refuses_export_without_kv_cache(tmp_path):
    from optimum.exporters.onnx import main_export

    tiny_model("llama").save_pretrained(tmp_path / "hf")
    main_export(str(tmp_path / "hf"), tmp_path / "nokv", task="text-generation", do_validation=False,
                local_files_only=True)
    with pytest.raises(UnsupportedModelError, match="no KV cache.*text-generation-with-past"):
        find_decoder_structure(ir.load(tmp_path / "nokv" / "model.onnx"))


def test_refuses_a_unit_whose_boundary_does_not_check_out(exports):
    """A residual Add that moved into a submodule scope is not trusted by name alone."""
    model, model_type = load(exports, "llama")
    add = next(n for n in model.graph if n.name == "/model/layers.2/Add")
    add.name = "/model/layers.2/other/Add"
    with pytest.raises(UnsupportedModelError, match="layer 2 attention: expected one residual Add"):
        find_decoder_structure(model, model_type)


def test_refuses_non_llm_graph():
    x = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
    node = ir.Node("", "Identity", [x], name="/model/layers.0/Identity")
    node.outputs[0].name = "logits"
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18})
    with pytest.raises(UnsupportedModelError):
        find_decoder_structure(ir.Model(graph, ir_version=10))


def test_a_new_graph_layout_is_one_table_row(exports, tmp_path):
    """An exporter naming its scopes otherwise is found by adding one GraphLayout row, and rewritten alike."""
    from rewrite_helpers import hand_plan, ort_prefill_decode
    from subfit_onnx.architectures import GRAPH_LAYOUTS, GraphLayout, UnitLayout
    from subfit_onnx.exporters.rewrite import plan_bypasses
    from subfit_onnx.passes.pipeline import SubFitRewritePass

    renames = {"/self_attn/": "/attn/", "/input_layernorm/": "/ln_attn/", "/post_attention_layernorm/": "/ln_ffn/",
               "/mlp/": "/ffn/"}
    renamed, _ = load(exports, "llama")
    for node in renamed.graph:
        for old, new in renames.items():
            node.name = (node.name or "").replace(old, new)
    with pytest.raises(UnsupportedModelError, match="no nodes under /model/layers.0/self_attn/"):
        find_decoder_structure(renamed, "llama")
    row = GraphLayout(exporter="renamed", families=("llama",), layer_scope="/model/layers.{i}/",
                      attention=UnitLayout("attn", "ln_attn"), mlp=UnitLayout("ffn", "ln_ffn"))
    found = find_decoder_structure(renamed, "llama", layouts=(*GRAPH_LAYOUTS, row))
    original, _ = load(exports, "llama")
    expected = find_decoder_structure(original, "llama")
    assert found.layout is row and found.layout is not expected.layout
    assert [u.params for u in found.units()] == [u.params for u in expected.units()]

    plan, tensors = hand_plan(tiny_model("llama"), [(1, "attention", "lowrank"), (2, "mlp", "full")])
    ids = np.array([[5, 80, 13, 200]])
    logits = []
    for name, model, structure in (("renamed", renamed, found), ("original", original, expected)):
        SubFitRewritePass(structure, plan_bypasses(plan, tensors))(model)
        ir.save(model, tmp_path / f"{name}.onnx")
        logits.append(ort_prefill_decode(tmp_path / f"{name}.onnx", ids, ids[:, :1]))
    np.testing.assert_array_equal(logits[0][0], logits[1][0])
    np.testing.assert_array_equal(logits[0][1], logits[1][1])
    assert logits[0][2] == logits[1][2] and "past_key_values.1.key" not in logits[0][2]
