"""weighting="auto": the end-to-end distance, the held-out rows, and the choice after pass 2, checked independently."""

import copy

import numpy as np
import pytest
from typer.testing import CliRunner

import subfit_onnx
from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.calibration.end_to_end import stream_distance
from subfit_onnx.calibration.weighting_choice import CANDIDATE_WEIGHTINGS, best_weighting, held_out_rows
from subfit_onnx.cli import app
from subfit_onnx.config import Portion, SubFitConfig
from subfit_onnx.plan import bypass_tensors, load_plan
from subfit_onnx.reference import BypassModule, apply_plan
from subfit_onnx.report import format_summary
from tiny_models import last_stream, tiny_model

TOKENS = np.random.default_rng(1).integers(0, 256, size=(16, 32))


def test_stream_distance_is_mean_one_minus_cosine_per_token():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 5, 8))
    assert stream_distance(h, h) == pytest.approx(0.0, abs=1e-12)
    assert stream_distance(h * rng.uniform(0.1, 9.0, size=(3, 5, 1)), h) == pytest.approx(0.0, abs=1e-12)
    flipped = h.copy()
    flipped[0, 0] *= -1.0  # one token of 15 points the other way: 1 - cos = 2
    assert stream_distance(flipped, h) == pytest.approx(2.0 / 15.0)
    with pytest.raises(ValueError, match="shapes differ"):
        stream_distance(h[:2], h)


def test_held_out_rows_and_ties():
    assert [held_out_rows(n) for n in (1, 2, 15, 16, 64)] == [0, 0, 0, 2, 8]
    assert best_weighting({"stream": 0.2, "uniform": 0.1}) == "uniform"
    assert best_weighting({"stream": 0.1, "uniform": 0.1}) == "stream"


def test_auto_weighting_runs_pass_2_per_candidate_and_checks_it_on_rows_no_fit_saw():
    """Redo the check by hand: a whole calibration (pass 1 and pass 2) per weighting on the first 14 rows, each
    compressed model run on the last 2 rows. Held-out rows leaking into the check, a wrong stream or the loser's
    units would each show. The winner's bypasses are then refitted on all 16 rows (next test)."""
    model = tiny_model("llama")
    config = SubFitConfig(sparsity=0.3, num_samples=16, seq_len=32, batch_size=4, weighting="auto",  # 12-15 straddle
                          score="stream_error",  # end_to_end's probe row would be row 13 in the by-hand runs
                          ffn_bypass="linear")  # the by-hand fits are linear ones
    auto = calibrate_model(model, TOKENS, config)
    reported = auto.plan.calibration["held_out_distance"]
    assert list(reported) == list(CANDIDATE_WEIGHTINGS)
    winner = auto.plan.calibration["weighting"]
    assert winner == best_weighting(reported) and auto.plan.method.weighting == "auto"
    assert not [m for m in model.modules() if isinstance(m, BypassModule)]  # the model is dense again

    fit, held = TOKENS[:14], TOKENS[14:]
    dense_final = last_stream(model, held)
    expected, plans = {}, {}
    for w in CANDIDATE_WEIGHTINGS:
        plans[w] = calibrate_model(model, fit, config.model_copy(update={"weighting": w}))
        compressed = apply_plan(copy.deepcopy(model), plans[w].plan, plans[w].tensors)
        expected[w] = stream_distance(last_stream(compressed, held), dense_final)
    assert expected["stream"] != pytest.approx(expected["uniform"], rel=1e-3)  # the check tells them apart
    for w in CANDIDATE_WEIGHTINGS:
        assert reported[w] == pytest.approx(expected[w], rel=1e-3, abs=1e-7)
    kept = plans[winner]
    assert [(u.layer, u.kind) for u in auto.plan.removed] == [(u.layer, u.kind) for u in kept.plan.removed]
    assert auto.tensors.keys() == kept.tensors.keys()
    for name, tensor in auto.tensors.items():  # refitted: the held-out rows now count
        assert not np.allclose(tensor, kept.tensors[name], rtol=1e-3, atol=1e-5), name


@pytest.mark.parametrize("weighting", CANDIDATE_WEIGHTINGS)
def test_the_winner_is_refitted_on_every_row(weighting, monkeypatch):
    """The first removed unit has nothing removed upstream, so its refit is the dense model's fit on all 16 rows.

    Batches of 2 rows: ``stream`` normalises token weights per batch, so only a batch that does not straddle the
    held-out rows sums exactly as in a calibration on every row.
    """
    monkeypatch.setattr("subfit_onnx.calibration.calibrate.best_weighting", lambda distances: weighting)
    model = tiny_model("llama")
    config = SubFitConfig(sparsity=0.3, num_samples=16, seq_len=32, batch_size=2, weighting="auto",
                          prior_samples=Portion(),  # pass 1 on every row: its fits are the expected ones
                          ffn_bypass="linear")  # which pass 1 fits linear
    auto = calibrate_model(model, TOKENS, config)
    assert auto.plan.calibration["weighting"] == weighting
    first = auto.plan.removed[0]
    every_row = calibrate_model(model, TOKENS, config.model_copy(update={"weighting": weighting}))
    expected = bypass_tensors(first.key, every_row.dense.assessments[(first.layer, first.kind)].bypass)
    assert expected.keys() <= auto.tensors.keys()
    for name, tensor in expected.items():
        np.testing.assert_allclose(auto.tensors[name], tensor, rtol=1e-4, atol=1e-6)


def test_auto_weighting_can_leave_the_winner_installed():
    model = tiny_model("llama")
    config = SubFitConfig(sparsity=0.3, num_samples=16, seq_len=32, batch_size=4, weighting="auto")
    auto = calibrate_model(model, TOKENS, config, keep_compressed=True)
    installed = {(m.layer_idx, m.kind): m for m in model.modules() if isinstance(m, BypassModule)}
    assert sorted(installed) == [(u.layer, u.kind) for u in auto.plan.removed]
    for unit in auto.plan.removed:  # the refitted bypasses, the plan's own
        module = installed[(unit.layer, unit.kind)]
        for role, name in unit.bypass.tensors.items():
            np.testing.assert_array_equal(getattr(module, role).numpy(), auto.tensors[name])


def test_the_summary_says_which_weighting_won_and_on_what(tmp_path, tiny_export, tiny_checkpoint,
                                                          tiny_calibration_text):
    config = SubFitConfig(sparsity=0.3, calibration=str(tiny_calibration_text), num_samples=16, seq_len=32,
                          weighting="auto")
    result = subfit_onnx.optimize(tiny_export("llama"), model=tiny_checkpoint("llama"), config=config,
                                  output=tmp_path / "out", warn_ppl_ratio=None)
    calibration = result.report["plan"]["calibration"]
    distances = calibration["held_out_distance"]
    line = next(x for x in format_summary(result.report).splitlines() if x.lstrip().startswith("calibration"))
    assert line == (f"  calibration  torch backend, {calibration['weighting']} token weighting (chosen by held-out "
                    f"stream distance: stream {distances['stream']:.4f}, uniform {distances['uniform']:.4f})")
    assert calibration["weighting"] == best_weighting(distances)


def test_a_reused_pass_1_checks_again_and_leaves_the_earlier_plan_its_own_record():
    """Benchmarks and --max-ppl-ratio reuse pass 1 across budgets: each plan is chosen on its own distances."""
    model = tiny_model("llama")
    config = SubFitConfig(sparsity=0.3, num_samples=16, seq_len=32, batch_size=4, weighting="auto")
    first = calibrate_model(model, TOKENS, config)
    recorded = dict(first.plan.calibration["held_out_distance"])
    second = calibrate_model(model, TOKENS, config.model_copy(update={"sparsity": 0.5}), dense=first.dense)
    assert first.plan.calibration["held_out_distance"] == recorded
    theirs = second.plan.calibration["held_out_distance"]
    assert theirs != recorded and second.plan.calibration["weighting"] == best_weighting(theirs)


@pytest.mark.parametrize("flag, chosen_by_check", [((), False), (("--weighting", "auto"), True),
                                                   (("--weighting", "stream"), False)])
def test_the_weighting_flag(tiny_checkpoint, tiny_calibration_text, tmp_path, flag, chosen_by_check):
    args = ["calibrate", str(tiny_checkpoint("llama")), "-s", "0.3", "-c", str(tiny_calibration_text), "-n", "16",
            "-l", "32", "--json", "-o", str(tmp_path / "plan"), *flag]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    plan = load_plan(tmp_path / "plan")[0]
    assert plan.method.weighting == (flag[1] if flag else "uniform")
    assert ("held_out_distance" in plan.calibration) is chosen_by_check
    assert plan.calibration["weighting"] == (best_weighting(plan.calibration["held_out_distance"]) if chosen_by_check
                                             else plan.method.weighting)
