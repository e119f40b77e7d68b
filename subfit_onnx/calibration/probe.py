"""``score="end_to_end"``: each unit's damage measured at the model's last stream, not where the unit sits.

Local scores misjudge some units: on Gemma-3-270m layer 1's attention has a small bypass error, yet replaced alone
it raised held-out wiki perplexity 17% (``benchmarks/unit_damage.py``). So after pass 1 every unit is replaced,
alone, by its pass-1 bypass, and the last calibration row is run from that unit's layer to the last one; the
damage is the last stream's distance from the dense one (``end_to_end.stream_distance``; no head, so both
backends measure it the same way).

Measured on Gemma-3-270m at 25%, in an experiment with probes of each unit's bypass under both weightings: the
ranking from one probe row agreed with eight rows' (rank correlation 0.97-0.98), and one-shot selection by it gave
2.05x held-out wiki perplexity (eight rows: 2.03x) against 2.99x for the default then. Cost: each probe runs one
row through the unit's layer and all later ones: about ``L / 64`` forward passes over 64 rows in all for an
``L``-layer model (two units per layer, each running half the layers on average), per weighting probed;
``probe_units`` probes one.

The probe row is the last calibration row: pass 1 fits on the first half of the rows by default, and the weighting
check holds the last eighth out of every fit, so no bypass the probe measures has seen it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np

from ..architectures import UnitKind
from ..bypass import Bypass
from ..progress import progress_bar, silent
from .end_to_end import stream_distance
from .runner import LayerRunner

PROBE_ROWS = 1


@contextmanager
def _quiet_sweeps(runner: LayerRunner) -> Iterator[None]:
    """The probes' many one-row sweeps report through one bar of their own, not a bar per layer."""
    factory = runner.progress
    runner.progress = silent
    try:
        yield
    finally:
        runner.progress = factory


class EndToEndProbe:
    """The probe rows' dense inputs to every layer (on disk, with the store) and their dense last stream, from one
    dense run of those rows."""

    def __init__(self, runner: LayerRunner, rows: int = PROBE_ROWS) -> None:
        self.runner = runner
        self.start = max(0, runner.store.shape[0] - rows)
        self.inputs = runner.store.per_layer("probe_inputs", runner.num_layers, runner.store.shape[0] - self.start)
        runner.store.restore()
        with _quiet_sweeps(runner):
            for i in range(runner.num_layers):
                self.inputs[i] = runner.store.current[self.start:]
                self._run_layer(i)
        self.dense_final = np.array(runner.store.current[self.start:])

    def _run_layer(self, i: int) -> None:
        with self.runner.only_rows(self.start):
            self.runner.sweep(i, (), "uniform", "")
        self.runner.store.advance()

    def damage(self, index: int, kind: UnitKind, bypass: Bypass) -> float:
        """How far the probe rows' last stream moves when this unit alone is replaced by ``bypass``."""
        self.runner.store.current[self.start:] = self.inputs[index]
        swap = self.runner.install_bypass(index, kind, bypass)
        try:
            with _quiet_sweeps(self.runner):
                for i in range(index, self.runner.num_layers):
                    self._run_layer(i)
        finally:
            swap.undo()
        return stream_distance(np.array(self.runner.store.current[self.start:]), self.dense_final)

    def damages(self, bypasses: Mapping[tuple[int, UnitKind], Bypass]) -> dict[tuple[int, UnitKind], float]:
        """Every unit's damage; the store holds the embeddings again afterwards."""
        out: dict[tuple[int, UnitKind], float] = {}
        try:
            with progress_bar(self.runner.progress, "end-to-end probes", len(bypasses)) as bar:
                for (i, kind), bypass in bypasses.items():
                    out[(i, kind)] = self.damage(i, kind, bypass)
                    bar.update()
        finally:
            self.runner.store.restore()
        return out
