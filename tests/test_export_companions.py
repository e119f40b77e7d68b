"""What travels beside model.onnx: the checkpoint path in config.json and a genai_config.json that fits the graph."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from rewrite_helpers import hand_plan
from subfit_onnx.cli import app
from subfit_onnx.exporters.rewrite import rewrite_export


def test_export_records_the_checkpoint_it_came_from(tiny_checkpoint, tiny_export):
    config = json.loads((tiny_export("llama") / "config.json").read_text())
    assert config["_name_or_path"] == str(tiny_checkpoint("llama").resolve())


def test_genai_config_command_and_rewrite_regenerates_it(tiny_checkpoint, tiny_export, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    for f in tiny_export("llama").iterdir():
        (export / f.name).write_bytes(f.read_bytes())
    result = CliRunner().invoke(app, ["genai-config", str(export)])
    assert result.exit_code == 0, result.output
    dense = json.loads((export / "genai_config.json").read_text())
    assert dense["model"]["decoder"]["num_hidden_layers"] == 4

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"))
    plan, tensors = hand_plan(model, [(1, "attention", "full"), (3, "attention", "lowrank")])
    rewrite_export(export, plan, tensors, tmp_path / "out")
    rewritten = json.loads((tmp_path / "out" / "genai_config.json").read_text())
    assert rewritten["model"]["decoder"]["num_hidden_layers"] == 2  # the kept attentions, not the source's 4
