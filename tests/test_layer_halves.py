"""Pass 2 on the PyTorch backend runs each layer as two sub-blocks (``TorchLayerRunner.splits_layers``): the
attention up to the FFN's pre-norm, then the FFN's sub-block from the kept stream. It must compute exactly what
the layer's own forward computes, in every family's layout, and give the plan the whole-layer path gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from progress_recorder import Recorder
from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.calibration.torch_backend import TorchLayerRunner
from subfit_onnx.config import SubFitConfig
from tiny_models import tiny_model

TOKENS = np.random.default_rng(7).integers(0, 256, size=(8, 32))


def assert_halves_compute_the_layer(runner) -> None:
    """Layer 1 run whole, then as its two halves: bit for bit the same outputs, kept FFN inputs and statistics."""
    try:
        whole = runner.sweep(1, ("attention", "mlp"), "uniform", "")
        expected = np.array(runner.store.next)
        mid_whole, x_whole = (np.array(a) for a in runner.store.mlp_inputs())
        runner.store.next[:] = 0.0
        halves = {**runner.sweep_attention(1, True, "uniform", ""), **runner.sweep_mlp(1, "uniform", "")}
        mid, x = runner.store.mlp_inputs()
        for got, want in ((runner.store.next, expected), (mid, mid_whole), (x, x_whole),
                          *((halves[k].gram, whole[k].gram) for k in halves),
                          *((halves[k].cross, whole[k].cross) for k in halves)):
            np.testing.assert_array_equal(np.array(got), want)
    finally:
        runner.close()


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gemma3"])
def test_two_halves_compute_the_whole_layer(family):
    assert_halves_compute_the_layer(TorchLayerRunner(tiny_model(family), TOKENS, batch_size=4))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_pass_2_in_halves_gives_the_whole_layer_plan(family, monkeypatch):
    """Same removals, scores and bypass tensors; a layer whose attention went runs its FFN once, not twice."""
    model = tiny_model(family, overrides={"num_hidden_layers": 6})
    config = SubFitConfig(sparsity=0.35, num_samples=8, seq_len=32, batch_size=4)
    progress = Recorder()
    halves = calibrate_model(model, TOKENS, config, progress=progress)
    monkeypatch.setattr(TorchLayerRunner, "splits_layers", False)
    whole = calibrate_model(model, TOKENS, config)
    assert any(u.kind == "attention" for u in halves.plan.removed)
    assert halves.plan.removed == whole.plan.removed
    assert halves.tensors.keys() == whole.tensors.keys()
    for name, tensor in whole.tensors.items():
        np.testing.assert_array_equal(halves.tensors[name], tensor)
    ffn_runs = [d for d in progress.bars if d.startswith("fitting layer") and "(FFN)" in d]
    attention_runs = [d for d in progress.bars if d.startswith("fitting layer") and "(attention)" in d]
    assert len(ffn_runs) == len(attention_runs)  # one FFN run per layer pass 2 fits


def test_the_model_is_dense_after_a_split_pass_2():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibrate_model(model, TOKENS, SubFitConfig(sparsity=0.3, num_samples=8, seq_len=32, batch_size=4))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert all(type(layer.self_attn).__name__ == "LlamaAttention" for layer in model.model.layers)


@pytest.mark.parametrize("family, dtype", [("llama", "fp32"), ("gemma3", "fp32"), ("gpt2", "fp32"), ("llama", "fp16")])
def test_onnx_halves_compute_the_whole_layer_cut(family, dtype, tiny_export):
    """The ONNX Runtime backend cuts each half out of the export; run in turn they give the whole layer's cut, fp16
    graphs included."""
    from subfit_onnx.calibration.onnx_backend import OrtLayerRunner

    assert_halves_compute_the_layer(OrtLayerRunner(tiny_export(family, dtype), TOKENS, batch_size=4))


def test_onnx_pass_2_in_halves_gives_the_whole_layer_plan(tiny_export, monkeypatch):
    from subfit_onnx.calibration.onnx_backend import OrtLayerRunner, calibrate_export

    config = SubFitConfig(sparsity=0.35, num_samples=8, seq_len=32, batch_size=4)
    progress = Recorder()
    halves = calibrate_export(tiny_export("llama"), TOKENS, config, progress=progress)
    monkeypatch.setattr(OrtLayerRunner, "splits_layers", False)
    whole = calibrate_export(tiny_export("llama"), TOKENS, config)
    assert any(u.kind == "attention" for u in halves.plan.removed)
    assert [(u.layer, u.kind) for u in halves.plan.removed] == [(u.layer, u.kind) for u in whole.plan.removed]
    for name, tensor in whole.tensors.items():
        np.testing.assert_array_equal(halves.tensors[name], tensor)
    assert any("(attention)" in d for d in progress.bars) and any("(FFN)" in d for d in progress.bars)
