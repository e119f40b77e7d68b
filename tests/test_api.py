"""The Python API: optimize / calibrate / rewrite, their return values, silence, and the light top-level import."""

from __future__ import annotations

import json
import shutil

import pytest

import subfit_onnx
from fresh_python import fresh_python
from progress_recorder import Recorder
from subfit_onnx import CalibratedPlan, Result, SubFitConfig, SubFitError


@pytest.fixture(scope="module")
def config(tiny_calibration_text):
    return SubFitConfig(sparsity=0.6, calibration=str(tiny_calibration_text), num_samples=8, seq_len=32)


@pytest.fixture(scope="module")
def calibrated(tiny_checkpoint, config):
    return subfit_onnx.calibrate(tiny_checkpoint("llama"), config=config)


def test_import_is_light():
    code = ("import sys, subfit_onnx, subfit_onnx.api, subfit_onnx.cli, subfit_onnx.passes.structure; "
            "heavy = {'torch', 'transformers', 'optimum.onnxruntime'} & set(sys.modules); "
            "assert not heavy, heavy; print(subfit_onnx.optimize.__module__)")
    assert fresh_python(code) == "subfit_onnx.api"


def test_optimize_returns_paths_and_report_and_prints_nothing(tmp_path, tiny_checkpoint, config, capsys):
    hidden: set[str] = set()  # hidden folders seen while optimize works: its staging

    def look(desc: str) -> None:
        hidden.update(str(p.relative_to(tmp_path)) for p in tmp_path.rglob(".*") if p.is_dir())

    progress = Recorder(on_update=look)
    result = subfit_onnx.optimize(tiny_checkpoint("llama"), config=config, output=tmp_path / "out", progress=progress)
    assert len(hidden) == 1 and next(iter(hidden)).startswith(".out.tmp-"), hidden  # staged once, nothing nested
    assert isinstance(result, Result)
    assert result.model_path.is_file() and result.plan_path.is_file() and result.report_path.is_file()
    assert result.report == json.loads(result.report_path.read_text())
    assert result.plan.depth_map() == result.report["depth_map"]
    assert "subfit_config.json" in result.files
    assert SubFitConfig.model_validate_json((result.output / "subfit_config.json").read_text()) == config
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    names = " ".join(progress.bars)
    for phase in ("exporting", "scoring", "fitting", "rewriting", "saving"):
        assert phase in names, names
    assert all(done == total for done, total in progress.bars.values() if total), progress.bars


def test_calibrate_returns_a_plan_with_tensors(calibrated, tmp_path):
    assert isinstance(calibrated, CalibratedPlan)
    assert calibrated.path is None and calibrated.seconds > 0
    assert calibrated.plan.removed and calibrated.tensors
    saved = calibrated.save(tmp_path / "plan")
    again = CalibratedPlan.load(saved)
    assert again.plan == calibrated.plan and set(again.tensors) == set(calibrated.tensors)
    with pytest.raises(SubFitError, match=r"already exists; pass overwrite=True"):
        calibrated.save(tmp_path / "plan")


@pytest.mark.parametrize("form", ["object", "tuple", "path"])
def test_rewrite_accepts_every_plan_form(calibrated, tiny_export, tmp_path, form):
    plan = {"object": calibrated, "tuple": (calibrated.plan, calibrated.tensors),
            "path": CalibratedPlan(calibrated.plan, calibrated.tensors).save(tmp_path / "p")}[form]
    result = subfit_onnx.rewrite(tiny_export("llama"), plan, tmp_path / "out")
    assert result.report["plan"]["reused"] is True
    assert result.report["removed_attention"] == len(calibrated.plan.removed_units("attention"))


def test_one_calibration_serves_fp32_and_fp16(calibrated, tiny_export, tmp_path):
    reports = {d: subfit_onnx.rewrite(tiny_export("llama", d), calibrated, tmp_path / d).report for d in ("fp32", "fp16")}
    assert reports["fp32"]["depth_map"] == reports["fp16"]["depth_map"]
    assert reports["fp16"]["kv_bytes_per_token"]["after"] * 2 == reports["fp32"]["kv_bytes_per_token"]["after"]


def test_model_can_be_an_in_memory_module(tiny_export, config, tmp_path):
    from tiny_models import tiny_model

    result = subfit_onnx.optimize(tiny_export("llama"), config=config.model_copy(update={"sparsity": 0.3}),
                                  model=tiny_model("llama"), output=tmp_path / "out")
    assert result.report["sparsity"]["target"] == 0.3


def test_sparsity_argument_overrides_config(tiny_export, tiny_checkpoint, config, tmp_path):
    result = subfit_onnx.optimize(tiny_export("llama"), 0.25, config=config, model=tiny_checkpoint("llama"),
                                  output=tmp_path / "out")
    assert result.report["sparsity"]["target"] == 0.25


@pytest.mark.parametrize("source, backend, message", [
    ("export", "bogus", "unknown calibration backend"),
    ("checkpoint", "onnx", "the onnx calibration backend calibrates an ONNX export"),
    ("export-no-model", "torch", "--model is needed"),
])
def test_calibration_backend_seam(tiny_export, tiny_checkpoint, config, source, backend, message, tmp_path):
    path = tiny_checkpoint("llama") if source == "checkpoint" else tiny_export("llama")
    model = tiny_checkpoint("llama") if source == "export" else None
    if source == "export-no-model":  # an export whose config.json names no checkpoint that exists here
        path = shutil.copytree(path, tmp_path / "export")
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("_name_or_path", None)
        (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SubFitError, match=message):
        subfit_onnx.calibrate(path, config=config, model=model, calibration_backend=backend)


def test_invalid_settings_are_subfit_errors():
    from subfit_onnx.config import make_config

    with pytest.raises(SubFitError, match="between 0 and 1"):
        make_config(None, 1.0)
    with pytest.raises(SubFitError, match="num_samples"):
        make_config(None, 0.25, num_samples=0)
    assert make_config(SubFitConfig(seq_len=64), 0.5).seq_len == 64


def test_rewrite_refuses_a_model_source(calibrated, tiny_checkpoint, tmp_path):
    with pytest.raises(SubFitError, match="is a model, not an ONNX export"):
        subfit_onnx.rewrite(tiny_checkpoint("llama"), calibrated, tmp_path / "out")
