"""Sparsity accounting and greedy / sequential selection."""

import pytest

from subfit_onnx.calibration.selection import (
    SequentialSelector,
    check_reachable,
    greedy_select,
    target_params,
)
from subfit_onnx.errors import SubFitError

PARAMS = {(i, k): (100 if k == "attention" else 300) for i in range(4) for k in ("attention", "mlp")}


def test_target_params_rejects_out_of_range():
    assert target_params(1600, 0.25) == 400
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(SubFitError, match="between 0 and 1"):
            target_params(1600, bad)


def test_unreachable_sparsity_is_refused():
    with pytest.raises(SubFitError, match="too high"):
        check_reachable(PARAMS, target_params(1600, 0.99), 0.99)
    check_reachable(PARAMS, target_params(1600, 0.9), 0.9)


def test_greedy_takes_cheapest_until_target_and_overshoots_less_than_one_unit():
    scores = {k: float(i) for i, k in enumerate(sorted(PARAMS))}
    chosen = greedy_select(scores, PARAMS, 500)
    removed = sum(PARAMS[k] for k in chosen)
    assert removed >= 500 and removed - 500 < 300
    assert chosen == sorted(sorted(PARAMS)[:3])


def test_sequential_selector_follows_fresh_scores():
    prior = {k: 1.0 for k in PARAMS}
    prior[(0, "attention")] = 0.1
    sel = SequentialSelector(prior, PARAMS, target=100)
    # The prior says remove (0, attention), but its fresh score is now the worst: keep it, remove something later.
    assert sel.decide((0, "attention"), 50.0) is False
    decisions = [sel.decide(k, 1.0) for k in sorted(PARAMS) if k != (0, "attention")]
    assert sum(decisions) >= 1 and sel.saved >= 100


def test_sequential_selector_forces_removals_when_budget_would_be_missed():
    prior = {k: 1.0 for k in PARAMS}
    sel = SequentialSelector(prior, PARAMS, target=1200)
    for k in sorted(PARAMS):
        sel.decide(k, 100.0)  # every fresh score is bad
    assert sel.saved >= 1200
