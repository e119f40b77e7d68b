"""What selection spends: the currency a unit's removal saves, and how much of it must be saved.

Users do not think in parameters. "1.3x faster decode" saves milliseconds per token, "half the KV cache" saves
bytes per token, and those savings are not proportional to parameters: on a small model an attention costs
more decode time than its weights suggest (per-node overhead, the KV read), an FFN far less, and an FFN saves
no KV cache at all. A ``Budget`` names the currency and gives every unit its saving in it; the scores then rank
units by damage per unit of that currency, and selection stops once the target is saved. The parameter budget
(``--sparsity``) is one such currency, and gives exactly the selection it always gave.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..errors import SubFitError
from .selection import UnitKey, target_params

Objective = Literal["params", "latency", "kv"]
UNITS: dict[Objective, str] = {"params": "parameters", "latency": "ms/token", "kv": "KV bytes/token"}


@dataclass(frozen=True)
class Budget:
    """Per-unit savings in one currency and the amount selection must save (it overshoots by under one unit)."""

    objective: Objective
    savings: Mapping[UnitKey, float]
    target: float
    what: str  # the user's request in words, for errors and reports ("decode 1.30x faster at context 512")

    @property
    def total(self) -> float:
        return float(sum(self.savings.values()))

    def removable(self) -> dict[UnitKey, float]:
        """Units whose removal saves something in this currency; the others are never chosen for it."""
        return {k: v for k, v in self.savings.items() if v > 0}

    def check_reachable(self, params: Mapping[UnitKey, int]) -> None:
        """Refuse up front a target that even removing every unit that saves something would not reach.

        At least one unit must stay (the model needs something between embedding and head), so the smallest
        saving among the units that would have to go all together is kept back.
        """
        useful = self.removable()
        if not useful:
            raise SubFitError(f"{self.what} cannot be reached: no attention or FFN saves {UNITS[self.objective]}")
        best = sum(useful.values())
        if len(useful) == len(params):
            best -= min(useful.values())
        if self.target > best * (1 + 1e-9):
            raise SubFitError(f"{self.what} cannot be reached on this model: it needs {self.target:,.4g} "
                              f"{UNITS[self.objective]} saved, removing every unit that helps saves at most "
                              f"{best:,.4g}")


def params_budget(params: Mapping[UnitKey, int], sparsity: float) -> Budget:
    """``--sparsity``: the fraction of decoder-block weight parameters to remove."""
    return Budget("params", {k: float(v) for k, v in params.items()}, float(target_params(sum(params.values()), sparsity)),
                  f"sparsity {sparsity:g}")


def latency_budget(unit_ms: Mapping[UnitKey, float], step_ms: float, speedup: float, context: int) -> Budget:
    """``--target-speedup S``: save ``(1 - 1/S)`` of the measured dense decode step at ``context``."""
    if not speedup > 1.0 or math.isinf(speedup):
        raise SubFitError(f"--target-speedup must be above 1 (1.3 means 1.3x faster decode), got {speedup:g}")
    return Budget("latency", dict(unit_ms), step_ms * (1.0 - 1.0 / speedup),
                  f"decode {speedup:g}x faster at context {context}")


def kv_budget(kv_bytes: Mapping[UnitKey, float], fraction: float) -> Budget:
    """``--kv-budget F``: keep at most ``F`` of the dense KV-cache bytes per token."""
    if not 0.0 <= fraction < 1.0:
        raise SubFitError(f"--kv-budget is the fraction of the KV cache to keep, in [0, 1), got {fraction:g}")
    total = float(sum(kv_bytes.values()))
    return Budget("kv", dict(kv_bytes), total * (1.0 - fraction), f"a KV cache of at most {fraction:g} of dense")
