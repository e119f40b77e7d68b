"""``weighting="auto"``: pick the token weighting per model by a held-out end-to-end check after pass 2.

Which tokens a unit's error is measured on decides which units go, and no single weighting wins on every model:
``stream`` (``1/||h||^2``) is best on SmolLM2, ``uniform`` on Gemma-3-270m. With ``auto``, pass 1 scores every
unit under each candidate weighting at once (the layers run once; only the statistics are repeated), with the
last 1/8 of the calibration rows outside every statistic. Pass 2 then runs once per candidate on the remaining
rows, the held-out rows riding along in its batches, and the candidate whose compressed model lands the held-out
rows' last stream closest to the dense one (``end_to_end.stream_distance``) gives the plan. The held-out rows'
statistics are summed apart in pass 2, so once the check has chosen, the winner's bypasses are refitted on every
row (``Calibrator.refit_with_held_out``). Cost: one more pass 2, less the first layers, which every candidate
keeps and which run once (``calibrate.shared_prefix``), and a second set of pass-1 statistics.

The check must see pass 2's result: an earlier version compared one-shot selections built from pass 1 and picked
uniform on both models, wrong on SmolLM2, whose stream-weighted selection is only good once pass 2 refits it in
depth order (one-shot it lost to uniform by every end-to-end measure, final-logit KL 0.78 against 0.61).
Measured after pass 2 (25%, 56 calibration rows, 8 x 512 held-out wiki windows): SmolLM2 stream 0.0689 /
uniform 0.0815 (wiki perplexity ratio 1.98 / 2.37), Gemma-3-270m stream 0.0548 / uniform 0.0406 (5.77 / 3.84):
right on both.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..config import TokenWeighting
from .end_to_end import stream_distance
from .runner import LayerRunner

CANDIDATE_WEIGHTINGS: tuple[TokenWeighting, ...] = ("stream", "uniform")  # ties go to the first
HELD_OUT_SHARE = 8  # one calibration row in this many is held out for the check
MIN_CHECK_ROWS = 16  # below this, holding rows out costs the fits more than the check is worth: no check


def held_out_rows(rows: int) -> int:
    """How many of the last calibration rows the check runs on (none below ``MIN_CHECK_ROWS``: the first
    candidate weighting is used unchecked)."""
    return 0 if rows < MIN_CHECK_ROWS else rows // HELD_OUT_SHARE


def run_rows_on(runner: LayerRunner, start: int, first_layer: int, desc: str, suffix: str = "") -> None:
    """Advance rows ``start:`` of the store from layer ``first_layer`` to the last, collecting nothing."""
    n = runner.num_layers
    with runner.only_rows(start):
        for i in range(first_layer, n):
            runner.sweep(i, (), "uniform", f"{desc} {i + 1}/{n}{suffix}")
            runner.store.advance()


def dense_held_out(runner: LayerRunner, start: int) -> np.ndarray:
    """The dense model's last stream of rows ``start:`` (when pass 1 did not run them); the store's start stays."""
    runner.store.restore()
    run_rows_on(runner, start, 0, "dense held-out rows")
    return np.array(runner.store.current[start:])


def held_out_distance(runner: LayerRunner, start: int, dense_final: np.ndarray) -> float:
    """How far the last stream of rows ``start:``, as the runner holds it after a pass, is from the dense one."""
    return stream_distance(np.array(runner.store.current[start:]), dense_final)


def best_weighting(distances: Mapping[TokenWeighting, float]) -> TokenWeighting:
    """The smallest distance; on a tie the earliest candidate."""
    return min(distances, key=lambda w: (distances[w], list(distances).index(w)))
