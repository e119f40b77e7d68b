"""Our fused export writes what onnxruntime-genai's model builder writes: same logits on the tiny fixtures."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from builder_fixtures import fixture_dir
from subfit_onnx.errors import UnsupportedModelError
from subfit_onnx.exporters.builder_export import FUSED_FAMILIES, export_fused
from subfit_onnx.passes.structure import find_decoder_structure

FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gemma")


def prefill_and_step(path) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(3, 256, size=(1, 12))
    past = {i.name: np.zeros((1, 2, 0, 16), np.float32) for i in session.get_inputs() if i.name.startswith("past_")}
    names = [o.name for o in session.get_outputs()]
    first = dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), **past})))
    past = {n: first[n.replace("past_key_values.", "present.")] for n in past}
    step = session.run(["logits"], {"input_ids": np.array([[7]]), "attention_mask": np.ones((1, 13), np.int64), **past})
    return first["logits"], step[0]


def test_every_supported_family_is_tested():
    assert set(FUSED_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_export_matches_model_builder(family, builder_checkpoint, tmp_path):
    out = export_fused(builder_checkpoint(family), tmp_path / "fused")
    ours, builders = prefill_and_step(out), prefill_and_step(fixture_dir(family, "fp32") / "model.onnx")
    for a, b in zip(ours, builders):
        assert np.abs(a - b).max() < 1e-5 * max(1.0, np.abs(b).max())
    structure = find_decoder_structure(ir.load(out))
    assert structure.layout.exporter == "onnxruntime-genai"
    assert structure.num_layers == 4 and structure.kv_layers() == [0, 1, 2, 3]
    genai = json.loads((out.parent / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    assert genai["model"]["decoder"]["num_hidden_layers"] == 4 and genai["model"]["decoder"]["head_size"] == 16
    assert (out.parent / "config.json").is_file() and not list(tmp_path.glob(".*"))  # staged, nothing left


def test_fused_export_refuses_sandwich_norm_families(builder_checkpoint, tmp_path):
    with pytest.raises(UnsupportedModelError, match="does not support gemma2"):
        export_fused(builder_checkpoint("gemma2"), tmp_path / "fused")
    assert not list(tmp_path.iterdir())


def test_fused_export_rewrites_and_quantizes(builder_checkpoint, tmp_path):
    """The fused export is a SOURCE like the builder's: a plan and --quantize int4 apply, Optimum generates."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    import subfit_onnx
    from rewrite_helpers import hand_plan
    from subfit_onnx.plan import CalibratedPlan
    from tiny_models import tiny_model

    fused = export_fused(builder_checkpoint("llama"), tmp_path / "fused").parent
    plan = CalibratedPlan(*hand_plan(tiny_model("llama"), [(1, "attention", "lowrank"), (2, "mlp", "full")]))
    result = subfit_onnx.rewrite(fused, plan, tmp_path / "out", quantize="int4")
    assert result.report["removed_attention"] == 1 and result.report["quantize"]["precision"] == "int4"
    assert json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 3
    model = ORTModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[5, 9, 13, 40]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_export_command_writes_the_builder_layout(builder_checkpoint, tmp_path):
    from test_cli_errors import assert_user_error, cli

    result = cli("export", builder_checkpoint("qwen2"), "--layout", "builder", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "builder layout" in result.stdout
    assert find_decoder_structure(ir.load(tmp_path / "out" / "model.onnx")).layout.exporter == "onnxruntime-genai"
    assert_user_error(cli("export", builder_checkpoint("qwen2"), "--layout", "fused", "-o", tmp_path / "bad"),
                      "layout must be one of optimum, builder, not 'fused'")
    assert_user_error(cli("export", builder_checkpoint("qwen2"), "--layout", "builder", "--dtype", "fp16",
                          "-o", tmp_path / "bad"), "exported at fp32")
    assert not (tmp_path / "bad").exists()


def test_optimize_exports_the_builder_layout_and_quantizes_in_one_step(tiny_checkpoint, tiny_calibration_text,
                                                                       tmp_path):
    import subfit_onnx
    from rewrite_helpers import ort_prefill_decode, rel_diff

    config = subfit_onnx.SubFitConfig(sparsity=0.3, calibration=str(tiny_calibration_text), num_samples=8,
                                      seq_len=32)
    checkpoint = tiny_checkpoint("llama")
    result = subfit_onnx.optimize(checkpoint, config=config, output=tmp_path / "int4", quantize="int4",
                                  layout="builder")
    graph = ir.load(tmp_path / "int4" / "model.onnx")
    structure = find_decoder_structure(graph)
    assert structure.layout.exporter == "onnxruntime-genai"
    removed = sorted((u.layer, u.kind) for u in result.plan.removed)
    assert sorted((u.layer, u.kind) for u in structure.units() if u.bypassed) == removed
    ops = [n.op_type for n in graph.graph]
    assert "GatherBlockQuantized" in ops and "MatMul" not in ops
    assert not [n for n in graph.graph if n.op_type == "Add" and "/subfit/" in n.name]  # biases folded
    genai = json.loads((tmp_path / "int4" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == len(structure.kv_layers())
    assert result.report["quality"]["measured"]

    # the same plan on both layouts gives the same model
    fused = subfit_onnx.optimize(checkpoint, plan=result.output, output=tmp_path / "fused", layout="builder")
    optimum = subfit_onnx.optimize(checkpoint, plan=result.output, output=tmp_path / "optimum")
    ids = np.random.default_rng(2).integers(3, 60, size=(1, 10))
    a = ort_prefill_decode(fused.output / "model.onnx", ids, ids[:, :1])
    b = ort_prefill_decode(optimum.output / "model.onnx", ids, ids[:, :1])
    assert rel_diff(a[0], b[0]) < 1e-4 and rel_diff(a[1], b[1]) < 1e-4


def test_optimize_layout_errors_are_one_line_and_write_nothing(tiny_checkpoint, tiny_export, tmp_path):
    from test_cli_errors import assert_user_error, cli

    assert_user_error(cli("optimize", tiny_checkpoint("llama"), "-s", "0.25", "--layout", "fused", "-o",
                          tmp_path / "a"), "layout must be one of optimum, builder, not 'fused'")
    assert_user_error(cli("optimize", tiny_checkpoint("llama"), "-s", "0.25", "--layout", "builder", "--dtype",
                          "fp16", "-o", tmp_path / "b"), "exported at fp32")
    assert_user_error(cli("optimize", tiny_export("llama"), "-s", "0.25", "--layout", "builder", "-o",
                          tmp_path / "c"), "--layout applies when SOURCE is a model")
    assert list(tmp_path.iterdir()) == []
