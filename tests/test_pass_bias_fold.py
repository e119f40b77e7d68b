"""FoldBypassBiasPass: a quantized bypass's bias Add goes into MatMulNBits, the logits stay the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from builder_fixtures import fixture_dir
from rewrite_helpers import random_bypass
from subfit_onnx.exporters.quantize import QuantizeSpec, quantize_graph
from subfit_onnx.passes.bias_fold import FoldBypassBiasPass
from subfit_onnx.passes.external_data import LoadExternalTensorsPass
from subfit_onnx.passes.pipeline import SubFitRewritePass
from subfit_onnx.passes.structure import find_decoder_structure
from test_builder_rewrite import run, save, tokens


def _logits(model: ir.Model, folder: Path) -> list[np.ndarray]:
    """Prefill and one decode step: the bias reaches every step."""
    folder.mkdir()
    ids, next_ids = tokens()
    return run(save(model, folder / "model.onnx"), ids, next_ids)


@pytest.fixture
def quantized() -> ir.Model:
    model = ir.load(fixture_dir("llama", "fp32") / "model.onnx")
    LoadExternalTensorsPass(None)(model)
    rng = np.random.default_rng(3)
    bypasses = {(1, "mlp"): random_bypass(64, "full", rng), (2, "attention"): random_bypass(64, "lowrank", rng)}
    SubFitRewritePass(find_decoder_structure(model), bypasses)(model)
    return ir.serde.deserialize_model(quantize_graph(ir.serde.serialize_model(model), QuantizeSpec()).model)


def test_bypass_adds_fold_into_matmulnbits_with_the_same_logits(quantized, tmp_path):
    before = _logits(quantized, tmp_path / "before")
    adds = [n.name for n in quantized.graph if n.op_type == "Add" and "/subfit/" in n.name]
    assert len(adds) == 2
    result = FoldBypassBiasPass()(quantized)
    assert result.modified
    assert not [n for n in quantized.graph if n.op_type == "Add" and "/subfit/" in n.name]
    with_bias = [n for n in quantized.graph if n.op_type == "MatMulNBits" and len(n.inputs) == 6]
    assert sorted(n.name.split("/subfit/")[0] for n in with_bias) == sorted(a.split("/subfit/")[0] for a in adds)
    for got, want in zip(_logits(quantized, tmp_path / "after"), before):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    structure = find_decoder_structure(quantized)  # a folded bypass is still found as one
    assert [(u.layer, u.kind) for u in structure.units() if u.bypassed] == [(1, "mlp"), (2, "attention")]


def test_other_adds_are_left_alone(quantized):
    FoldBypassBiasPass()(quantized)
    again = FoldBypassBiasPass()(quantized)
    assert not again.modified  # nothing of SubFit's left to fold, and the model's own Adds are not SubFit's
