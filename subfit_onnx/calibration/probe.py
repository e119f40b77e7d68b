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

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np

from ..architectures import UNIT_KINDS, UnitKind
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
    dense run of those rows.

    All units are probed together, layer by layer: each unit gets its own rows of the store (a copy of the probe
    rows), which start at its layer with the unit replaced, and the layers after it run on every started unit's
    rows in one batched sweep. One sweep of many rows costs far less than many one-row sweeps (SmolLM2's 60 probes:
    about 930 one-row layer runs before). The store is free meanwhile: every pass starts again from its snapshots.
    """

    def __init__(self, runner: LayerRunner, rows: int = PROBE_ROWS) -> None:
        self.runner = runner
        self.rows = min(rows, runner.store.shape[0])
        self.start = runner.store.shape[0] - self.rows
        self.inputs = runner.store.per_layer("probe_inputs", runner.num_layers, self.rows)
        runner.store.restore()
        with _quiet_sweeps(runner):
            for i in range(runner.num_layers):
                self.inputs[i] = runner.store.current[self.start:]
                self._run_layer(i, self.start, self.start + self.rows)
                runner.store.advance()
        self.dense_final = np.array(runner.store.current[self.start:])

    def _run_layer(self, i: int, start: int, stop: int) -> None:
        with self.runner.only_rows(start, stop):
            self.runner.sweep(i, (), "uniform", "")

    def damages(self, bypasses: Mapping[tuple[int, UnitKind], Bypass]) -> dict[tuple[int, UnitKind], float]:
        """Every unit's damage (how far the probe rows' last stream moves when that unit alone is replaced by its
        bypass); the store holds the embeddings again afterwards."""
        units = sorted(bypasses, key=lambda k: (k[0], UNIT_KINDS.index(k[1])))  # depth order, as plans list units
        per_wave = max(1, self.runner.store.shape[0] // self.rows)
        waves = [units[w:w + per_wave] for w in range(0, len(units), per_wave)]
        steps = sum(self.runner.num_layers - wave[0][0] for wave in waves)  # one per layer each wave runs
        out: dict[tuple[int, UnitKind], float] = {}
        try:
            with progress_bar(self.runner.progress, "end-to-end probes (layers)", steps) as bar, \
                    _quiet_sweeps(self.runner):
                for wave in waves:
                    out.update(self._wave(wave, bypasses, bar.update))
        finally:
            self.runner.store.restore()
        return out

    def _wave(self, units: list[tuple[int, UnitKind]], bypasses: Mapping[tuple[int, UnitKind], Bypass],
              layer_done: Callable[[], object]) -> dict[tuple[int, UnitKind], float]:
        """Units sorted by layer, unit ``u`` on rows ``u * rows`` onwards."""
        store, r = self.runner.store, self.rows
        layers = [i for i, _ in units]
        for i in range(layers[0], self.runner.num_layers):
            lo, hi = bisect_left(layers, i), bisect_right(layers, i)
            if lo:  # the units of earlier layers: layer i as it is, on all their rows at once
                self._run_layer(i, 0, lo * r)
            for u in range(lo, hi):  # this layer's units start here, each replaced on its own rows
                store.current[u * r:(u + 1) * r] = self.inputs[i]
                swap = self.runner.install_bypass(i, units[u][1], bypasses[units[u]])
                try:
                    self._run_layer(i, u * r, (u + 1) * r)
                finally:
                    swap.undo()
            store.advance()
            layer_done()
        return {key: stream_distance(np.array(store.current[u * r:(u + 1) * r]), self.dense_final)
                for u, key in enumerate(units)}
