"""ONNX Runtime calibration straight from model-builder graphs (no checkpoint, no config.json).

On every builder family's fp32 fixture the ONNX backend must remove the same units as on the Optimum export of
the same checkpoint, with the same bypass shapes (FFN bypasses with neurons included) and bypass tensors within 1e-3 relative Frobenius error (measured on the prototype: below
2.1e-5; Gemma-2 2e-3, the builder keeps the attention soft-capping Optimum's export drops, so it gets 1e-2). The
int4 fixture calibrates too, and its plan rewrites that same int4 graph into one ONNX Runtime runs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from builder_fixtures import BUILDER_FAMILIES, fixture_dir
from subfit_onnx.calibration.onnx_backend import calibrate_export
from subfit_onnx.config import Portion, SubFitConfig
from subfit_onnx.exporters.rewrite import plan_bypasses
from subfit_onnx.passes.external_data import LoadExternalTensorsPass
from subfit_onnx.passes.pipeline import SubFitRewritePass
from subfit_onnx.passes.structure import find_decoder_structure

TOKENS = np.random.default_rng(0).integers(3, 256, size=(8, 32))
CONFIG = SubFitConfig(sparsity=0.7, num_samples=8, seq_len=32, batch_size=4, attention_rank=Portion(count=8))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("family", BUILDER_FAMILIES)
def test_builder_calibration_matches_optimum_export(family, builder_optimum_export):
    export = builder_optimum_export(family)
    reference = calibrate_export(export.parent, TOKENS, CONFIG)
    result = calibrate_export(fixture_dir(family, "fp32"), TOKENS, CONFIG)
    assert [u.key for u in result.plan.removed] == [u.key for u in reference.plan.removed]
    assert result.plan.model.num_layers == 4 and result.plan.model.hidden_size == 64
    assert result.plan.model.family == reference.plan.model.family  # from genai_config.json's model type
    tolerance = 1e-2 if family == "gemma2" else 1e-3
    assert [u.bypass.form for u in result.plan.removed] == [u.bypass.form for u in reference.plan.removed]
    for name, expected in reference.tensors.items():
        assert rel(result.tensors[name], expected) < tolerance, name


def test_int4_builder_graph_calibrates_and_rewrites(tmp_path):
    result = calibrate_export(fixture_dir("llama", "int4"), TOKENS, CONFIG)
    assert result.plan.removed
    model = ir.load(fixture_dir("llama", "int4") / "model.onnx")
    LoadExternalTensorsPass(None)(model)
    SubFitRewritePass(find_decoder_structure(model, "llama"), plan_bypasses(result.plan, result.tensors))(model)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph) > 0  # the kept units stay int4
    assert not any(n.op_type == "Add" and (n.name or "").endswith("SkipAdd") for n in model.graph)  # fused kept
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": TOKENS[:1, :16], "attention_mask": np.ones((1, 16), np.int64)}
    feeds.update({i.name: np.zeros((1, 2, 0, 16), np.float32) for i in session.get_inputs()
                  if i.name.startswith("past_key_values.")})
    logits = session.run(["logits"], feeds)[0]
    assert logits.shape == (1, 16, 256) and np.isfinite(logits).all()


def test_sliding_window_shorter_than_the_sequences_is_one_line():
    from subfit_onnx.errors import SubFitError
    from subfit_onnx.passes.builder_unfuse import WidenSlidingWindowsPass

    model = ir.load(fixture_dir("gemma2", "fp32") / "model.onnx")
    windows = {n.attributes["local_window_size"].as_int() for n in model.graph if n.op_type == "GroupQueryAttention"}
    assert max(windows) > 0
    with pytest.raises(SubFitError, match=r"exceed the sliding window \(\d+\).*--seq-len"):
        WidenSlidingWindowsPass(max(windows) + 1)(model)
