"""Unit scores: how much damage removing a unit does, per parameter it frees.

Lower is better (removed first). Each score is computed from ``UnitStats`` alone:

- ``contribution`` (residual-contribution view): how far the unit turns the residual stream
  (``1 - cos(h_in, h_out)``) plus how much it grows it (``||y|| / ||h_in||``), token-weighted means.
- ``replaceability`` (the paper's replaceability view): relative error of the unit's best fitted bypass,
  ``||y - B(x)||^2 / ||y||^2``.
- ``stream_error``: the same bypass error but relative to the residual stream it lands in,
  ``||y - B(x)||^2 / ||h_out||^2``, i.e. what the replacement actually perturbs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..bypass import Bypass
from ..config import ScoreKind
from .fitting import fit_bypass
from .linalg import NUMPY_LINALG, LinearAlgebra
from .stats import UnitStats


@dataclass
class UnitAssessment:
    """A unit's fitted bypass and the numbers every score is made of."""

    bypass: Bypass
    fit_relative: float  # ||y - B(x)||^2 / ||y||^2 (weighted)
    stream_relative: float  # (||y - B(x)||^2 - error left when kept) / ||h_out||^2 (weighted)
    turn: float
    growth: float

    def damage(self, kind: ScoreKind) -> float:
        if kind == "contribution":
            return self.turn + self.growth
        if kind == "replaceability":
            return self.fit_relative
        return self.stream_relative


def assess(stats: UnitStats, rank: int | None, ridge: float, linalg: LinearAlgebra = NUMPY_LINALG) -> UnitAssessment:
    bypass, err = fit_bypass(stats, rank=rank, ridge=ridge, linalg=linalg)
    return UnitAssessment(
        bypass=bypass,
        fit_relative=err / max(stats.y_energy, 1e-30),
        stream_relative=(err - stats.kept_error) / max(stats.stream_energy, 1e-30),
        turn=stats.mean_turn,
        growth=stats.mean_growth,
    )


def score(assessment: UnitAssessment, kind: ScoreKind, saving: float) -> float:
    return per_saving(assessment.damage(kind), saving)


def per_saving(damage: float, saving: float) -> float:
    """Damage per million of what removing the unit saves (parameters, ms or KV bytes; see ``budget``): the
    greedy removes the cheapest damage per unit saved first. A unit that saves nothing is never worth removing."""
    if saving <= 0:
        return math.inf
    return damage / saving * 1e6
