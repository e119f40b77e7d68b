"""Budgets in the currency the user cares about: KV bytes and decode milliseconds instead of parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from subfit_onnx.calibration.budget import Budget, kv_budget, latency_budget, params_budget
from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.config import Portion, SubFitConfig
from subfit_onnx.errors import SubFitError
from tiny_models import LAYERS, tiny_model

TOKENS = np.random.default_rng(0).integers(0, 256, size=(8, 32))
CONFIG = SubFitConfig(sparsity=0.3, num_samples=8, seq_len=32, batch_size=4, attention_rank=Portion(count=8))
KEYS = [(i, kind) for i in range(LAYERS) for kind in ("attention", "mlp")]


def _kinds(plan) -> dict[str, int]:
    return {kind: sum(u.kind == kind for u in plan.removed) for kind in ("attention", "mlp")}


def test_kv_budget_removes_attentions_only_until_the_cache_fits():
    savings = {k: (1000.0 if k[1] == "attention" else 0.0) for k in KEYS}  # an FFN holds no KV cache
    plan = calibrate_model(tiny_model("llama"), TOKENS, CONFIG, budget=kv_budget(savings, 0.5)).plan
    assert _kinds(plan) == {"attention": math.ceil(LAYERS / 2), "mlp": 0}


def test_latency_budget_prefers_what_costs_time_over_what_holds_parameters():
    model = tiny_model("llama")
    params = calibrate_model(model, TOKENS, CONFIG).plan
    # attention made 10x as costly per unit as an FFN (a small model's decode step: node overhead and KV reads)
    unit_ms = {k: (1.0 if k[1] == "attention" else 0.1) for k in KEYS}
    step_ms = sum(unit_ms.values()) + 1.0
    fast = calibrate_model(model, TOKENS, CONFIG, budget=latency_budget(unit_ms, step_ms, 1.3, 512)).plan
    saved = sum(unit_ms[(u.layer, u.kind)] for u in fast.removed)
    assert saved >= step_ms * (1 - 1 / 1.3)
    assert _kinds(fast)["attention"] > _kinds(params)["attention"]


def test_the_parameter_budget_is_the_sparsity_target():
    model = tiny_model("llama")
    implicit = calibrate_model(model, TOKENS, CONFIG).plan
    params = {k: (implicit.model.attention_params_per_layer if k[1] == "attention"
                  else implicit.model.mlp_params_per_layer) for k in KEYS}
    explicit = calibrate_model(model, TOKENS, CONFIG, budget=params_budget(params, CONFIG.sparsity)).plan
    assert [u.key for u in explicit.removed] == [u.key for u in implicit.removed]


@pytest.mark.parametrize("budget,needle", [
    (Budget("kv", {k: 0.0 for k in KEYS}, 1.0, "a KV cache of at most 0.5 of dense"), "no attention or FFN saves"),
    (Budget("latency", {k: 1.0 for k in KEYS}, 100.0, "decode 9x faster at context 512"), "cannot be reached"),
])
def test_an_unreachable_budget_is_refused_before_any_work(budget, needle):
    with pytest.raises(SubFitError, match=needle):
        calibrate_model(tiny_model("llama"), TOKENS, CONFIG, budget=budget)


@pytest.mark.parametrize("factory,value", [(lambda: latency_budget({}, 10.0, 1.0, 512), "above 1"),
                                           (lambda: kv_budget({}, 1.0), "in \\[0, 1\\)")])
def test_budget_values_are_checked(factory, value):
    with pytest.raises(SubFitError, match=value):
        factory()
