"""Plan and settings files from earlier versions load, converted to today's typed form.

``data/plan-format1`` holds plans written by format 1 (method an untyped dict with int-or-float ranks,
``target="contribution"``, and baselines' numbers in the same dict): ``default`` and ``rank8`` are the same tiny
Llama calibration recorded with a fractional and a counted attention rank, ``layer_drop`` a baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import subfit_onnx
from subfit_onnx.config import Portion, SubFitConfig, read_settings, upgrade_settings_data
from subfit_onnx.errors import SubFitError
from subfit_onnx.names import SETTINGS_FILE
from subfit_onnx.plan import PLAN_FORMAT, load_plan

DATA = Path(__file__).parent / "data" / "plan-format1"


@pytest.fixture(scope="module")
def fresh(tiny_checkpoint, tiny_calibration_text):
    """The calibration the format-1 files recorded, run again by this version."""
    config = SubFitConfig(sparsity=0.4, calibration=str(tiny_calibration_text), num_samples=8, seq_len=32,
                          batch_size=4, score="stream_error", weighting="stream", prior_samples=Portion(),
                          ridge=0.1,  # what format 1 recorded
                          heldout_windows=0)  # format 1's calibration windows spread over all of the text
    return subfit_onnx.calibrate(tiny_checkpoint("llama"), config=config)


@pytest.mark.parametrize("name,rank", [("default", Portion(fraction=0.125)), ("rank8", Portion(count=8))])
def test_format1_plan_reads_as_todays_plan(fresh, name, rank):
    plan, tensors = load_plan(DATA / name)
    assert json.loads((DATA / name / "subfit_plan.json").read_text())["format"] == 1
    assert plan.format == PLAN_FORMAT and plan.baseline is None
    assert plan.method == fresh.plan.method.model_copy(update={"attention_rank": rank})
    assert plan.method.target == "unit_output"  # was "contribution"
    skip = {"name_or_path"}
    assert plan.model.model_dump(exclude=skip) == fresh.plan.model.model_dump(exclude=skip)
    assert plan.depth_map() == fresh.plan.depth_map() and plan.sparsity == fresh.plan.sparsity
    assert set(tensors) == set(fresh.tensors)
    for key, value in tensors.items():
        np.testing.assert_allclose(value, fresh.tensors[key], rtol=1e-4, atol=1e-6)


def test_format1_baseline_keeps_its_numbers_apart_from_the_method():
    plan, _ = load_plan(DATA / "layer_drop")
    assert plan.method is None and plan.baseline is not None and plan.baseline.name == "layer_drop"
    assert len(plan.baseline.details["block_influence"]) == plan.model.num_layers


def test_rewriting_a_baseline_records_no_settings(tiny_export, tmp_path):
    result = subfit_onnx.rewrite(tiny_export("llama"), DATA / "layer_drop", tmp_path / "out")
    assert SETTINGS_FILE not in result.files and result.report["plan"]["reused"]


def test_rewriting_a_calibrated_plan_records_its_settings(fresh, tiny_export, tmp_path):
    result = subfit_onnx.rewrite(tiny_export("llama"), fresh, tmp_path / "out")
    saved = read_settings(tmp_path / "out" / SETTINGS_FILE)
    assert saved.method == fresh.plan.method and (saved.num_samples, saved.seq_len) == (8, 32)
    assert SETTINGS_FILE in result.files


def test_old_settings_spellings_are_upgraded(tmp_path):
    old = {"sparsity": 0.25, "attention_rank": 2.0, "mlp_rank": 0.25, "prior_samples": 1.0, "target": "contribution",
           "calibration": None, "num_samples": 64, "seq_len": 256, "batch_size": 8}
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(old))
    settings = read_settings(tmp_path / SETTINGS_FILE)
    assert settings.attention_rank == Portion(count=2) and settings.mlp_rank == Portion(fraction=0.25)
    assert settings.prior_samples == Portion(fraction=1.0) and settings.target == "unit_output"
    assert upgrade_settings_data(settings.model_dump()) == settings.model_dump()  # today's spelling passes as is


def test_a_newer_plan_format_is_refused(tmp_path):
    data = json.loads((DATA / "default" / "subfit_plan.json").read_text())
    (tmp_path / "subfit_plan.json").write_text(json.dumps({**data, "format": PLAN_FORMAT + 1}))
    with pytest.raises(SubFitError, match="newer than this SubFit reads"):
        load_plan(tmp_path / "subfit_plan.json")
