"""SubFit's rewrite on onnxruntime-genai model-builder graphs (tiny fixtures of every builder family, fp32 + int4).

- a zero bypass equals cutting the unit out (its contribution to the residual multiplied by zero) and the
  removed attentions' KV inputs and outputs are gone;
- the same plan gives the same logits on the builder graph as on the Optimum export of the same checkpoint
  (fp32), so the builder's bypass input (the pre-norm output 0) and residual (the next
  SkipSimplifiedLayerNormalization's skip input) are the ones calibration fits.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass

from builder_fixtures import BUILDER_FAMILIES, OVERRIDES, fixture_dir
from rewrite_helpers import random_bypass, rel_diff
from subfit_onnx.bypass import Bypass
from subfit_onnx.passes.external_data import LoadExternalTensorsPass
from subfit_onnx.passes.pipeline import SubFitRewritePass
from subfit_onnx.passes.structure import find_decoder_structure

HIDDEN, KV_HEADS, HEAD_DIM = 64, 2, 16
SLIDING = ("gemma2", "gemma3")  # GroupQueryAttention local_window_size 4096: needs a static cache that large
# layer 0 attention (reads the plain first norm), an FFN feeding the next layer's norm, both units of one layer,
# the last FFN (feeds the final norm)
UNITS = [(0, "attention", "lowrank"), (1, "mlp", "full"), (2, "attention", "full"), (2, "mlp", "lowrank"),
         (3, "mlp", "full")]


def load(family: str, precision: str) -> ir.Model:
    model = ir.load(fixture_dir(family, precision) / "model.onnx")
    LoadExternalTensorsPass(None)(model)  # inline: the rewritten copy is saved elsewhere
    return model


def save(model: ir.Model, path) -> str:
    ir.save(model, path)
    return str(path)


def run(path: str, ids: np.ndarray, next_ids: np.ndarray | None, capacity: int = 0) -> list[np.ndarray]:
    """Logits of a prefill and, with ``next_ids``, of one decode step fed the prefill's present outputs.

    ``capacity`` > 0 runs the cache as onnxruntime-genai does (static buffers of that length, past = present)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    past = {n: np.zeros((1, KV_HEADS, capacity, HEAD_DIM), np.float32) for n in names if n.startswith("past_")}

    def feed(tokens: np.ndarray, start: int) -> dict[str, np.ndarray]:
        d = {"input_ids": tokens, "attention_mask": np.ones((1, start + tokens.shape[1]), np.int64)}
        if "position_ids" in names:
            d["position_ids"] = np.arange(start, start + tokens.shape[1], dtype=np.int64)[None]
        return {**d, **past}

    first = dict(zip(outputs, sess.run(None, feed(ids, 0))))
    result = [first["logits"]]
    if next_ids is not None:
        past = {n: first[n.replace("past_key_values.", "present.")] for n in past}
        result.append(sess.run(["logits"], feed(next_ids, ids.shape[1]))[0])
    return result


def rewrite_model(model: ir.Model, bypasses) -> None:
    SubFitRewritePass(find_decoder_structure(model), bypasses)(model)


def cut_units(model: ir.Model, units) -> None:
    """Reference: multiply each unit's contribution by zero where it enters the residual stream."""
    structure = find_decoder_structure(model)
    zero = ir.Value(name="zero", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                    const_value=ir.tensor(np.zeros((), np.float32), name="zero"))
    model.graph.register_initializer(zero)
    for layer, kind, _ in units:
        unit = structure.unit(layer, kind)
        contribution = unit.residual_add.inputs[unit.unit_operand]
        node = ir.Node("", "Mul", [contribution, zero], name=f"cut/{layer}/{kind}", num_outputs=1)
        model.graph.insert_before(unit.residual_add, node)
        unit.residual_add.replace_input_with(unit.unit_operand, node.outputs[0])
    RemoveUnusedNodesPass()(model)


def tokens(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, 256, size=(1, 10)), rng.integers(3, 256, size=(1, 1))


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("family", BUILDER_FAMILIES)
def test_units_and_kv_match_the_pytorch_model(family, precision):
    """The builder's layout rows find every unit; int4 MatMulNBits count their unquantized K x N matrices."""
    from subfit_onnx.torch_model import unit_param_table
    from tiny_models import FAMILY_CONFIGS, LAYERS, tiny_model

    s = find_decoder_structure(ir.load(fixture_dir(family, precision) / "model.onnx"),
                               FAMILY_CONFIGS[family]["model_type"])
    assert s.layout.exporter == "onnxruntime-genai" and s.family_from_config
    assert (s.num_layers, s.hidden_size, s.num_kv_heads, s.head_dim) == (LAYERS, HIDDEN, KV_HEADS, HEAD_DIM)
    assert s.kv_layers() == list(range(LAYERS)) and s.dtype == ir.DataType.FLOAT
    params = unit_param_table(tiny_model(family, overrides=OVERRIDES.get(family)))
    assert {(u.layer, u.kind): u.params for u in s.units()} == params
    last_ffn = s.unit(LAYERS - 1, "mlp").residual_add
    assert last_ffn.op_type == "SkipSimplifiedLayerNormalization" and "final_norm" in last_ffn.name


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("family", BUILDER_FAMILIES)
def test_zero_bypass_equals_cut_unit(family, precision, tmp_path):
    zero = {(layer, kind): Bypass(bias=np.zeros(HIDDEN), weight=np.zeros((HIDDEN, HIDDEN)))
            for layer, kind, _ in UNITS}
    rewritten = load(family, precision)
    rewrite_model(rewritten, zero)
    reference = load(family, precision)
    cut_units(reference, UNITS)
    ids, nxt = tokens()
    capacity = 4096 if family in SLIDING else 0
    got = run(save(rewritten, tmp_path / "rewritten.onnx"), ids, nxt, capacity)
    want = run(save(reference, tmp_path / "cut.onnx"), ids, nxt, capacity)
    for a, b in zip(got, want):
        assert rel_diff(a, b) < 1e-6
    graph_inputs = {v.name for v in rewritten.graph.inputs}
    graph_outputs = {v.name for v in rewritten.graph.outputs}
    assert {f"past_key_values.{i}.{r}" for i in (1, 3) for r in ("key", "value")} <= graph_inputs
    assert not {f"past_key_values.{i}.{r}" for i in (0, 2) for r in ("key", "value")} & graph_inputs
    assert not {f"present.{i}.{r}" for i in (0, 2) for r in ("key", "value")} & graph_outputs
    assert sum(n.op_type == "GroupQueryAttention" for n in rewritten.graph) == 2
    after = find_decoder_structure(rewritten)
    assert after.layout.exporter == "onnxruntime-genai" and after.kv_layers() == [1, 3]
    assert [(u.layer, u.kind) for u in after.units() if u.bypassed] == [(u[0], u[1]) for u in UNITS]


@pytest.mark.parametrize("family", BUILDER_FAMILIES)
def test_same_plan_same_logits_as_optimum_export(family, builder_optimum_export, tmp_path):
    rng = np.random.default_rng(1)
    bypasses = {(layer, kind): random_bypass(HIDDEN, form, rng) for layer, kind, form in UNITS}
    optimum = ir.load(builder_optimum_export(family))
    rewrite_model(optimum, bypasses)
    builder = load(family, "fp32")
    rewrite_model(builder, bypasses)
    ids, nxt = tokens(2)
    sliding = family in SLIDING
    want = run(save(optimum, tmp_path / "optimum.onnx"), ids, nxt)
    got = run(save(builder, tmp_path / "builder.onnx"), ids, nxt, 4096 if sliding else 0)
    # Optimum's Gemma-2 export drops the attention soft-capping the builder applies (dense differs as much)
    tolerance = 2e-2 if family == "gemma2" else 2e-5
    for a, b in zip(got, want):
        assert rel_diff(a, b) < tolerance


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bypasses_with_neurons_give_the_same_logits_on_both_layouts(family, builder_optimum_export, tmp_path):
    """FFN bypasses that keep neurons read the same norm output and feed the same residual in a model-builder graph
    as in an Optimum export (the last FFN feeds the final norm)."""
    rng = np.random.default_rng(2)
    units = [(1, "mlp"), (3, "mlp"), (2, "attention")]
    bypasses = {(layer, kind): random_bypass(HIDDEN, "neurons" if kind == "mlp" else "lowrank", rng,
                                             activation="gelu_pytorch_tanh") for layer, kind in units}
    optimum = ir.load(builder_optimum_export(family))
    rewrite_model(optimum, bypasses)
    builder = load(family, "fp32")
    rewrite_model(builder, bypasses)
    ids, nxt = tokens(2)
    want = run(save(optimum, tmp_path / "optimum.onnx"), ids, nxt)
    got = run(save(builder, tmp_path / "builder.onnx"), ids, nxt, 4096 if family in SLIDING else 0)
    for a, b in zip(got, want):
        assert rel_diff(a, b) < 2e-5
