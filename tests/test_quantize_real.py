"""--quantize on SmolLM2-135M-Instruct at 25%: what int4 and int8 cost in held-out perplexity and save in bytes.

Measured (24 x 256 tokens of the second half of wiki.utf8, 64 x 256 calibration tokens): perplexity ratio to
the fp32 compressed model 1.20 for int4 and 1.004 for int8; files 445.6 MB fp32, 239.6 MB int8, 203.3 MB int4.
This test uses the shared 32 x 256 calibration and 8 held-out C4 windows, with bounds that leave room for both.
"""

from __future__ import annotations

import pytest

from subfit_onnx.evaluation.decoder import OnnxDecoder
from subfit_onnx.evaluation.perplexity import make_windows, window_perplexity
from subfit_onnx.exporters.rewrite import rewrite_export

pytestmark = pytest.mark.real


def test_int4_and_int8_cost_and_save_what_was_measured(smollm2_onnx, smollm2_subfit25, smollm2_assets,
                                                        tmp_path):
    tokenizer, plan, tensors = smollm2_subfit25
    windows = make_windows(tokenizer, smollm2_assets.c4_heldout, num_windows=8, window_len=256)
    ppl, size = {}, {}
    for quantize in (None, "int8", "int4"):
        name = quantize or "fp32"
        report = rewrite_export(smollm2_onnx, plan, tensors, tmp_path / name, quantize=quantize)
        size[name] = report.file_bytes_after
        ppl[name] = window_perplexity(OnnxDecoder(tmp_path / name), windows).perplexity
    assert ppl["int8"] / ppl["fp32"] < 1.03
    assert 1.03 < ppl["int4"] / ppl["fp32"] < 1.40  # int4 costs something real, and not a broken model's worth
    assert size["int8"] < 0.6 * size["fp32"] and size["int4"] < 0.5 * size["fp32"]
