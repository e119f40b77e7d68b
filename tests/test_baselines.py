"""Layer-level baselines as plans: what they remove, and that ReplaceMe's map fits its block."""

import numpy as np
import pytest
import torch

from subfit_onnx.baselines import drop_bypasses, layer_drop_plan, replaceme_plan
from subfit_onnx.calibration.calibrate import _block_influence, calibrate_model
from subfit_onnx.config import SubFitConfig
from subfit_onnx.reference import apply_plan
from tiny_models import LAYERS, tiny_model

TOKENS = np.random.default_rng(0).integers(0, 256, size=(8, 32))


@pytest.fixture(scope="module")
def subfit():
    return calibrate_model(tiny_model("llama"), TOKENS, SubFitConfig(sparsity=0.3, num_samples=8, seq_len=32))


def test_block_influence_is_one_minus_the_mean_token_cosine():
    """Products in float32, with a first token of massive norm (~25,000, as SmolLM2's), agree with float64."""
    rng = np.random.default_rng(5)
    before = rng.standard_normal((12, 16, 64)).astype(np.float32)
    before[:, 0] *= 2.5e4 / np.linalg.norm(before[:, 0], axis=-1, keepdims=True)
    after = (before + 0.3 * rng.standard_normal(before.shape)).astype(np.float32)
    a, b = before.astype(np.float64), after.astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert _block_influence(before, after) == pytest.approx(1.0 - cos.mean(), abs=1e-8)
    assert _block_influence(before, before) == pytest.approx(0.0, abs=1e-7)


def test_layer_drop_removes_whole_layers_of_lowest_influence(subfit):
    plan, tensors = layer_drop_plan(tiny_model("llama"), subfit.dense, 0.3)
    layers = sorted({u.layer for u in plan.removed})
    assert len(layers) == 2 and len(plan.removed) == 4  # ceil(0.3 * 4 layers) whole layers
    lowest = sorted(np.argsort(subfit.dense.block_influence)[:2].tolist())
    assert layers == lowest
    assert all(u.bypass.form == "constant" and not tensors[f"{u.key}.bias"].any() for u in plan.removed)
    assert plan.sparsity.achieved == pytest.approx(0.5)


def test_replaceme_block_is_contiguous_and_its_map_beats_identity():
    model = tiny_model("llama")
    plan, tensors = replaceme_plan(model, TOKENS, 0.3)
    layers = sorted({u.layer for u in plan.removed})
    assert layers == list(range(layers[0], layers[0] + 2)) and layers[-1] < LAYERS - 1
    fitted = [u for u in plan.removed if u.bypass.form == "full"]
    assert len(fitted) == 1 and fitted[0].kind == "attention" and fitted[0].layer == layers[0]
    assert 0.0 < fitted[0].fit_error < 1.0
    out = apply_plan(tiny_model("llama"), plan, tensors)(torch.as_tensor(TOKENS[:2])).logits
    assert torch.isfinite(out).all()


def test_drop_bypasses_keeps_selection_and_zeroes_maps(subfit):
    plan, tensors = drop_bypasses(subfit.plan, subfit.tensors)
    assert [(u.layer, u.kind) for u in plan.removed] == [(u.layer, u.kind) for u in subfit.plan.removed]
    assert plan.sparsity.bypass_params == sum(u.bypass.params for u in plan.removed)
    assert all(not t.any() for t in tensors.values())
