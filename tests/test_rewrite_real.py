"""SmolLM2-135M-Instruct at 25%: calibrated on C4, rewritten, and checked against the PyTorch reference.

The export is made once and cached under the assets root (``smollm2_onnx``); calibration runs once per module.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from rewrite_helpers import ort_prefill_decode, rel_diff, torch_prefill_decode
from subfit_onnx.exporters.rewrite import rewrite_export

pytestmark = pytest.mark.real
PROMPT = "The history of the printing press begins in"


def load_smollm2(assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.model, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(scope="module")
def calibrated(smollm2_subfit25):
    return smollm2_subfit25


@pytest.fixture(scope="module")
def rewritten(smollm2_onnx, calibrated, tmp_path_factory):
    _, plan, tensors = calibrated
    out = tmp_path_factory.mktemp("smollm2") / "rewritten"
    return out, rewrite_export(smollm2_onnx, plan, tensors, out)


@pytest.fixture(scope="module")
def reference(smollm2_assets, calibrated):
    from subfit_onnx.reference import apply_plan

    _, plan, tensors = calibrated
    return apply_plan(load_smollm2(smollm2_assets), plan, tensors)


def test_report_and_graph(calibrated, rewritten):
    _, plan, _ = calibrated
    out, report = rewritten
    assert 0.24 <= plan.sparsity.achieved <= 0.30
    onnx.checker.check_model(out / "model.onnx", full_check=True)
    attention = [u.layer for u in plan.removed_units("attention")]
    assert report.removed_kv_layers == attention
    assert report.kv_inputs_after == report.kv_inputs_before - 2 * len(attention)
    assert report.unit_params_removed == plan.sparsity.removed_params
    assert report.nodes_after < report.nodes_before
    assert report.file_bytes_after < report.file_bytes_before - 3.5 * (plan.sparsity.removed_params
                                                                       - plan.sparsity.bypass_params)


def test_prefill_and_decode_match_reference(calibrated, rewritten, reference):
    tokenizer, _, _ = calibrated
    out, _ = rewritten
    ids = tokenizer(PROMPT, return_tensors="np")["input_ids"]
    nxt = ids[:, -1:]
    got_prefill, got_decode, _ = ort_prefill_decode(out / "model.onnx", ids, nxt)
    want_prefill, want_decode = torch_prefill_decode(reference, ids, nxt)
    assert rel_diff(got_prefill, want_prefill) <= 1e-4
    assert rel_diff(got_decode, want_decode) <= 1e-4
    assert np.argmax(got_prefill[0, -1]) == np.argmax(want_prefill[0, -1])


def test_twenty_greedy_tokens_match_reference(calibrated, rewritten, reference):
    from optimum.onnxruntime import ORTModelForCausalLM

    tokenizer, _, _ = calibrated
    out, _ = rewritten
    ids = tokenizer(PROMPT, return_tensors="pt")
    kwargs = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False,
              "pad_token_id": tokenizer.eos_token_id}
    got = ORTModelForCausalLM.from_pretrained(out).generate(**ids, **kwargs)
    want = reference.generate(**ids, **kwargs)
    assert got.shape[1] == ids["input_ids"].shape[1] + 20
    assert torch.equal(got, want), tokenizer.decode(got[0]) + " | " + tokenizer.decode(want[0])
