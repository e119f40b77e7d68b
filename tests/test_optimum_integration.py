"""Optimum integration: ``optimum-cli subfit``, ``SubFitOptimizer``, and ORTOptimizer after (never before) SubFit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fresh_python import fresh_python
from subfit_onnx import SubFitConfig
from subfit_onnx.errors import UnsupportedModelError
from subfit_onnx.exporters.optimum_optimizer import SubFitOptimizer

OPTIMUM_CLI = [sys.executable, "-m", "optimum.commands.optimum_cli"]


def optimum_cli(*args, timeout=600):
    return subprocess.run([*OPTIMUM_CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def config(tiny_calibration_text):
    return SubFitConfig(sparsity=0.7, calibration=str(tiny_calibration_text), num_samples=8, seq_len=32)


@pytest.fixture(scope="module")
def subfit_output(tmp_path_factory, tiny_export, tiny_checkpoint, config):
    """SubFitOptimizer on the plain export; at 0.7 the tiny llama loses attention (KV) and FFN units (its
    FFNs are 2/3 of the block parameters, so they cannot meet 0.7 alone)."""
    save_dir = tmp_path_factory.mktemp("optimum") / "subfit"
    optimizer = SubFitOptimizer.from_pretrained(tiny_export("llama"), model=tiny_checkpoint("llama"))
    assert optimizer.optimize(config, save_dir) == save_dir
    assert "A" in optimizer.last_result.report["depth_map"] or "X" in optimizer.last_result.report["depth_map"]
    return save_dir


def _logits(folder, file_name="model.onnx"):
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(folder, file_name=file_name)
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, 99, size=(2, 10)))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    generated = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=5,
                               do_sample=False)
    return logits, generated


# ---- optimum-cli ---------------------------------------------------------------------------------------------
def test_optimum_cli_subfit_help():
    out = optimum_cli("subfit", "--help", timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("optimize", "calibrate", "rewrite", "inspect", "export", "fetch-assets", "evaluate", "benchmark",
                 "genai-config"):
        assert name in out.stdout
    out = optimum_cli("subfit", "optimize", "--help", timeout=120)
    assert out.returncode == 0 and "--sparsity" in out.stdout and "--calibration" in out.stdout
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for needle in ("[default: 0.25]", "[default: 64]", "[default: 256]", "[default: auto]", "[default: fp32]"):
        assert needle in text, needle


def test_registration_keeps_optimum_cli_light_and_working():
    code = ("import sys, optimum.commands.register.register_subfit as r; "
            "heavy = {'torch', 'transformers', 'onnx', 'onnx_ir', 'onnxruntime'} & set(sys.modules); "
            "assert not heavy, heavy; print(r.REGISTER_COMMANDS[0].COMMAND.name)")
    assert fresh_python(code) == "subfit"
    assert optimum_cli("export", "onnx", "--help", timeout=120).returncode == 0  # other commands unaffected


def test_optimum_cli_subfit_optimize_end_to_end(tmp_path, tiny_checkpoint, tiny_calibration_text):
    out = tmp_path / "out"
    result = optimum_cli("subfit", "optimize", tiny_checkpoint("llama"), "--sparsity", 0.3, "--output", out,
                         "--calibration", tiny_calibration_text, "--num-samples", 8, "--seq-len", 32, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["output"] == str(out) and (out / "model.onnx").is_file()
    assert report["sparsity"]["achieved"] >= 0.3


def test_optimum_cli_subfit_errors_are_one_line(tmp_path):
    result = optimum_cli("subfit", "optimize", tmp_path / "missing.onnx", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.onnx'} does not exist"]


# ---- SubFitOptimizer -----------------------------------------------------------------------------------------
def test_subfit_optimizer_saves_its_config(subfit_output, config):
    saved = SubFitConfig.model_validate_json((subfit_output / "subfit_config.json").read_text())
    assert saved == config
    assert (subfit_output / "subfit_plan.json").is_file()


def test_subfit_optimizer_from_an_ortmodel(tmp_path, tiny_export, tiny_checkpoint, config):
    from optimum.onnxruntime import ORTModelForCausalLM

    ort_model = ORTModelForCausalLM.from_pretrained(tiny_export("llama"))
    optimizer = SubFitOptimizer.from_pretrained(ort_model, model=tiny_checkpoint("llama"))
    assert optimizer.onnx_model_path == tiny_export("llama") / "model.onnx"
    save_dir = optimizer.optimize(config.model_copy(update={"sparsity": 0.3}), tmp_path / "out")
    ORTModelForCausalLM.from_pretrained(save_dir)


# ---- ORTOptimizer after SubFit -------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ["O1", "O2"])
def test_ort_optimizer_runs_on_subfit_output_with_parity(subfit_output, tmp_path, level):
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    optimized = ORTOptimizer.from_pretrained(subfit_output).optimize(
        getattr(AutoOptimizationConfig, level)(), tmp_path / level)
    reference, ref_tokens = _logits(subfit_output)
    logits, tokens = _logits(optimized, "model_optimized.onnx")
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def test_already_fused_export_is_refused(tmp_path, tiny_export, tiny_checkpoint, config):
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    fused = ORTOptimizer.from_pretrained(tiny_export("llama")).optimize(AutoOptimizationConfig.O2(), tmp_path / "o2")
    optimizer = SubFitOptimizer.from_pretrained(fused, "model_optimized.onnx", model=tiny_checkpoint("llama"))
    with pytest.raises(UnsupportedModelError, match="already optimized by ONNX Runtime .*SkipSimplifiedLayerNormalization"):
        optimizer.optimize(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
