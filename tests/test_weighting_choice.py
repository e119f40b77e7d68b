"""weighting="auto": the end-to-end distance, the held-out rows, and the choice, checked independently."""

import numpy as np
import pytest
import torch

from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.calibration.end_to_end import stream_distance
from subfit_onnx.calibration.scoring import score
from subfit_onnx.calibration.selection import greedy_select, target_params
from subfit_onnx.calibration.weighting_choice import CANDIDATE_WEIGHTINGS, best_weighting, held_out_rows
from subfit_onnx.config import SubFitConfig
from subfit_onnx.reference import install_bypass
from subfit_onnx.torch_model import model_family, unit_param_table
from tiny_models import tiny_model

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
    assert [held_out_rows(n) for n in (1, 2, 15, 16, 64)] == [0, 1, 1, 2, 8]
    assert best_weighting({"stream": 0.2, "uniform": 0.1}) == "uniform"
    assert best_weighting({"stream": 0.1, "uniform": 0.1}) == "stream"


def _last_stream(model, tokens):
    seen = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0]))
    with torch.no_grad():
        model(torch.as_tensor(tokens))
    handle.remove()
    return seen["h"].numpy()


def test_auto_weighting_checks_each_candidate_end_to_end_on_rows_no_fit_saw():
    """Redo the check by hand: pass 1 on the first 14 rows only, a one-shot selection per weighting, the compressed
    model run on the last 2 rows. Held-out rows leaking into the statistics, a wrong bypass or a wrong stream would
    each change the distances the plan reports."""
    model = tiny_model("llama")
    config = SubFitConfig(sparsity=0.3, num_samples=16, seq_len=32, batch_size=4, weighting="auto")  # 12-15 straddle
    plan = calibrate_model(model, TOKENS, config).plan
    reported = plan.calibration["held_out_distance"]
    assert list(reported) == list(CANDIDATE_WEIGHTINGS)
    assert plan.calibration["weighting"] == best_weighting(reported) and plan.method.weighting == "auto"

    fit, held = TOKENS[:14], TOKENS[14:]
    dense_final = _last_stream(model, held)
    params = unit_param_table(model)
    target = target_params(sum(params.values()), config.sparsity)
    expected = {}
    for w in CANDIDATE_WEIGHTINGS:
        dense = calibrate_model(model, fit, config.model_copy(update={"weighting": w})).dense
        chosen = greedy_select({k: score(a, config.score, params[k]) for k, a in dense.assessments.items()},
                               params, target)
        swaps = [install_bypass(model, model_family(model), i, kind, dense.assessments[(i, kind)].bypass)
                 for i, kind in chosen]
        expected[w] = stream_distance(_last_stream(model, held), dense_final)
        for swap in reversed(swaps):
            swap.undo()
    assert expected["stream"] != pytest.approx(expected["uniform"], rel=1e-3)  # the check tells them apart
    for w in CANDIDATE_WEIGHTINGS:
        assert reported[w] == pytest.approx(expected[w], rel=1e-3, abs=1e-7)
