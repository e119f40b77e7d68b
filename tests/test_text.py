"""Calibration text sources and token windows."""

import json

import numpy as np
import pytest

from subfit_onnx.calibration.text import load_documents, token_windows
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
