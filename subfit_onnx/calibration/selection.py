"""Which units go: sparsity accounting and the greedy, re-scored selection.

Sparsity is the fraction of decoder-block weight parameters (attention and FFN projection matrices; not
embeddings, norms or biases) that are removed. Selection is greedy on score per parameter until the removed
parameters reach the target, so the achieved sparsity overshoots by less than one unit.

The ``sequential`` schedule decides each unit in depth order with a *fresh* score measured on the already
compressed upstream, against the dense (first-pass) scores of the units not yet visited. Those prior scores are
rescaled by how much fresh scores have drifted from their priors so far, so the late layers are not left to pay
for optimism about them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..architectures import UnitKind
from ..errors import InvalidSparsityError, SubFitError

UnitKey = tuple[int, UnitKind]


def target_params(block_params: int, sparsity: float) -> int:
    if not 0.0 < sparsity < 1.0:
        raise InvalidSparsityError(sparsity)
    return math.ceil(sparsity * block_params)


def check_reachable(params: dict[UnitKey, int], target: int, sparsity: float) -> None:
    total = sum(params.values())
    smallest = min(params.values())
    if target > total - smallest:
        raise SubFitError(
            f"sparsity {sparsity:.3f} is too high for this model: it would remove {target:,} of {total:,} block "
            f"parameters, leaving less than one attention or FFN; the most is {(total - smallest) / total:.3f}"
        )


def greedy_select(scores: Mapping[UnitKey, float], savings: Mapping[UnitKey, float], target: float) -> list[UnitKey]:
    """Cheapest score first until what the removed units save (parameters, ms, bytes) reaches the target."""
    chosen: list[UnitKey] = []
    saved: float = 0
    for key in sorted(scores, key=lambda k: (scores[k], k)):
        if saved >= target:
            break
        chosen.append(key)
        saved += savings[key]
    return sorted(chosen)


@dataclass
class SequentialSelector:
    """Decides units one at a time in depth order (see module docstring)."""

    prior: dict[UnitKey, float]
    savings: Mapping[UnitKey, float]  # what removing each unit saves, in the budget's currency
    target: float
    rescore: bool = True
    removed: list[UnitKey] = field(default_factory=list)
    visited: set[UnitKey] = field(default_factory=set)
    _log_drift: list[float] = field(default_factory=list)

    @property
    def saved(self) -> float:
        return sum(self.savings[k] for k in self.removed)

    @property
    def done(self) -> bool:
        """The target is met, so no later unit can go (under either schedule)."""
        return self.saved >= self.target

    def _drift(self) -> float:
        if not self._log_drift:
            return 1.0
        ordered = sorted(self._log_drift)
        return math.exp(ordered[len(ordered) // 2])

    def decide(self, key: UnitKey, fresh: float | None) -> bool:
        """True if ``key`` should be removed, given its fresh score (None: use the prior)."""
        if not self.rescore:
            planned = greedy_select(self.prior, self.savings, self.target)
            decision = key in planned
        else:
            score_now = self.prior[key] if fresh is None else fresh
            remaining = self.target - self.saved
            decision = False
            if remaining > 0:
                drift = self._drift()
                pool = {k: s * drift for k, s in self.prior.items() if k not in self.visited and k != key}
                pool[key] = score_now
                decision = key in greedy_select(pool, self.savings, remaining)
            if fresh is not None and self.prior[key] > 0 and fresh > 0:
                self._log_drift.append(math.log(fresh / self.prior[key]))
        self.visited.add(key)
        if decision:
            self.removed.append(key)
        return decision
