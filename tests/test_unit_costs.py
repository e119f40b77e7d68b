"""Unit decode costs measured on the graph: ablations through the real rewrite, profile shares, KV bytes, cache."""

from __future__ import annotations

import json

import onnx
import pytest

from subfit_onnx.config import MethodSettings
from subfit_onnx.graph_checks import load_decoder_structure
from subfit_onnx.unit_costs import _ablated_export, measure_unit_costs


@pytest.fixture(scope="module")
def costs(tiny_export, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        onnx_file = tiny_export("llama") / "model.onnx"
        yield onnx_file, measure_unit_costs(onnx_file, MethodSettings(), context=64, steps=4, repeats=2)


def test_every_unit_has_a_cost_and_kv_bytes_add_up(costs):
    onnx_file, c = costs
    _, _, structure = load_decoder_structure(onnx_file)
    keys = {f"layers.{u.layer}.{u.kind}" for u in structure.units()}
    assert set(c.unit_ms) == keys == set(c.kv_bytes)
    assert all(v >= 0 for v in c.unit_ms.values()) and c.step_ms > 0
    assert sum(c.kv_bytes.values()) == structure.kv_bytes_per_token()
    assert all(c.kv_bytes[k] == 0 for k in keys if k.endswith("mlp"))
    for kind in ("attention", "mlp"):
        shares = [v for k, v in c.profile_shares.items() if k.endswith(kind)]
        assert sum(shares) == pytest.approx(1.0)
    everything = [(int(k.split(".")[1]), k.split(".")[2]) for k in keys]
    assert c.predicted_ratio([]) == 1.0
    assert c.predicted_ratio(everything) <= c.predicted_ratio(everything[:1]) <= 1.0


def test_results_are_cached_per_graph(costs, monkeypatch):
    onnx_file, c = costs
    monkeypatch.setattr("subfit_onnx.unit_costs._ablated_export", lambda *a: pytest.fail("measured again"))
    again = measure_unit_costs(onnx_file, MethodSettings(), context=64, steps=4, repeats=2)
    assert again.to_dict() == json.loads(json.dumps(c.to_dict()))  # read back, not re-measured


def test_the_attention_ablation_keeps_one_kv_layer(tiny_export, tmp_path):
    onnx_file = tiny_export("llama") / "model.onnx"
    out = _ablated_export(onnx_file, "attention", MethodSettings(), tmp_path / "ablated")
    _, _, structure = load_decoder_structure(out / "model.onnx")
    assert structure.kv_layers() == [0]
    assert [u.bypassed for u in structure.units() if u.kind == "attention"] == [False] + [True] * (
        structure.num_layers - 1)


def test_int4_costs_are_timed_on_int4_graphs_and_cached_apart(costs, tmp_path, monkeypatch):
    onnx_file, fp32 = costs
    built: list[tuple[str | None, str | None]] = []
    real = _ablated_export

    def spy(source, kind, method, out, quantize=None):
        built.append((kind, quantize))
        made = real(source, kind, method, out, quantize)
        ops = {n.op_type for n in onnx.load(made / "model.onnx").graph.node}
        assert "MatMulNBits" in ops  # what gets timed is the quantized graph
        return made

    monkeypatch.setattr("subfit_onnx.unit_costs._ablated_export", spy)
    int4 = measure_unit_costs(onnx_file, MethodSettings(), context=64, steps=4, repeats=2, quantize="int4")
    assert sorted(built, key=str) == sorted([(None, "int4"), ("attention", "int4"), ("mlp", "int4")], key=str)
    assert int4.quantize == "int4" and fp32.quantize is None  # not read back from the fp32 entry
    assert set(int4.unit_ms) == set(fp32.unit_ms) and int4.step_ms > 0


def test_the_dense_reference_at_a_precision_bypasses_nothing(tiny_export, tmp_path):
    onnx_file = tiny_export("llama") / "model.onnx"
    out = _ablated_export(onnx_file, None, MethodSettings(), tmp_path / "dense-int4", "int4")
    graph = onnx.load(out / "model.onnx").graph
    assert not any("/subfit/" in n.name for n in graph.node)
    assert json.loads((out / "config.json").read_text())["subfit"]["removed"] == []
    weights = {i.name for i in graph.initializer}
    assert [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights] == []  # all MatMulNBits
    assert len([n for n in graph.node if n.op_type == "MatMulNBits"]) == len(
        [n for n in onnx.load(onnx_file).graph.node if n.op_type == "MatMul" and "lm_head" not in n.name
         and "proj" in n.name]) + 1  # the seven projections per layer, and lm_head


@pytest.mark.parametrize("family, activation_op", [("llama", "Sigmoid"), ("gemma3", "Tanh"), ("gpt2", None)])
def test_ffn_ablations_are_timed_in_the_shape_ffn_bypass_fits(tiny_export, tmp_path, family, activation_op):
    """With ``ffn_bypass`` neurons or auto, the FFN ablation holds bypasses with neurons (the family's activation);
    GPT-2's FFN is not gated and keeps the linear shape."""
    onnx_file = tiny_export(family) / "model.onnx"
    ops = {}
    for mode in ("linear", "neurons"):
        out = _ablated_export(onnx_file, "mlp", MethodSettings(ffn_bypass=mode), tmp_path / mode)
        graph = onnx.load(out / "model.onnx").graph
        ops[mode] = [n.op_type for n in graph.node if "/mlp/subfit/" in n.name]
        params = sum(onnx.numpy_helper.to_array(t).size for t in graph.initializer if t.name.startswith("subfit."))
        ops[mode, "params"] = params
    assert activation_op not in ops["linear"] and ops["linear"].count("MatMul") == ops["linear"].count("Add")
    if activation_op is None:
        assert ops["neurons"] == ops["linear"]
    else:
        assert activation_op in ops["neurons"] and ops["neurons"].count("MatMul") == 5 * ops["linear"].count("MatMul")
    assert ops["neurons", "params"] - ops["linear", "params"] < 0.01 * ops["linear", "params"]  # same parameters


def test_costs_with_neurons_are_cached_apart(costs, tmp_path):
    from subfit_onnx.unit_costs import _cache_path

    onnx_file, _ = costs
    paths = {mode: _cache_path(onnx_file, "cpu", 64, MethodSettings(ffn_bypass=mode), None)
             for mode in ("linear", "neurons", "auto")}
    assert len(set(paths.values())) == 3
