"""``weighting="auto"`` (opt-in): pick the token weighting by a held-out end-to-end check of one-shot selections.

Which tokens a unit's error is measured on decides which units go, and no single weighting wins on every model:
``stream`` (``1/||h||^2``) is best on SmolLM2 (1.845x dense wiki perplexity at 25% against 2.067x for uniform),
``uniform`` on Gemma-3-270m (3.39x against 5.04x). With ``auto``, pass 1 scores every unit under each candidate
weighting at once (the layers run once; only the statistics are repeated), each weighting's scores give a
one-shot selection with pass 1's bypasses, and each selection is run end to end on the last calibration rows,
which no pass-1 statistic saw; the weighting whose compressed stream lands closest to the dense one
(``end_to_end.stream_distance``) is the one pass 2 uses. Cost: the held-out rows' share of one forward per
candidate (1/8 each) plus a second set of pass-1 statistics.

Why it is not the default (measured, 25%, 8 x 512 BOS-rule windows of held-out wiki): it picks uniform on both
models. Right on Gemma (3.23x; its two one-shot selections are the same units, the fits decide), wrong on SmolLM2
(2.24x), whose stream-weighted selection is only good after pass 2 refits it in depth order: one-shot it loses
to uniform by every end-to-end measure (final-logit KL 0.78 against 0.61). The check has to see pass 2's result,
not pass 1's, to choose right; the held-out rows and ``run_held_out`` are the parts such a check reuses.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..bypass import Bypass
from ..config import TokenWeighting
from .end_to_end import stream_distance
from .runner import LayerRunner
from .selection import UnitKey

CANDIDATE_WEIGHTINGS: tuple[TokenWeighting, ...] = ("stream", "uniform")  # ties go to the first
HELD_OUT_SHARE = 8  # one calibration row in this many is held out for the check


def held_out_rows(rows: int) -> int:
    """How many of the last calibration rows the check runs on (none with fewer than two rows)."""
    return 0 if rows < 2 else max(1, rows // HELD_OUT_SHARE)


def run_held_out(runner: LayerRunner, start: int, bypasses: Mapping[UnitKey, Bypass], desc: str) -> np.ndarray:
    """The last stream of rows ``start:`` with ``bypasses`` installed; the model and the store's start stay."""
    swaps = [runner.install_bypass(i, kind, b) for (i, kind), b in sorted(bypasses.items())]
    try:
        runner.store.restore()
        n = runner.num_layers
        with runner.only_rows(start):
            for i in range(n):
                runner.sweep(i, (), "uniform", f"{desc} {i + 1}/{n}")
                runner.store.advance()
        return np.array(runner.store.current[start:])
    finally:
        for swap in reversed(swaps):
            swap.undo()


def choose_weighting(runner: LayerRunner, start: int, dense_final: np.ndarray,
                     selections: Mapping[TokenWeighting, Mapping[UnitKey, Bypass]]) -> dict[TokenWeighting, float]:
    """Each candidate selection's held-out distance to the dense stream, in the candidates' order."""
    distances = {}
    for weighting, bypasses in selections.items():
        final = run_held_out(runner, start, bypasses, f"checking the {weighting}-weighted selection")
        distances[weighting] = stream_distance(final, dense_final)
    return distances


def best_weighting(distances: Mapping[TokenWeighting, float]) -> TokenWeighting:
    """The smallest distance; on a tie the earliest candidate."""
    return min(distances, key=lambda w: (distances[w], list(distances).index(w)))
