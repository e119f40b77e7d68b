"""The quality optimize states: held-out windows no fit saw, and a ratio equal to evaluate's on those windows."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

import subfit_onnx
from subfit_onnx import SubFitConfig
from subfit_onnx.calibration.text import calibration_split, split_stream, token_windows
from subfit_onnx.cli import app
from subfit_onnx.evaluation.decoder import OnnxDecoder
from subfit_onnx.evaluation.heldout import DENSE_FROM_CHECKPOINT, DENSE_FROM_EXPORT
from subfit_onnx.evaluation.perplexity import TokenWindows, window_perplexity
from subfit_onnx.report import format_summary


def _starts(stream: np.ndarray, windows: np.ndarray, bos: int | None) -> list[int]:
    body = windows[:, 1:] if bos is not None else windows
    return [int(w[0]) for w in body]  # the stream is arange, so a token is its own position


@pytest.mark.parametrize("bos", [None, 10_000])
def test_heldout_windows_come_after_every_calibration_window(bos):
    stream = np.arange(5_000, dtype=np.int64)
    cal, held = split_stream(stream, 8, 64, bos, 5)
    assert cal.shape == (8, 64) and held is not None and held.shape == (5, 64)
    if bos is not None:
        assert (held[:, 0] == bos).all() and (cal[:, 0] == bos).all()
    cal_starts, held_starts = _starts(stream, cal, bos), _starts(stream, held, bos)
    body = 64 - (bos is not None)
    cut = 5_000 * 8 // 13  # each side's share of the text in proportion to its windows
    assert cal_starts[-1] + body <= cut <= held_starts[0]  # no document a fit read is held out
    assert cal_starts[-1] + body > cut - 10 and held_starts[-1] + body > 5_000 - 10  # each spreads over its share
    for w in held:
        body_tokens = w[1:] if bos is not None else w
        assert (np.diff(body_tokens) == 1).all()  # contiguous text


def test_all_text_calibrates_when_there_is_none_to_hold_out():
    stream = np.arange(8 * 64 + 40, dtype=np.int64)
    cal, held = split_stream(stream, 8, 64, None, 16)
    assert held is None and np.array_equal(cal, token_windows(stream, 8, 64))
    cal, held = split_stream(np.arange(5_000), 8, 64, None, 0)
    assert held is None and np.array_equal(cal, token_windows(np.arange(5_000), 8, 64))


@pytest.fixture(scope="module")
def config(tiny_calibration_text):
    return SubFitConfig(sparsity=0.6, calibration=str(tiny_calibration_text), num_samples=8, seq_len=32,
                        heldout_windows=6)


def test_optimize_reports_the_ratio_evaluate_gives_on_the_same_windows(tmp_path, tiny_export, tiny_checkpoint,
                                                                      config, tiny_calibration_text):
    export = tiny_export("llama")
    result = subfit_onnx.optimize(export, model=tiny_checkpoint("llama"), config=config, output=tmp_path / "out",
                                  warn_ppl_ratio=None)
    quality = result.report["quality"]
    assert quality["measured"] and quality["windows"] == 6 and quality["window_len"] == 32
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    split = calibration_split(tokenizer, tiny_calibration_text, 8, 32, 6)
    cut = TokenWindows("held out", split.heldout, int(split.heldout.size), 0, split.bos)
    dense, compressed = (window_perplexity(OnnxDecoder(d), cut).perplexity for d in (export, result.output))
    assert quality["heldout_ppl_ratio"] == pytest.approx(compressed / dense, rel=1e-4)
    assert quality["dense_ppl"] == pytest.approx(dense, rel=1e-4)
    assert quality["dense_measured_on"] == DENSE_FROM_CHECKPOINT  # the fp32 checkpoint calibration loaded
    assert not quality["warning"] and "WARNING" not in format_summary(result.report)
    assert "held-out perplexity" in format_summary(result.report)
    assert result.report["seconds"]["quality"] > 0


@pytest.mark.parametrize("dtype, backend", [("fp16", "torch"), ("fp32", "onnx")])
def test_the_dense_export_is_measured_where_no_fp32_checkpoint_computes_it(tmp_path, tiny_export, tiny_checkpoint,
                                                                           config, dtype, backend):
    """An fp16 export computes something else than the fp32 checkpoint, and the onnx backend loads none: the dense
    side of the ratio is then the dense export itself, run as evaluate runs it."""
    export = tiny_export("llama", dtype)
    result = subfit_onnx.optimize(export, model=tiny_checkpoint("llama"), config=config, output=tmp_path / "out",
                                  warn_ppl_ratio=None, calibration_backend=backend)
    quality = result.report["quality"]
    assert quality["dense_measured_on"] == DENSE_FROM_EXPORT
    split = calibration_split(AutoTokenizer.from_pretrained(tiny_checkpoint("llama")), config.calibration,
                             config.num_samples, config.seq_len, config.heldout_windows)
    cut = TokenWindows("held out", split.heldout, int(split.heldout.size), 0, split.bos)
    assert quality["dense_ppl"] == pytest.approx(window_perplexity(OnnxDecoder(export), cut).perplexity, rel=1e-6)


def test_a_ratio_above_the_threshold_is_a_warning_line(tmp_path, tiny_export, tiny_checkpoint, config):
    result = subfit_onnx.optimize(tiny_export("llama"), model=tiny_checkpoint("llama"), config=config,
                                  output=tmp_path / "out", warn_ppl_ratio=1e-3)
    assert result.report["quality"]["warning"] is True
    summary = format_summary(result.report)
    assert "WARNING      that is above --warn-ppl-ratio 0.001" in summary
    reused = subfit_onnx.optimize(tiny_export("llama"), plan=result.output, output=tmp_path / "again")
    assert reused.report["quality"] == {"measured": False, "why": reused.report["quality"]["why"]}
    assert "not measured: the plan was reused" in format_summary(reused.report)


def test_a_non_positive_threshold_is_one_line(tmp_path, tiny_export, tiny_checkpoint):
    result = CliRunner().invoke(app, ["optimize", str(tiny_export("llama")), "--model", str(tiny_checkpoint("llama")),
                                      "--warn-ppl-ratio", "0", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: the perplexity ratio to warn above must be positive, not 0"]
    assert not (tmp_path / "out").exists()
