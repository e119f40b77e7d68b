"""KV discovery by name and KV-cache bytes, on hand-built graphs (gaps, fp16, symbolic dims) and real exports."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from subfit_onnx.errors import UnsupportedModelError
from subfit_onnx.evaluation.decoder import OnnxDecoder
from subfit_onnx.evaluation.signature import read_signature, specs_from_onnx


def kv_graph(layers, heads=2, head_dim=16, dtype=TensorProto.FLOAT16, symbolic=False, drop_present=None):
    """A graph with the KV inputs/outputs of ``layers`` (shape [batch, heads, past, head_dim]) and logits."""
    h = "kv_heads" if symbolic else heads
    d = "head_dim" if symbolic else head_dim
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 10])]
    nodes = []
    for i in layers:
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", dtype, ["batch", h, "past", d]))
            if (i, kind) != drop_present:
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", dtype, ["batch", h, "total", d]))
                nodes.append(helper.make_node("Identity", [f"past_key_values.{i}.{kind}"], [f"present.{i}.{kind}"]))
    graph = helper.make_graph(nodes, "kv", inputs, outputs)
    return helper.make_model(graph)


def signature_of(model, config=None):
    return read_signature(specs_from_onnx(model.graph.input), specs_from_onnx(model.graph.output), config)


def test_kv_bytes_with_gaps_fp16():
    sig = signature_of(kv_graph((0, 2, 3, 7), heads=2, head_dim=16, dtype=TensorProto.FLOAT16))
    assert sig.kv_layers == (0, 2, 3, 7)
    # 4 layers x (key + value) x 2 heads x 16 dims x 2 bytes
    assert sig.kv_bytes_per_token == 4 * 2 * 2 * 16 * 2 == 512
    assert sig.kv_bytes(2048) == 512 * 2048
    assert sig.kv_bytes(2048, batch=3) == 3 * 512 * 2048
    assert sig.position_ids is None and sig.attention_mask == "attention_mask"
    assert sig.present_to_past()["present.7.value"] == "past_key_values.7.value"


def test_symbolic_kv_dims_come_from_config():
    model = kv_graph((1, 5), symbolic=True, dtype=TensorProto.FLOAT)
    sig = signature_of(model, {"num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 256})
    assert sig.uniform_kv_shape() == (4, 32)
    assert sig.kv_bytes_per_token == 2 * 2 * 4 * 32 * 4
    with pytest.raises(UnsupportedModelError, match="symbolic"):
        signature_of(model, None)


def test_past_without_present_is_refused():
    with pytest.raises(UnsupportedModelError, match="present.2.value"):
        signature_of(kv_graph((0, 2), drop_present=(2, "value")))


def test_no_kv_graph():
    sig = signature_of(kv_graph(()))
    assert not sig.has_kv and sig.kv_bytes_per_token == 0 and sig.kv_dtype is None


def test_real_exports(tiny_exports, tiny_compressed):
    dense = OnnxDecoder(tiny_exports["dense"]).signature
    gaps = OnnxDecoder(tiny_exports["gaps"]).signature
    compressed = OnnxDecoder(tiny_compressed).signature
    assert dense.kv_layers == (0, 1, 2, 3) and gaps.kv_layers == (0, 2, 3, 7)
    # tiny llama: 2 KV heads x head_dim 16, fp32, 4 layers
    assert dense.kv_bytes_per_token == gaps.kv_bytes_per_token == 4 * 2 * 2 * 16 * 4
    assert not OnnxDecoder(tiny_exports["nokv"]).signature.has_kv
    # the rewrite's own report counts the same bytes for the layers whose attention it kept
    import json

    report = json.loads((tiny_compressed / "subfit_report.json").read_text())
    assert compressed.kv_bytes_per_token == report["kv_bytes_per_token"]["after"]
    assert compressed.kv_bytes_per_token < dense.kv_bytes_per_token


def test_onnx_spec_types():
    specs = {s.name: s for s in specs_from_onnx(kv_graph((0,), dtype=TensorProto.FLOAT16).graph.input)}
    assert specs["past_key_values.0.key"].type == "tensor(float16)"
    assert specs["past_key_values.0.key"].shape == ("batch", 2, "past", 16)
