"""``rewrite`` on a model-builder folder (genai_config.json, no config.json): both runtimes run the result."""

from __future__ import annotations

import json

import numpy as np
import pytest

from builder_fixtures import BUILDER_FAMILIES, OVERRIDES, fixture_dir
from rewrite_helpers import hand_plan
from subfit_onnx.exporters.rewrite import rewrite_export
from tiny_models import FAMILY_CONFIGS, tiny_model

UNITS = [(1, "attention", "lowrank"), (2, "mlp", "full")]
PROMPT = [5, 9, 13, 40, 41, 42]


def optimum_greedy(folder, steps: int) -> list[int]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(folder, file_name="model.onnx")
    ids = torch.tensor([PROMPT])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("family", BUILDER_FAMILIES)
def test_every_family_rewrites_from_its_builder_folder(family, precision, tmp_path):
    """config.json comes from genai_config.json, genai_config.json keeps the builder's settings with the kept
    layer count, the builder's weights file is not carried over, and Optimum generates from the result."""
    plan, tensors = hand_plan(tiny_model(family, overrides=OVERRIDES.get(family)), UNITS)
    out = tmp_path / "out"
    report = rewrite_export(fixture_dir(family, precision), plan, tensors, out)
    assert report.removed_kv_layers == [1] and report.family == plan.model.family
    source_genai = json.loads((fixture_dir(family, precision) / "genai_config.json").read_text())
    genai = json.loads((out / "genai_config.json").read_text())
    source_genai["model"]["decoder"]["num_hidden_layers"] = 3
    assert genai == source_genai
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == FAMILY_CONFIGS[family]["model_type"] and config["subfit"]["kv_layers"] == [0, 2, 3]
    assert not (out / "model.onnx.data").exists()
    if family not in ("gemma2", "gemma3"):  # sliding-window GQA needs a static cache (onnxruntime-genai's)
        assert len(optimum_greedy(out, 3)) == 3


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_rewritten_builder_folder_runs_in_optimum_and_genai(precision, tmp_path):
    plan, tensors = hand_plan(tiny_model("llama"), UNITS)
    out = tmp_path / "out"
    report = rewrite_export(fixture_dir("llama", precision), plan, tensors, out)
    assert report.removed_kv_layers == [1] and report.family == "llama"
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 3
    assert genai["search"]["past_present_share_buffer"] is True
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["subfit"]["kv_layers"] == [0, 2, 3]
    assert not (out / "model.onnx.data").exists()  # the source's weights file is not carried over
    tokens = optimum_greedy(out, 6)
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 6, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([PROMPT], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    assert list(generator.get_sequence(0))[len(PROMPT):] == tokens


def test_optimize_builder_int4_folder_without_checkpoint(tmp_path, tiny_calibration_text):
    """No config.json and no checkpoint: the ONNX backend calibrates the int4 graph itself."""
    import shutil

    from test_cli_errors import cli
    from tiny_checkpoints import char_tokenizer

    source = tmp_path / "llama-int4"
    shutil.copytree(fixture_dir("llama", "int4"), source)
    char_tokenizer().save_pretrained(source)
    out = tmp_path / "out"
    result = cli("optimize", source, "--sparsity", "0.3", "-c", tiny_calibration_text, "--num-samples", "8",
                 "--seq-len", "64", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["plan"]["calibration"]["backend"] == "onnx"
    plan = json.loads((out / "subfit_plan.json").read_text())
    assert plan["removed"] and plan["model"]["family"] == "llama"
    kept = json.loads((out / "config.json").read_text())["subfit"]["kv_layers"]
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == len(kept)
    assert len(optimum_greedy(out, 4)) == 4


def test_evaluation_opens_a_builder_folder():
    """evaluate/benchmark read a builder folder's facts from genai_config.json, as optimize does."""
    from subfit_onnx.evaluation.decoder import OnnxDecoder

    decoder = OnnxDecoder(fixture_dir("llama", "int4"))
    step = decoder.forward(np.array([PROMPT]))
    again = decoder.forward(np.array([[7]]), step.past)
    assert step.logits.shape == (1, len(PROMPT), 256) and again.logits.shape == (1, 1, 256)
    assert decoder.signature.kv and np.isfinite(again.logits).all()
