"""ORT perplexity against PyTorch, and the KV-cache scoring path against one full forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from subfit_onnx.errors import SubFitError
from subfit_onnx.evaluation.decoder import OnnxDecoder
from subfit_onnx.evaluation.logprobs import ContinuationScorer, token_logprobs
from subfit_onnx.evaluation.perplexity import TokenWindows, make_windows, window_perplexity


def torch_perplexity(model, windows: np.ndarray) -> float:
    ids = torch.as_tensor(windows)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


@pytest.fixture(scope="module")
def windows(tiny_exports, tiny_calibration_text):
    return make_windows(OnnxDecoder(tiny_exports["dense"]).tokenizer, tiny_calibration_text, 6, 64)


def test_windows_are_stated(windows):
    assert windows.windows.shape == (6, 64)
    assert windows.stride == (windows.stream_tokens - 64) // 5
    assert windows.source == "calibration.txt"


@pytest.mark.parametrize("variant", ["dense", "gaps", "nokv"])
def test_ort_perplexity_equals_pytorch(tiny_exports, tiny_checkpoint, windows, variant):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    expected = torch_perplexity(model, windows.windows)
    got = window_perplexity(OnnxDecoder(tiny_exports[variant]), windows)
    assert got.scored_tokens == 6 * 63
    assert got.num_windows == 6 and got.window_len == 64 and got.stride == windows.stride
    assert expected > 5  # a random model: far from a trivially small number
    assert abs(got.perplexity - expected) / expected < 1e-3


def test_bos_windows_as_deployed(tiny_exports, tiny_checkpoint, tiny_calibration_text):
    """A tokenizer that adds BOS gets BOS-led windows of the same length; BOS itself is never scored."""
    from tiny_checkpoints import char_tokenizer

    plain = make_windows(char_tokenizer(), tiny_calibration_text, 6, 64)
    led = make_windows(char_tokenizer(adds_bos=True), tiny_calibration_text, 6, 64)
    assert plain.bos is None and led.bos == 1
    assert led.windows.shape == (6, 64) and (led.windows[:, 0] == 1).all() and (plain.windows[:, 0] != 1).all()
    assert led.stride == (led.stream_tokens - 63) // 5
    np.testing.assert_array_equal(led.windows[0, 1:], plain.windows[0, :63])  # same text, after BOS
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32).eval()
    got = window_perplexity(OnnxDecoder(tiny_exports["dense"]), led)
    assert got.bos and got.scored_tokens == 6 * 63
    expected = torch_perplexity(model, led.windows)
    assert abs(got.perplexity - expected) / expected < 1e-3
    assert abs(got.perplexity - window_perplexity(OnnxDecoder(tiny_exports["dense"]), plain).perplexity) > 1e-3


def test_phi3_perplexity_equals_pytorch(tiny_exports, tiny_checkpoint, windows):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("phi3"), dtype=torch.float32).eval()
    expected = torch_perplexity(model, windows.windows)
    got = window_perplexity(OnnxDecoder(tiny_exports["phi3"]), windows).perplexity
    assert abs(got - expected) / expected < 1e-3


@pytest.mark.parametrize("variant", ["dense", "gaps", "nokv"])
def test_continuation_with_kv_equals_full_forward(tiny_exports, variant):
    decoder = OnnxDecoder(tiny_exports[variant])
    rng = np.random.default_rng(0)
    seq = rng.integers(3, 256, size=40)
    full = decoder.forward(seq[None, :]).logits[0]
    expected = token_logprobs(full[24:-1], seq[25:])
    scorer = ContinuationScorer(decoder, chunk=4)  # several chunks for context and continuation
    got, greedy = scorer.score(seq[:25].tolist(), seq[25:].tolist())
    np.testing.assert_allclose(got, expected, atol=1e-4)
    again, _ = scorer.score(seq[:25].tolist(), seq[25:].tolist())  # served from the cached prefill
    np.testing.assert_allclose(again, got, atol=1e-6)
    assert greedy == bool((full[24:-1].argmax(-1) == seq[25:]).all())


def test_token_logprobs_matches_log_softmax():
    logits = np.random.default_rng(1).normal(size=(5, 11)).astype(np.float32) * 30
    targets = np.array([0, 3, 10, 4, 4])
    expected = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1)[range(5), targets].numpy()
    np.testing.assert_allclose(token_logprobs(logits, targets), expected, atol=1e-5)


def test_token_ids_beyond_vocab_are_refused(tiny_exports):
    bad = TokenWindows(source="x", windows=np.full((1, 8), 300, dtype=np.int64), stream_tokens=8, stride=0)
    with pytest.raises(SubFitError, match="vocabulary"):
        window_perplexity(OnnxDecoder(tiny_exports["dense"]), bad)


def test_too_little_text_is_one_clear_error(tiny_exports, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few characters")
    with pytest.raises(SubFitError, match="evaluation text has .* tokens"):
        make_windows(OnnxDecoder(tiny_exports["dense"]).tokenizer, short, 4, 64)


def test_gemma3_without_position_ids(tiny_export, tiny_checkpoint, windows):
    """Gemma3 exports take no position_ids: inputs are fed by name, and perplexity still matches PyTorch."""
    decoder = OnnxDecoder(tiny_export("gemma3"))
    assert decoder.signature.position_ids is None and decoder.signature.has_kv
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("gemma3"), dtype=torch.float32).eval()
    expected = torch_perplexity(model, windows.windows)
    assert abs(window_perplexity(decoder, windows).perplexity - expected) / expected < 1e-3
    # and the KV path agrees with one full forward
    seq = np.arange(3, 43)
    full = decoder.forward(seq[None, :]).logits[0]
    got, _ = ContinuationScorer(decoder, chunk=8).score(seq[:20].tolist(), seq[20:].tolist())
    np.testing.assert_allclose(got, token_logprobs(full[19:-1], seq[20:]), atol=1e-4)
