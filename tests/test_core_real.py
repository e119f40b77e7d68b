"""SmolLM2-135M-Instruct at 25% in PyTorch: held-out Wikipedia perplexity after calibrating on C4.

The bound is measured, not hoped for: see the constant's comment.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from subfit_onnx.calibration.text import load_documents, token_windows, tokenize_documents
from subfit_onnx.reference import apply_plan
from subfit_onnx.torch_eval import torch_perplexity

pytestmark = pytest.mark.real

# Measured with the fixture's settings (32 x 256 C4 tokens, default config) on 24 wiki windows of 256 tokens:
# 1.961 (dense 29.41) with the end-to-end score; the local score of earlier defaults measured 1.869. The bound
# leaves 7% for platform numerics; a regression in scoring or fitting moves the ratio far more (the paper's
# straightforward scores give 5.4-5.7).
MAX_WIKI_PPL_RATIO = 2.1


def _model(assets):
    return AutoModelForCausalLM.from_pretrained(assets.model, dtype=torch.float32, attn_implementation="sdpa").eval()


def test_perplexity_ratio_at_25_percent(smollm2_assets, smollm2_subfit25):
    tokenizer, plan, tensors = smollm2_subfit25
    windows = token_windows(tokenize_documents(tokenizer, load_documents(smollm2_assets.wiki)), 24, 256)
    dense = torch_perplexity(_model(smollm2_assets), windows)
    compressed = torch_perplexity(apply_plan(_model(smollm2_assets), plan, tensors), windows)
    ratio = compressed / dense
    assert 20 < dense < 35  # the real model, not a broken conversion (measured 26.2 on 48 windows)
    assert 0.24 <= plan.sparsity.achieved < 0.25 + 2.7e6 / plan.sparsity.block_params
    assert 1.0 < ratio <= MAX_WIKI_PPL_RATIO, f"wiki perplexity ratio {ratio:.3f}"
