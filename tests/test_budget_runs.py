"""optimize with a budget users think in: --kv-budget, --target-speedup, --max-ppl-ratio, end to end on tiny exports."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import subfit_onnx
from subfit_onnx import SubFitConfig, SubFitError
from subfit_onnx.cli import app
from subfit_onnx.quality_budget import Trial, search_sparsity
from subfit_onnx.report import format_summary


@pytest.fixture(scope="module")
def config(tiny_calibration_text):
    return SubFitConfig(calibration=str(tiny_calibration_text), num_samples=8, seq_len=32, heldout_windows=4)


@pytest.fixture(autouse=True)
def private_cost_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


def test_kv_budget_removes_attention_until_the_cache_fits(tmp_path, tiny_export, tiny_checkpoint, config):
    export = tiny_export("llama")
    result = subfit_onnx.optimize(export, model=tiny_checkpoint("llama"), config=config, kv_budget=0.5)
    assert result.output == export.parent / f"{export.name}-subfit-kv0.5"  # named after the request
    report = result.report
    assert report["kv_bytes_per_token"]["after"] <= 0.5 * report["kv_bytes_per_token"]["before"]
    assert report["removed_mlp"] == 0 and report["removed_attention"] >= report["num_layers"] // 2
    assert report["budget"]["kv_ratio"]["measured"] == pytest.approx(report["budget"]["kv_ratio"]["predicted"])
    assert report["sparsity"]["target"] == pytest.approx(report["sparsity"]["achieved"])
    assert "KV cache 0.50 of dense" in format_summary(report) or "KV cache 0.40 of dense" in format_summary(report)
    assert json.loads((result.output / "subfit_plan.json").read_text())["budget"]["objective"] == "kv"


def test_target_speedup_times_the_units_and_reports_predicted_against_measured(tmp_path, tiny_export,
                                                                              tiny_checkpoint, config):
    result = subfit_onnx.optimize(tiny_export("llama"), model=tiny_checkpoint("llama"), config=config,
                                  target_speedup=1.2, context=64, output=tmp_path / "out")
    decode = result.report["budget"]["decode_ratio"]
    assert 0 < decode["predicted"] <= 1 / 1.2 + 1e-9  # selection stops once the target is saved
    assert decode["measured"] > 0 and decode["context"] == 64
    assert result.report["seconds"]["unit costs"] > 0
    assert "predicted" in format_summary(result.report)


def test_target_speedup_with_int4_is_timed_against_the_int4_dense(tmp_path, tiny_export, tiny_checkpoint, config):
    result = subfit_onnx.optimize(tiny_export("llama"), model=tiny_checkpoint("llama"), config=config,
                                  target_speedup=1.2, context=64, output=tmp_path / "out", quantize="int4")
    decode = result.report["budget"]["decode_ratio"]
    assert decode["precision"] == "int4" and 0 < decode["predicted"] <= 1 / 1.2 + 1e-9
    assert decode["measured"] > 0 and "of dense int4 measured" in format_summary(result.report)
    assert result.report["quantize"]["weights"].startswith("MatMulNBits")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the int4 dense reference is not left behind


def test_an_unreachable_speedup_is_one_line_and_writes_nothing(tmp_path, tiny_export, tiny_checkpoint, config):
    with pytest.raises(SubFitError, match="cannot be reached"):
        subfit_onnx.optimize(tiny_export("llama"), model=tiny_checkpoint("llama"), config=config,
                             target_speedup=1000.0, context=64, output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_max_ppl_ratio_keeps_the_largest_sparsity_within_the_ratio(tmp_path, tiny_export, tiny_checkpoint, config):
    result = subfit_onnx.optimize(tiny_export("llama"), model=tiny_checkpoint("llama"), config=config,
                                  max_ppl_ratio=1.05, output=tmp_path / "out")
    budget, quality = result.report["budget"], result.report["quality"]
    assert quality["heldout_ppl_ratio"] <= 1.05
    curve = budget["search"]
    assert len(curve) == 5
    passing = [t for t in curve if t["heldout_ppl_ratio"] <= 1.05]
    assert result.report["sparsity"]["target"] == max(t["sparsity"] for t in passing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no trial folders left behind


def test_quality_and_kv_budgets_measure_the_quantized_model(tmp_path, tiny_export, tiny_checkpoint, config):
    common = {"model": tiny_checkpoint("llama"), "config": config, "quantize": "int8"}
    quality = subfit_onnx.optimize(tiny_export("llama"), max_ppl_ratio=1.5, output=tmp_path / "q", **common).report
    assert quality["quantize"]["precision"] == "int8"
    best = [t for t in quality["budget"]["search"] if t["sparsity"] == quality["sparsity"]["target"]]
    # the trial the search kept was measured on the int8 model it ships, against dense fp32
    assert best[0]["heldout_ppl_ratio"] == pytest.approx(quality["quality"]["heldout_ppl_ratio"], abs=1e-4)
    kv = subfit_onnx.optimize(tiny_export("llama"), kv_budget=0.5, output=tmp_path / "kv", **common).report
    assert kv["quantize"]["precision"] == "int8"
    assert kv["kv_bytes_per_token"]["after"] <= 0.5 * kv["kv_bytes_per_token"]["before"]


def test_an_unmeetable_quality_budget_is_one_line_and_writes_nothing(tmp_path, tiny_export, tiny_checkpoint, config,
                                                                     monkeypatch):
    from subfit_onnx.evaluation.heldout import HeldoutQuality

    monkeypatch.setattr(HeldoutQuality, "ratio", property(lambda self: 9.0))  # a tiny random model may even improve
    with pytest.raises(SubFitError, match=r"cannot be met: removing even 1\.6% of the block parameters \(1 units\) "
                                          r"gives 9\.00x"):
        subfit_onnx.optimize(tiny_export("llama"), model=tiny_checkpoint("llama"), config=config,
                             max_ppl_ratio=1.5, output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_the_search_bisects_towards_the_edge():
    calls = []

    def measure(s: float) -> Trial:
        calls.append(s)
        return Trial(s, 1.0 + 4 * s, round(s * 60))  # ratio 2.0 at s = 0.25

    best, trials = search_sparsity(measure, 1.5)
    assert calls[0] == 0.25 and len(trials) == 5
    assert best.sparsity == 0.125 and [t.sparsity for t in trials][-1] == 0.25  # 0.25, 0.125, 0.1875, ...: edge at 0.125
    assert [t.sparsity for t in trials] == sorted(t.sparsity for t in trials)


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "0.25", "--kv-budget", "0.5"], "error: give --sparsity or --kv-budget, not both"),
    (["--kv-budget", "0.5", "--target-speedup", "1.3"], "error: give one budget, not --target-speedup and --kv-budget"),
    (["--target-speedup", "0.8"], "error: --target-speedup 0.8: Input should be greater than 1"),
    (["--kv-budget", "1.5"], "error: --kv-budget 1.5: Input should be less than 1"),
])
def test_budget_flags_are_checked_before_any_work(tmp_path, tiny_export, args, message):
    result = CliRunner().invoke(app, ["optimize", str(tiny_export("llama")), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_calibrate_refuses_a_budget(tiny_checkpoint, config):
    with pytest.raises(SubFitError, match="use optimize for it"):
        subfit_onnx.calibrate(tiny_checkpoint("llama"), config=config.model_copy(update={"kv_budget": 0.5}))
