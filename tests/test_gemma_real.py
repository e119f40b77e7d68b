"""Gemma-3-270m, the second real model (BOS-led, sliding-window attention, four norms per layer), through optimize.

Defaults are kept only if they hold here too, not just on SmolLM2: the held-out quality optimize states is
bounded, the KV cache of every removed attention is gone, and ONNX Runtime computes what the PyTorch reference
with the same plan computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import subfit_onnx
from rewrite_helpers import ort_prefill_decode, rel_diff, torch_prefill_decode
from subfit_onnx import SubFitConfig
from subfit_onnx.plan import load_plan

pytestmark = pytest.mark.real
PROMPT = "The history of the printing press begins in"


@pytest.fixture(scope="module")
def optimized(gemma3_assets, tmp_path_factory):
    config = SubFitConfig(sparsity=0.25, calibration=str(gemma3_assets.c4_calibration), num_samples=32,
                          seq_len=256, heldout_windows=8)
    return subfit_onnx.optimize(gemma3_assets.gemma3, config=config,
                                output=tmp_path_factory.mktemp("gemma3") / "subfit25")


def test_quality_is_stated_on_bos_led_windows_and_bounded(optimized):
    quality = optimized.report["quality"]
    assert quality["measured"] and quality["bos_led"] and quality["windows"] == 8
    assert 1.0 < quality["heldout_ppl_ratio"] < 8.0  # layer drop at 25% is about 14x on held-out wiki


def test_removed_attention_takes_its_kv_cache_along(optimized):
    report = optimized.report
    kv = report["kv_inputs"]
    assert kv["after"] == kv["before"] - 2 * report["removed_attention"]
    assert 0.24 <= report["sparsity"]["achieved"] <= 0.30


def test_onnx_runtime_matches_the_pytorch_reference(gemma3_assets, optimized):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from subfit_onnx.reference import apply_plan

    plan, tensors = load_plan(optimized.output)
    model = AutoModelForCausalLM.from_pretrained(gemma3_assets.gemma3, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    reference = apply_plan(model, plan, tensors)
    ids = AutoTokenizer.from_pretrained(gemma3_assets.gemma3)(PROMPT, return_tensors="np")["input_ids"]
    assert ids[0, 0] == 2  # BOS first, as deployed
    nxt = ids[:, -1:]
    got_prefill, got_decode, _ = ort_prefill_decode(optimized.model_path, ids, nxt)
    want_prefill, want_decode = torch_prefill_decode(reference, ids, nxt)
    assert rel_diff(got_prefill, want_prefill) <= 1e-3
    assert rel_diff(got_decode, want_decode) <= 1e-3
    assert np.argmax(got_prefill[0, -1]) == np.argmax(want_prefill[0, -1])
