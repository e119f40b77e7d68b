"""Calibration text sources and token windows."""

import json

import numpy as np
import pytest

from subfit_onnx.calibration.text import calibration_tokens, leading_bos, load_documents, token_windows
from subfit_onnx.errors import CalibrationDataError


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    (tmp_path / "w.utf8").write_text('<doc id="1" title="A">\nFirst article.\n</doc>\n<doc id="2">\nSecond.\n</doc>\n')
    assert load_documents(tmp_path / "a.txt") == ["alpha beta"]
    assert load_documents(tmp_path / "b.jsonl") == ["gamma", "delta"]
    assert load_documents(tmp_path / "w.utf8") == ["First article.", "Second."]
    assert len(load_documents(tmp_path)) == 5


@pytest.mark.parametrize("content, message", [("", "holds no text"), ('{"other": 1}\n', "no 'text' field"),
                                              ("not json\n", "not valid JSON")])
def test_bad_local_sources(tmp_path, content, message):
    path = tmp_path / ("x.jsonl" if "{" in content or "json" in content else "x.txt")
    path.write_text(content)
    with pytest.raises(CalibrationDataError, match=message):
        load_documents(path)


def test_missing_source(tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_documents(tmp_path / "nope.txt")


def test_windows_spread_over_stream_and_refuse_short_text():
    stream = np.arange(1000)
    w = token_windows(stream, 4, 100)
    assert w.shape == (4, 100) and w[0, 0] == 0 and w[-1, -1] == 999
    with pytest.raises(CalibrationDataError, match="1000 tokens but 11 x 100 = 1100"):
        token_windows(stream, 11, 100)


class _Tok:
    """What ``leading_bos`` reads off a tokenizer: its BOS id and what it returns for a short text."""

    def __init__(self, bos, adds):
        self.bos_token_id, self.adds = bos, adds

    def __call__(self, text):
        return {"input_ids": ([self.bos_token_id] if self.adds else []) + [7]}


def test_leading_bos_only_when_the_tokenizer_adds_it():
    assert leading_bos(_Tok(2, adds=True)) == 2
    assert leading_bos(_Tok(2, adds=False)) is None  # has a BOS token but never adds it (SmolLM2)
    assert leading_bos(_Tok(None, adds=False)) is None


def test_bos_windows_keep_their_length_and_spread():
    stream = np.arange(10, 1010)
    w = token_windows(stream, 4, 100, bos=2)
    assert w.shape == (4, 100)
    assert (w[:, 0] == 2).all()
    assert w[0, 1] == 10 and w[-1, 1] == 10 + 3 * ((1000 - 99) // 3)  # 99 stream tokens, evenly spread
    np.testing.assert_array_equal(np.diff(w[:, 1:], axis=1), 1)  # contiguous stream after BOS
    with pytest.raises(CalibrationDataError, match="1000 tokens but 11 x 99 = 1089"):
        token_windows(stream, 11, 100, bos=2)


def test_calibration_windows_start_with_bos_only_when_the_tokenizer_adds_it(tmp_path):
    from tiny_checkpoints import char_tokenizer, write_text

    text = write_text(tmp_path / "cal.txt", repeats=10)
    led = calibration_tokens(char_tokenizer(adds_bos=True), text, 4, 32)
    plain = calibration_tokens(char_tokenizer(), text, 4, 32)
    assert led.shape == plain.shape == (4, 32)
    assert (led[:, 0] == 1).all() and not (plain == 1).any()
