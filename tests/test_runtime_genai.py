"""genai_config.json for Optimum exports, and onnxruntime-genai running them (dense, KV gaps, SubFit output)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from subfit_onnx.errors import UnsupportedModelError
from subfit_onnx.evaluation.decoder import OnnxDecoder
from subfit_onnx.names import GENAI_CONFIG_FILE
from subfit_onnx.runtime_genai import genai_config, write_genai_config

PROMPT = [40, 41, 42, 43, 44, 45]


def test_config_for_gaps(tiny_exports):
    cfg = genai_config(tiny_exports["gaps"])
    dec = cfg["model"]["decoder"]
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    assert dec["inputs"]["position_ids"] == "position_ids"
    assert (dec["num_key_value_heads"], dec["head_size"], dec["num_attention_heads"]) == (2, 16, 4)
    assert cfg["search"]["past_present_share_buffer"] is False
    assert cfg["model"]["type"] == "llama" and cfg["model"]["vocab_size"] == 256
    assert cfg["model"]["eos_token_id"] == 2  # from generation_config.json


def test_no_kv_is_refused(tiny_exports):
    with pytest.raises(UnsupportedModelError, match="needs KV-cache inputs"):
        genai_config(tiny_exports["nokv"])


def genai_greedy(folder, n: int) -> list[int]:
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (extra 'genai')")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + n, min_length=len(PROMPT) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(PROMPT, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)[len(PROMPT):]]


@pytest.mark.parametrize("variant", ["dense", "gaps", "phi3", "compressed"])
def test_genai_generates_the_ort_tokens(tiny_exports, tiny_compressed, tmp_path, variant):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (extra 'genai')")
    src = tiny_compressed if variant == "compressed" else tiny_exports[variant]
    folder = tmp_path / variant
    shutil.copytree(src, folder)
    path = write_genai_config(folder)
    assert path == folder / GENAI_CONFIG_FILE and json.loads(path.read_text())["model"]["decoder"]["filename"] == "model.onnx"
    expected = OnnxDecoder(folder).greedy(PROMPT, 10)
    assert genai_greedy(folder, 10) == expected
