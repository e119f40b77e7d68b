"""The subfit-onnx CLI end to end on tiny models: every entry point, its files, its summary and its JSON."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from subfit_onnx.cli import app

OUT_FILES = {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "subfit_plan.json", "subfit_bypass.safetensors", "subfit_report.json",
             "subfit_config.json"}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def cal(tiny_calibration_text):
    return ["-c", tiny_calibration_text, "-n", 8, "-l", 32]


@pytest.fixture(scope="module")
def optimized(tmp_path_factory, tiny_checkpoint, cal):
    """One optimize run from a checkpoint (exported on the fly), with attention and FFN removals: at 0.7 the four
    FFNs (2/3 of the block parameters) cannot meet the target alone, whatever the score."""
    out = tmp_path_factory.mktemp("cli") / "llama-subfit70"
    result = cli("optimize", tiny_checkpoint("llama"), "--sparsity", 0.7, "-o", out, *cal)
    assert result.exit_code == 0, result.output
    return out, result


def test_optimize_from_checkpoint_writes_a_loadable_folder(optimized):
    out, _ = optimized
    assert OUT_FILES <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left
    report = json.loads((out / "subfit_report.json").read_text())
    assert "A" in report["depth_map"] or "X" in report["depth_map"]
    assert report["kv_bytes_per_token"]["after"] < report["kv_bytes_per_token"]["before"]
    assert report["file_bytes"]["after"] < report["file_bytes"]["before"]

    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    model = ORTModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The quick brown", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 6


def test_inspect_counts_the_parameters_the_summary_adds_up_to(optimized):
    out, _ = optimized
    report = json.loads((out / "subfit_report.json").read_text())
    info = json.loads(cli("inspect", out, "--json").stdout)
    params = report["params"]
    assert info["block_params"] == params["block"] - params["removed"] + params["bypass"]


def test_optimize_summary_for_people(optimized):
    out, result = optimized
    report = json.loads((out / "subfit_report.json").read_text())
    text = result.stdout
    for needle in (report["depth_map"], "target 70.0%", "achieved", "net", "bypass", "file size", "KV cache",
                   "bytes/token", "wall time", "export", "calibration", "rewrite"):
        assert needle in text, needle
    assert "Traceback" not in result.output


def test_optimize_export_with_model_and_json(tmp_path, tiny_export, tiny_checkpoint, cal):
    out = tmp_path / "out"
    result = cli("optimize", tiny_export("llama") / "model.onnx", "--model", tiny_checkpoint("llama"), "-s", 0.3,
                 "-o", out, "--json", *cal)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout is pure JSON
    assert report == json.loads((out / "subfit_report.json").read_text())
    assert report["sparsity"]["target"] == 0.3
    assert report["sparsity"]["achieved"] >= 0.3
    assert report["model"]["checkpoint"] == str(tiny_checkpoint("llama"))
    assert set(report["seconds"]) >= {"checks", "calibration", "rewrite", "total"}
    assert "export" not in report["seconds"]  # an export was given: nothing exported


def test_default_output_is_beside_the_source(tmp_path, tiny_export, tiny_checkpoint, cal):
    export = shutil.copytree(tiny_export("llama"), tmp_path / "tiny-onnx")
    result = cli("optimize", export, "--model", tiny_checkpoint("llama"), "-s", 0.25, *cal)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny-onnx-subfit25" / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-onnx", "tiny-onnx-subfit25"]


def test_calibrate_then_rewrite_fp32_and_fp16(tmp_path, tiny_export, tiny_checkpoint, cal):
    """One calibration serves both precisions; rewrite needs no checkpoint."""
    plan = tmp_path / "plan"
    result = cli("calibrate", tiny_checkpoint("llama"), "-s", 0.6, "-o", plan, *cal)
    assert result.exit_code == 0, result.output
    assert {p.name for p in plan.iterdir()} == {"subfit_plan.json", "subfit_bypass.safetensors"}
    assert "subfit-onnx rewrite" in result.stdout
    for dtype in ("fp32", "fp16"):
        out = tmp_path / f"out-{dtype}"
        result = cli("rewrite", tiny_export("llama", dtype), "--plan", plan, "-o", out, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["plan"]["reused"] is True
        assert (out / "subfit_plan.json").read_text() == (plan / "subfit_plan.json").read_text()
    sizes = {d: (tmp_path / f"out-{d}" / "model.onnx").stat().st_size for d in ("fp32", "fp16")}
    assert sizes["fp16"] < sizes["fp32"]


def test_optimize_with_saved_plan_skips_calibration(tmp_path, tiny_export, tiny_checkpoint, cal):
    plan = tmp_path / "plan"
    assert cli("calibrate", tiny_checkpoint("llama"), "-s", 0.3, "-o", plan, *cal).exit_code == 0
    result = cli("optimize", tiny_export("llama"), "--plan", plan, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "calibration" not in report["seconds"]
    assert report["plan"]["path"] == str(plan)
    # a --sparsity that contradicts the plan is refused rather than silently ignored
    result = cli("optimize", tiny_export("llama"), "--plan", plan, "-s", 0.5, "-o", tmp_path / "out2")
    assert result.exit_code == 1 and "plan was made for sparsity 0.3" in result.stderr


def test_overwrite_replaces_the_output(tmp_path, tiny_export, tiny_checkpoint, cal):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    result = cli("optimize", tiny_export("llama"), "--model", tiny_checkpoint("llama"), "-s", 0.3, "-o", out,
                 "--overwrite", *cal)
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_inspect_lists_layers_params_and_kv(tiny_export):
    result = cli("inspect", tiny_export("llama") / "model.onnx")
    assert result.exit_code == 0, result.output
    assert "past_key_values.3.key" in result.stdout and "12,288" in result.stdout  # llama tiny attention params
    info = json.loads(cli("inspect", tiny_export("llama"), "--json").stdout)
    assert info["num_layers"] == 4 and len(info["kv_inputs"]) == 8
    assert all(row["attention_params"] == 12288 and row["mlp_params"] == 24576 for row in info["layers"])


def test_inspect_with_plan_previews_the_rewrite(tmp_path, tiny_export, tiny_checkpoint, cal):
    plan = tmp_path / "plan"
    assert cli("calibrate", tiny_checkpoint("llama"), "-s", 0.7, "-o", plan, *cal).exit_code == 0  # takes attention
    result = cli("inspect", tiny_export("llama"), "--plan", plan, "--json")
    assert result.exit_code == 0, result.output
    preview = json.loads(result.stdout)["plan"]
    dropped = [name for u in preview["removed"] for name in u["kv_inputs_removed"]]
    assert dropped and all(name.startswith("past_key_values.") for name in dropped)
    kv = preview["kv_bytes_per_token"]
    assert kv["after"] == kv["before"] * (1 - len(dropped) / 8)
    # the preview agrees with what the rewrite then does
    out = tmp_path / "out"
    assert cli("rewrite", tiny_export("llama"), "--plan", plan, "-o", out).exit_code == 0
    report = json.loads((out / "subfit_report.json").read_text())
    assert report["kv_bytes_per_token"]["after"] == kv["after"]
    text = cli("inspect", tiny_export("llama"), "--plan", plan).stdout
    assert preview["depth_map"] in text and "drops past_key_values" in text


def test_fetch_assets_prints_where_things_are(tmp_path, monkeypatch):
    from subfit_onnx import assets

    def fake_fetch(root, force=False, gemma=False):
        return assets.AssetPaths(tmp_path / "a")

    monkeypatch.setattr(assets, "fetch_assets", fake_fetch)
    result = cli("fetch-assets", tmp_path / "a", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model"].endswith("smollm2-135m-instruct")
    assert info["calibration_text"].endswith("c4_first_half.txt")
    assert info["wiki_heldout_text"].endswith("text/wiki_second_half.txt")
    assert [p.rsplit("/", 2)[1:] for p in info["mc_tasks"]] == [["mc", "social_iqa.jsonl"],
                                                                ["mc", "goal_inference.jsonl"]]
    assert "subfit-onnx optimize" in cli("fetch-assets", tmp_path / "a").stdout


def test_help_lists_every_command():
    text = cli("--help").stdout
    for name in ("optimize", "calibrate", "rewrite", "inspect", "export", "fetch-assets", "evaluate", "benchmark",
                 "genai-config"):
        assert name in text


def test_export_makes_the_dense_reference(tmp_path, tiny_checkpoint, tiny_calibration_text):
    source = shutil.copytree(tiny_checkpoint("llama"), tmp_path / "llama")
    result = cli("export", source)
    dense = tmp_path / "llama-onnx"  # the default: beside the model
    assert result.exit_code == 0, result.output
    assert f"-> {dense}" in result.stdout and "MB" in result.stdout
    assert {"model.onnx", "config.json", "tokenizer.json"} <= {p.name for p in dense.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "llama-onnx"]  # no staging left

    again = cli("export", source)
    assert again.exit_code == 1 and "pass --overwrite to replace it" in again.stderr
    refused = cli("export", dense, "-o", tmp_path / "x")
    assert refused.exit_code == 1 and "already an ONNX export" in refused.stderr

    # the dense export is what evaluate compares against, and optimize calibrates from it alone
    out = tmp_path / "out"
    assert cli("optimize", dense, "-s", 0.3, "-o", out, "-c", tiny_calibration_text, "-n", 8, "-l", 32).exit_code == 0
    evaluated = cli("evaluate", out, "--reference", dense, "--text", tiny_calibration_text, "--windows", 2,
                    "--window-len", 16, "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["ratios"]["perplexity"] > 0


def _options_without_a_shown_default() -> list[str]:
    import typer

    missing = []
    for name, command in typer.main.get_command(app).commands.items():
        for param in command.params:
            if getattr(param, "param_type_name", "") != "option" or param.is_flag or param.required:
                continue
            shown = param.show_default
            if not (isinstance(shown, str) and shown) and (shown is False or param.default is None):
                missing.append(f"{name} {param.opts[0]}")
    return missing


def test_help_shows_every_default():
    assert _options_without_a_shown_default() == []
    text = CliRunner().invoke(app, ["optimize", "--help"], env={"COLUMNS": "220"}).stdout
    for needle in ("[default: (0.25)]", "[default: (64)]", "[default: (256)]", "wikitext-2-raw-v1:train",
                   "[default: auto]", "[default: fp32]"):
        assert needle in text, needle
    assert "[required]" in CliRunner().invoke(app, ["rewrite", "--help"], env={"COLUMNS": "220"}).stdout  # --plan


def test_output_matches_the_pytorch_reference(optimized, tiny_calibration_text):
    """The folder the CLI wrote computes what ``apply_plan`` computes in PyTorch."""
    import onnxruntime as ort
    import torch

    from subfit_onnx.plan import load_plan
    from subfit_onnx.reference import apply_plan
    from tiny_models import tiny_model

    out, _ = optimized
    plan, tensors = load_plan(out)
    reference = apply_plan(tiny_model("llama"), plan, tensors)
    ids = np.random.default_rng(1).integers(3, 99, size=(1, 12))
    with torch.no_grad():
        expected = reference(torch.as_tensor(ids)).logits.numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(12)[None]}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            shape = [1 if not isinstance(d, int) and "batch" in str(d) else 0 if not isinstance(d, int) else d
                     for d in inp.shape]
            feeds[inp.name] = np.zeros(shape, dtype=np.float32)
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    logits = session.run(["logits"], feeds)[0]
    np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=1e-3)
