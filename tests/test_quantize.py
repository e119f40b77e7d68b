"""Weight-only quantization of SubFit outputs (``exporters.quantize``) and ``--quantize`` / ``quantize=``."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import subfit_onnx
from builder_fixtures import fixture_dir
from rewrite_helpers import hand_plan, ort_prefill_decode, random_bypass, rel_diff
from subfit_onnx.errors import SubFitError
from subfit_onnx.exporters.optimum_optimizer import SubFitOptimizer
from subfit_onnx.exporters.quantize import QuantizeSpec, quantize_graph, untie_lm_head
from subfit_onnx.passes.external_data import LoadExternalTensorsPass
from subfit_onnx.passes.pipeline import SubFitRewritePass
from subfit_onnx.passes.structure import find_decoder_structure
from subfit_onnx.plan import CalibratedPlan
from test_cli_errors import assert_user_error, cli
from tiny_models import tiny_model

IDS = np.random.default_rng(0).integers(3, 256, size=(1, 12))
UNITS = [(1, "attention", "lowrank"), (2, "mlp", "full")]


def logits(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS)}
    for spec in session.get_inputs():
        if spec.name == "position_ids":
            feeds[spec.name] = np.arange(IDS.shape[1])[None]
        elif spec.name.startswith("past_key_values."):
            feeds[spec.name] = np.zeros((1, 2, 0, 16), np.float32)
    return session.run(["logits"], feeds)[0]


def bits_by_node(model: onnx.ModelProto, attribute: str = "bits") -> dict[str, int]:
    return {n.name: next(a.i for a in n.attribute if a.name == attribute) for n in model.graph.node
            if n.op_type == "MatMulNBits"}


def test_tied_lm_head_is_untied_and_quantized(tiny_export):
    model = onnx.load(str(tiny_export("gemma") / "model.onnx"))  # tied: lm_head reads Transpose(embedding)
    reference = logits(model)
    assert untie_lm_head(model)
    assert np.abs(logits(model) - reference).max() == 0.0  # untying alone changes nothing
    quantized = quantize_graph(model, QuantizeSpec(bits=8)).model
    assert bits_by_node(quantized)["/lm_head/MatMul_Q8"] == 8
    assert not any(n.op_type == "MatMul" and n.input[1] and "lm_head" in n.name for n in quantized.graph.node)
    # int8 weights and (accuracy level 4) int8 activations: measured 6.4% of the logit scale; a wrong layout is ~100%
    assert np.abs(logits(quantized) - reference).max() < 0.1 * np.abs(reference).max()


def test_bypasses_get_their_own_precision():
    model = ir.load(fixture_dir("llama", "fp32") / "model.onnx")
    LoadExternalTensorsPass(None)(model)
    rng = np.random.default_rng(3)
    bypasses = {(1, "mlp"): random_bypass(64, "full", rng), (2, "attention"): random_bypass(64, "lowrank", rng)}
    SubFitRewritePass(find_decoder_structure(model), bypasses)(model)
    spec = QuantizeSpec(bits=4, bypass_bits=8, lm_head_bits=8, lm_head_block_size=64,
                        int8_nodes=("/model/layers.0/mlp/down_proj/MatMul",))
    done = quantize_graph(ir.serde.serialize_model(model), spec)
    quantized = done.model
    assert not [n for n in quantized.graph.node if n.op_type == "MatMul"]
    bits = bits_by_node(quantized)
    bypass = {name: b for name, b in bits.items() if "/subfit/" in name}
    assert len(bypass) == 3 and set(bypass.values()) == {8}  # one full, two low-rank MatMuls
    assert bits["/lm_head/MatMul_Q8"] == 8 and bits["/model/layers.0/mlp/down_proj/MatMul_Q8"] == 8
    body = {name: b for name, b in bits.items() if "/subfit/" not in name and "lm_head" not in name
            and "layers.0/mlp/down_proj" not in name}
    assert len(body) == len(bits) - 5 and set(body.values()) == {4}
    blocks = bits_by_node(quantized, "block_size")
    assert blocks.pop("/lm_head/MatMul_Q8") == 64 and set(blocks.values()) == {32}  # only lm_head has its own
    assert "int8: 3 bypass matrices, lm_head (block 64), 1 FFN down projections" in done.describe()


def test_int4_embedding_is_a_gather_block_quantized_without_warnings(tiny_export, caplog):
    model = onnx.load(str(tiny_export("gemma") / "model.onnx"))  # tied: lm_head is untied first, then both go
    table = next(i for i in model.graph.initializer if i.name == "model.embed_tokens.weight")
    with caplog.at_level(logging.DEBUG):
        quantized = quantize_graph(model, QuantizeSpec(bits=8, embedding_bits=4)).model
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # opset raised by us, not with a warning
    assert [n.op_type for n in quantized.graph.node if "embed_tokens" in n.name] == ["GatherBlockQuantized"]
    assert bits_by_node(quantized)["/lm_head/MatMul_Q8"] == 8
    assert table.name not in {i.name for i in quantized.graph.initializer}  # nothing reads the float table now,
    assert not [n for n in quantized.graph.node if n.op_type == "Transpose" and table.name in n.input]  # not even
    # lm_head's old Transpose, which would keep it in the file
    assert next(o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")) == 21
    table = next(i for i in quantized.graph.initializer if i.name.endswith("_Q4"))
    assert table.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def test_int4_embedding_keeps_the_logits_close(tiny_export):
    model = onnx.load(str(tiny_export("llama") / "model.onnx"))
    reference = logits(model)
    quantized = quantize_graph(model, QuantizeSpec(bits=8, embedding_bits=4)).model
    # relative Frobenius on this tiny random llama: int8 alone 0.022, with the int4 embedding 0.092; a wrong
    # quantization axis or table layout gives ~1
    assert rel_diff(logits(quantized), reference) < 0.2


def test_quantizing_leaves_the_root_logger_alone():
    """ORT's quantizer module calls logging.basicConfig(INFO) on import; the core must stay silent."""
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    quantize_graph(onnx.load(str(fixture_dir("llama", "fp32") / "model.onnx")), QuantizeSpec())
    assert (root.level, list(root.handlers)) == before


# ---- the product feature: rewrite/optimize --quantize ---------------------------------------------------------
@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    plan, tensors = hand_plan(tiny_model("llama"), UNITS)
    return CalibratedPlan(plan, tensors).save(tmp_path_factory.mktemp("quantize") / "plan")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_export, plan_dir):
    """The same plan rewritten at fp32, int4 and int8."""
    root = tmp_path_factory.mktemp("quantized")
    return {q or "fp32": subfit_onnx.rewrite(tiny_export("llama"), plan_dir, root / (q or "fp32"), quantize=q)
            for q in (None, "int4", "int8")}


def test_int4_quantizes_lm_head_and_keeps_the_sensitive_matrices_at_int8(compressed):
    model = onnx.load(str(compressed["int4"].model_path))
    bits = bits_by_node(model)
    weights = {i.name for i in model.graph.initializer}
    assert not [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert not [n.name for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in weights]  # untied
    assert bits["/lm_head/MatMul_Q8"] == 8 and bits_by_node(model, "block_size")["/lm_head/MatMul_Q8"] == 128
    # 4 layers: the first and last eighth are layers 0 and 3; layer 2's FFN is a bypass (int8 as well)
    assert bits["/model/layers.0/mlp/down_proj/MatMul_Q8"] == 8 and bits["/model/layers.3/mlp/down_proj/MatMul_Q8"] == 8
    assert {b for name, b in bits.items() if "/subfit/" in name} == {8}
    assert bits["/model/layers.1/mlp/down_proj/MatMul_Q4"] == 4 and bits["/model/layers.0/self_attn/q_proj/MatMul_Q4"] == 4
    report = compressed["int4"].report
    assert report["quantize"] == {"precision": "int4", "weights": "MatMulNBits, block 32; int4: 19 other matrices, embedding; "
                                  "int8: 3 bypass matrices, lm_head (block 128), 2 FFN down projections"}
    assert report["file_bytes"]["after"] < 0.5 * compressed["fp32"].report["file_bytes"]["after"]
    assert set(bits_by_node(onnx.load(str(compressed["int8"].model_path))).values()) == {8}


@pytest.mark.parametrize(("precision", "bound"), [("int8", 0.08), ("int4", 0.5)])
def test_quantized_logits_stay_close_to_the_fp32_compressed_model(compressed, precision, bound):
    ids = np.random.default_rng(5).integers(3, 256, size=(2, 16))
    want = ort_prefill_decode(compressed["fp32"].model_path, ids, ids[:, :1])
    got = ort_prefill_decode(compressed[precision].model_path, ids, ids[:, :1])
    assert got[2] == want[2] and "past_key_values.1.key" not in got[2]  # same KV signature
    # measured on this tiny random llama (relative Frobenius, prefill / decode): int8 0.048 / 0.024, int4 0.41 / 0.34
    # (random weights fill int4's grid badly); the dense model differs from the compressed one by 1.22 / 1.34
    for a, b in zip(got[:2], want[:2]):
        assert rel_diff(a, b) < bound


def test_quantized_output_runs_in_optimum(compressed):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(compressed["int4"].output)
    ids = torch.as_tensor(IDS)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    want = ort_prefill_decode(compressed["int4"].model_path, IDS, IDS[:, :1])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)


def test_cli_rewrite_quantize_states_precision_and_size(tiny_export, plan_dir, tmp_path):
    result = cli("rewrite", tiny_export("llama"), "--plan", plan_dir, "-o", tmp_path / "out", "--quantize", "int8")
    assert result.exit_code == 0, result.output
    assert "weights      MatMulNBits, block 32; int8: 3 bypass matrices, 22 other matrices (lm_head included)" in result.stdout
    assert "file size" in result.stdout


@pytest.mark.parametrize("bad", ["int3", "fp16", "INT4"])
def test_bad_quantize_is_one_line_and_writes_nothing(tiny_export, plan_dir, tmp_path, bad):
    assert_user_error(cli("rewrite", tiny_export("llama"), "--plan", plan_dir, "-o", tmp_path / "out",
                          "--quantize", bad), "--quantize must be one of int4, int8", repr(bad))
    assert not list(tmp_path.iterdir())
    with pytest.raises(SubFitError, match="quantize must be one of int4, int8 or None"):
        subfit_onnx.optimize(tiny_export("llama"), 0.25, output=tmp_path / "api", quantize=bad)
    assert not list(tmp_path.iterdir())


def test_subfit_optimizer_quantizes(tiny_export, tiny_checkpoint, plan_dir, tmp_path):
    optimizer = SubFitOptimizer.from_pretrained(tiny_export("llama"), model=tiny_checkpoint("llama"))
    config = subfit_onnx.SubFitConfig(sparsity=CalibratedPlan.load(plan_dir).plan.sparsity.target)
    optimizer.optimize(config, tmp_path / "out", plan=plan_dir, quantize="int4")
    assert optimizer.last_result.report["quantize"]["precision"] == "int4"
    assert bits_by_node(onnx.load(str(tmp_path / "out" / "model.onnx")))["/lm_head/MatMul_Q8"] == 8


def test_optimum_cli_subfit_rewrite_quantizes(tiny_export, plan_dir, tmp_path):
    from test_optimum_integration import optimum_cli

    done = optimum_cli("subfit", "rewrite", tiny_export("llama"), "--plan", plan_dir, "-o", tmp_path / "out",
                       "--quantize", "int4")
    assert done.returncode == 0, done.stderr
    assert "weights      MatMulNBits, block 32; int4: " in done.stdout
    assert bits_by_node(onnx.load(str(tmp_path / "out" / "model.onnx")))["/lm_head/MatMul_Q8"] == 8
    bad = optimum_cli("subfit", "optimize", tiny_export("llama"), "--sparsity", "0.25", "--quantize", "nf4")
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --quantize must be one of int4, int8, not 'nf4'"


def test_optimize_quantizes_and_measures_quality_on_the_quantized_model(tiny_export, tiny_checkpoint,
                                                                       tiny_calibration_text, tmp_path):
    config = subfit_onnx.SubFitConfig(sparsity=0.3, calibration=str(tiny_calibration_text), num_samples=8,
                                      seq_len=32)
    common = {"config": config, "model": tiny_checkpoint("llama")}
    fp32 = subfit_onnx.optimize(tiny_export("llama"), output=tmp_path / "fp32", **common).report
    int4 = subfit_onnx.optimize(tiny_export("llama"), output=tmp_path / "int4", quantize="int4", **common).report
    assert int4["depth_map"] == fp32["depth_map"] and int4["quantize"]["precision"] == "int4"
    # measured: 1.0046 fp32, 1.0388 int4 (the tiny llama's random weights fit int4's grid badly)
    assert fp32["quality"]["measured"] and int4["quality"]["measured"]
    assert int4["quality"]["dense_ppl"] == fp32["quality"]["dense_ppl"]
    assert int4["quality"]["heldout_ppl_ratio"] > fp32["quality"]["heldout_ppl_ratio"] + 0.01


def test_bypasses_with_neurons_are_quantized_and_stay_close(tiny_export, tmp_path):
    """Every MatMul of an FFN bypass that keeps neurons is quantized at the bypass precision, and the int8 model
    stays as close to the fp32 one as linear bypasses do."""
    plan, tensors = hand_plan(tiny_model("llama"), [(1, "mlp", "neurons"), (2, "attention", "lowrank")], seed=3)
    plan_folder = CalibratedPlan(plan, tensors).save(tmp_path / "plan")
    out = {q or "fp32": subfit_onnx.rewrite(tiny_export("llama"), plan_folder, tmp_path / (q or "fp32"), quantize=q)
           for q in (None, "int8", "int4")}
    for q in ("int8", "int4"):
        model = onnx.load(str(out[q].model_path))
        neuron_nodes = {n.name: n.op_type for n in model.graph.node if "layers.1/mlp/subfit/" in n.name}
        assert list(neuron_nodes.values()).count("MatMulNBits") == 5 and "MatMul" not in neuron_nodes.values()
        assert {b for name, b in bits_by_node(model).items() if "/subfit/" in name} == {8}
    ids = np.random.default_rng(5).integers(3, 256, size=(2, 16))
    want = ort_prefill_decode(out["fp32"].model_path, ids, ids[:, :1])
    got = ort_prefill_decode(out["int8"].model_path, ids, ids[:, :1])
    for a, b in zip(got[:2], want[:2]):
        assert rel_diff(a, b) < 0.08
