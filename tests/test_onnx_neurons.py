"""FFN bypasses with neurons on the ONNX Runtime backend: the FFN read from the export (``onnx_ffn``), its neurons'
energies tapped as the layer runs, and plans like the PyTorch backend's.

Tolerance: as in ``test_onnx_backend``, per-batch products in float64 so that only the graphs' numerics differ;
then both backends must keep the same neurons in the same units, with bypass tensors within 1e-3 (relative
Frobenius).
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import pytest

from builder_fixtures import fixture_dir
from subfit_onnx.calibration import runner as runner_module
from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.calibration.neuron_fit import NeuronEnergy
from subfit_onnx.calibration.onnx_backend import OrtLayerRunner, calibrate_export
from subfit_onnx.calibration.onnx_ffn import find_gated_ffn, identify_activation
from subfit_onnx.calibration.stats import UnitStats
from subfit_onnx.calibration.torch_backend import TorchLayerRunner
from subfit_onnx.config import Portion, SubFitConfig
from subfit_onnx.gated_ffn import ACTIVATIONS
from subfit_onnx.passes.structure import find_decoder_structure
from subfit_onnx.plan import bypass_from_tensors
from subfit_onnx.torch_model import gated_ffn
from tiny_models import FAMILY_CONFIGS, VOCAB, tiny_model

READ_FROM_GRAPH = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3")  # Phi-3: fused gate_up
NOT_READ = ("gpt2",)  # its FFN is not gated
TOKENS = np.random.default_rng(3).integers(3, VOCAB, (16, 32))
TOL = 1e-3
CONFIG = SubFitConfig(sparsity=0.35, num_samples=16, seq_len=32, batch_size=4, attention_rank=Portion(count=8),
                      weighting="uniform")


def test_every_family_is_covered():
    assert set(READ_FROM_GRAPH) | set(NOT_READ) == set(FAMILY_CONFIGS)


def graph_structure(export):
    model = ir.load(export / "model.onnx")
    return find_decoder_structure(model, FAMILY_CONFIGS[export.name.split("-")[0]]["model_type"])


@pytest.mark.parametrize("family", READ_FROM_GRAPH)
def test_the_ffn_read_from_the_export_is_the_modules(tiny_export, family):
    """Gate, up, the down rows' weights and the activation read from the export (Phi-3: the columns of its one
    gate_up MatMul, read by running the graph's own Slices) equal the PyTorch module's."""
    model = tiny_model(family)
    runner = OrtLayerRunner(tiny_export(family), TOKENS[:2], batch_size=2)
    try:
        for i in range(runner.num_layers):
            found = find_gated_ffn(runner.structure.unit(i, "mlp"))
            assert found is not None and found.neurons.producer().op_type == "Mul", (family, i)
            assert (found.fused is not None) == (family == "phi3")
            mine, theirs = runner.gated_ffn(i), gated_ffn(model, i)
            assert mine is not None and mine.activation == theirs.activation
            np.testing.assert_allclose(mine.gate, theirs.gate, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(mine.up, theirs.up, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(mine.out_weight, theirs.out_weight, rtol=1e-6)
    finally:
        runner.close()


@pytest.mark.parametrize("family", NOT_READ)
def test_ffns_the_graph_does_not_show_as_gate_and_up_are_not_read(tiny_export, family):
    structure = graph_structure(tiny_export(family))
    assert all(find_gated_ffn(structure.unit(i, "mlp")) is None for i in range(structure.num_layers))
    assert find_gated_ffn(structure.unit(0, "attention")) is None


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_an_fp16_export_gives_float32_weights(tiny_export, family):
    """Phi-3's columns come out exact although float16 cannot hold every column index (read in two digits)."""
    runner = OrtLayerRunner(tiny_export(family, "fp16"), TOKENS[:2], batch_size=2)
    try:
        found = find_gated_ffn(runner.structure.unit(1, "mlp"))
        assert found is not None and found.gate.const_value.dtype == ir.DataType.FLOAT16
        mine, theirs = runner.gated_ffn(1), gated_ffn(tiny_model(family), 1)
    finally:
        runner.close()
    assert mine.gate.dtype == np.float32 and mine.activation == theirs.activation
    np.testing.assert_allclose(mine.gate, theirs.gate, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(mine.up, theirs.up, rtol=1e-3, atol=1e-3)


def test_column_indices_survive_float16():
    """Indices up to 2 x 8192 columns, through float16 and back."""
    from subfit_onnx.calibration.onnx_ffn import COLUMN_BASE, read_columns

    width = 2 * 8192
    index = np.arange(width)
    high, low = (index // COLUMN_BASE).astype(np.float16), (index % COLUMN_BASE).astype(np.float16)
    gate, up = read_columns([high[:8192], high[8192:]], [low[:8192], low[8192:]], 8192)
    np.testing.assert_array_equal(gate, index[:8192])
    np.testing.assert_array_equal(up, index[8192:])
    assert read_columns([high[:8192], high[:8192]], [low[:8192], low[:8191]], 8192) is None


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_sweep_taps_the_same_energies_as_pytorch(tiny_export, family):
    """Stream weighting, so the per-token weights from the layer's outputs count too."""
    energies = {}
    for name, make in (("onnx", lambda: OrtLayerRunner(tiny_export(family), TOKENS, batch_size=4)),
                       ("torch", lambda: TorchLayerRunner(tiny_model(family), TOKENS, batch_size=4))):
        runner = make()
        try:
            energy = NeuronEnergy("stream")
            runner.sweep(0, ("mlp",), "stream", "", neurons=energy)
            energies[name] = energy.of(runner.gated_ffn(0))
        finally:
            runner.close()
    np.testing.assert_allclose(energies["onnx"], energies["torch"], rtol=1e-4, atol=1e-6 * energies["torch"].max())


def test_a_bypass_with_neurons_is_removed_without_a_trace(tiny_export):
    """Undo leaves no initializer of the bypass behind: its neurons and the activation's constants included."""
    result = calibrate_model(tiny_model("gemma3"), TOKENS, CONFIG.model_copy(update={"ffn_bypass": "neurons"}))
    unit = next(u for u in result.plan.removed_units("mlp") if u.bypass.form == "neurons")
    runner = OrtLayerRunner(tiny_export("gemma3"), TOKENS[:4], batch_size=2)
    try:
        before = set(runner.model.graph.initializers)
        swap = runner.install_bypass(unit.layer, "mlp", bypass_from_tensors(unit, result.tensors))
        added = set(runner.model.graph.initializers) - before
        assert any(name.endswith(".neuron_gate") for name in added) and any("gelu" in name for name in added)
        assert find_gated_ffn(runner.structure.unit(unit.layer, "mlp")) is None  # a bypass has no neurons to read
        swap.undo()
        assert set(runner.model.graph.initializers) == before
        assert find_gated_ffn(runner.structure.unit(unit.layer, "mlp")) is not None
    finally:
        runner.close()


@pytest.fixture(scope="module", params=[("llama", "neurons"), ("gemma3", "neurons"), ("phi3", "neurons"),
                                        ("llama", "auto"), ("qwen2", "auto")])
def both_backends(request, tiny_export):
    family, ffn_bypass = request.param
    config = CONFIG.model_copy(update={"ffn_bypass": ffn_bypass})
    exact = functools.partial(UnitStats, product_dtype=np.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner_module, "UnitStats", exact)
        return (family, ffn_bypass, calibrate_export(tiny_export(family), TOKENS, config),
                calibrate_model(tiny_model(family), TOKENS, config))


def test_plans_with_neurons_match_pytorch(both_backends):
    family, ffn_bypass, onnx_result, torch_result = both_backends
    mine, theirs = onnx_result.plan, torch_result.plan
    assert [u.key for u in mine.removed] == [u.key for u in theirs.removed]
    forms = [(u.bypass.form, u.bypass.rank, u.bypass.neurons) for u in theirs.removed]
    assert [(u.bypass.form, u.bypass.rank, u.bypass.neurons) for u in mine.removed] == forms
    assert any(u.bypass.form == "neurons" for u in theirs.removed), (family, ffn_bypass, forms)
    assert set(onnx_result.tensors) == set(torch_result.tensors)
    for name, want in torch_result.tensors.items():
        got = onnx_result.tensors[name]
        error = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
        assert error < TOL, (family, ffn_bypass, name, error)


def test_the_activation_is_what_the_graph_computes():
    """Known by its values on -8..8 in fp32 and fp16; any other activation is not one SubFit builds."""
    x = np.linspace(-8, 8, 256).reshape(1, 2, 128)
    for name, function in ACTIVATIONS.items():
        assert identify_activation(x.astype(np.float32), function(x).astype(np.float32)) == name
        assert identify_activation(x.astype(np.float16), function(x).astype(np.float16)) == name
    assert identify_activation(x.astype(np.float32), np.maximum(x, 0).astype(np.float32)) is None


@pytest.mark.parametrize(("family", "activation"), [("llama", "silu"), ("gemma", "gelu_pytorch_tanh")])
def test_a_builder_graph_names_no_activation_yet_its_ffns_are_read(family, activation):
    """genai_config.json has no hidden_act: the activation comes from running the graph's own."""
    runner = OrtLayerRunner(fixture_dir(family, "fp32"), TOKENS[:4], batch_size=2)
    try:
        assert all(runner.gated_ffn(i).activation == activation for i in range(runner.num_layers))
    finally:
        runner.close()
