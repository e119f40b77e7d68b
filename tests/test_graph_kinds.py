"""Quantized graphs SubFit cannot read get one clear line; the model builder's fp32 and int4 graphs are read."""

from __future__ import annotations

import shutil

import onnx
import onnx_ir as ir
import pytest

from builder_fixtures import fixture_dir
from subfit_onnx.architectures import GRAPH_LAYOUTS
from subfit_onnx.passes.graph_kinds import unreadable_reason
from subfit_onnx.passes.structure import find_decoder_structure
from test_cli_errors import assert_user_error, cli


def quantized_copy(export_dir, out, quant_format: str):
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    fmt = QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator
    model = onnx.load(str(export_dir / "model.onnx"))
    config = mq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, quant_format=fmt)
    quantizer = mq.MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, algo_config=config)
    quantizer.process()
    shutil.copytree(export_dir, out)
    onnx.save(quantizer.model.model, str(out / "model.onnx"))
    return out


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_builder_graphs_are_read(precision):
    model = ir.load(fixture_dir("llama", precision) / "model.onnx")
    assert unreadable_reason(model, GRAPH_LAYOUTS) is None
    assert find_decoder_structure(model, "llama").layout.exporter == "onnxruntime-genai"


def test_builder_graph_without_logits_gets_one_line():
    model = ir.load(fixture_dir("llama", "int4") / "model.onnx")
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    model.graph.outputs.remove(logits)
    assert "exclude_lm_head" in unreadable_reason(model, GRAPH_LAYOUTS)


def test_plain_optimum_export_is_read(tiny_export):
    assert unreadable_reason(ir.load(tiny_export("llama") / "model.onnx"), GRAPH_LAYOUTS) is None


@pytest.mark.parametrize(("quant_format", "needle"), [("qoperator", "already weight-quantized (MatMulNBits"),
                                                      ("qdq", "QDQ-quantized (DequantizeLinear)")])
def test_quantized_optimum_export_gets_one_line(quant_format, needle, tiny_export, tmp_path):
    export = quantized_copy(tiny_export("llama"), tmp_path / "quantized", quant_format)
    assert_user_error(cli("inspect", export / "model.onnx"), needle, "Run SubFit on the float export with --quantize int4")
