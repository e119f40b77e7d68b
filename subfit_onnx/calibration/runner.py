"""What a calibration backend provides, so scoring, selection and fitting are written once.

``TorchLayerRunner`` (transformers) and the ONNX Runtime runner both implement it: they run one decoder layer
over every calibration token, return each unit's ``UnitStats``, and can swap a unit for its bypass so that the
following layers are measured on the compressed upstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import numpy as np

from ..architectures import UnitKind
from ..bypass import Bypass
from ..gated_ffn import GatedFFN
from ..identity import ModelIdentity
from ..progress import ProgressFactory
from .activations import ActivationStore
from .linalg import NUMPY_LINALG, LinearAlgebra
from .stats import AnyStats, StatsByWeighting, UnitStats, Weightings


class Undoable(Protocol):
    def undo(self) -> None: ...


class RowBatches:
    """What both backends' sweeps share: calibration rows in batches, and one batch's statistics.

    ``row_limit`` restricts sweeps to the first rows; ``keep_mlp_inputs`` says whether sweeps store the FFN's
    inputs (``ActivationStore.mlp_inputs``), which only pass 2 uses. Pass 1 (scoring only) needs neither.
    ``row_start`` starts sweeps at a later row (the held-out rows a candidate selection is checked on), and
    ``stat_rows`` keeps the rows from that index on out of every statistic: they are run, never fitted; with
    ``keep_held_out_stats`` their sums are kept apart (``UnitStats.held_out``), so fits can take them in later.
    ``linalg`` is where the statistics' products and the fits run (``calibration.linalg``).
    """

    tokens: np.ndarray
    batch_size: int
    store: ActivationStore
    row_limit: int | None = None
    row_start: int = 0
    stat_rows: int | None = None
    keep_mlp_inputs: bool = True
    keep_held_out_stats: bool = False
    linalg: LinearAlgebra = NUMPY_LINALG
    reads_ffn_neurons = False  # whether ``gated_ffn`` gives FFN weights (bypasses with neurons, ``neuron_fit``)
    # whether the runner runs a layer's attention and FFN sub-blocks apart (``sweep_attention``, ``sweep_mlp``)
    splits_layers = False

    def gated_ffn(self, index: int) -> GatedFFN | None:
        """Layer ``index``'s FFN weights for a bypass that keeps some of its neurons; None: it keeps a linear one."""
        return None

    @contextmanager
    def scoring_only(self, rows: int) -> Iterator[None]:
        self.row_limit, self.keep_mlp_inputs = rows, False
        try:
            yield
        finally:
            self.row_limit, self.keep_mlp_inputs = None, True

    @contextmanager
    def only_rows(self, start: int, stop: int | None = None) -> Iterator[None]:
        """Sweeps run rows ``start`` to ``stop`` (the end by default) only."""
        limit = self.row_limit
        self.row_start, self.row_limit = start, stop if stop is not None else limit
        try:
            yield
        finally:
            self.row_start, self.row_limit = 0, limit

    @property
    def _row_stop(self) -> int:
        n = int(self.tokens.shape[0])
        return n if self.row_limit is None else max(1, min(n, self.row_limit))

    @property
    def active_rows(self) -> int:
        return self._row_stop - self.row_start

    def batches(self) -> Iterator[slice]:
        n = self._row_stop
        for start in range(self.row_start, n, self.batch_size):
            yield slice(start, min(start + self.batch_size, n))

    def new_stats(self, hidden: int, weighting: Weightings) -> AnyStats:
        """One unit's statistics: under one weighting, or under several at once (``StatsByWeighting``)."""
        if isinstance(weighting, str):
            return UnitStats(hidden, hidden, weighting, products=self.linalg.tn)
        return StatsByWeighting({w: UnitStats(hidden, hidden, w, products=self.linalg.tn) for w in weighting})

    def collect_batch(self, stats: dict[UnitKind, UnitStats], rows: slice, h: np.ndarray,
                      taps: dict[str, np.ndarray], dense_after: dict[UnitKind, np.ndarray] | None) -> None:
        """Add one batch of a whole-layer run to the unit statistics and, in pass 2, keep the FFN's inputs.

        ``taps`` holds float32 arrays shaped like ``h``: ``attention.y`` and each collected unit's ``x`` and
        ``y``. The kept FFN inputs let a layer whose FFN is then bypassed skip a re-run (``Calibrator``). With
        ``dense_after``, the fit target restores the dense stream (``h_dense_after - h_in``).
        """
        h_in = {"attention": h, "mlp": h + taps["attention.y"]}
        if "mlp" in stats and self.keep_mlp_inputs:
            self.keep_ffn_inputs(rows, h_in["mlp"], taps["mlp.x"])
        self.add_batch(stats, rows, h_in, taps, dense_after)

    def keep_ffn_inputs(self, rows: slice, mid: np.ndarray | None, x: np.ndarray) -> None:
        """The stream entering the FFN's sub-block (``mid``; None: already stored) and the FFN's input x."""
        stored_mid, stored_x = self.store.mlp_inputs()
        if mid is not None:
            stored_mid[rows] = mid
        stored_x[rows] = x

    def add_batch(self, stats: dict[UnitKind, UnitStats], rows: slice, h_in: dict[UnitKind, np.ndarray],
                  taps: dict[str, np.ndarray], dense_after: dict[UnitKind, np.ndarray] | None) -> None:
        """Add one batch to each collected unit's statistics; ``h_in`` is the stream entering each unit's
        sub-block. Rows from ``stat_rows`` on are left out, or summed apart with ``keep_held_out_stats``."""
        n = rows.stop - rows.start
        fitted = n if self.stat_rows is None else max(0, min(rows.stop, self.stat_rows) - rows.start)
        parts = [(slice(0, fitted), stats)] if fitted else []
        if fitted < n and self.keep_held_out_stats:  # held-out rows: summed apart (``UnitStats.held_out``)
            parts.append((slice(fitted, n), {kind: st.held_out_part() for kind, st in stats.items()}))
        for part, part_stats in parts:
            for kind, st in part_stats.items():
                x, y, h_k = taps[f"{kind}.x"][part], taps[f"{kind}.y"][part], h_in[kind][part]
                if dense_after is None:
                    st.update(x, y, h_k)
                else:
                    st.update(x, dense_after[kind][part] - h_k, h_k, y_actual=y)


class LayerRunner(Protocol):
    backend: str
    identity: ModelIdentity
    unit_params: dict[tuple[int, UnitKind], int]
    store: ActivationStore
    stat_rows: int | None
    keep_held_out_stats: bool
    linalg: LinearAlgebra
    progress: ProgressFactory

    @property
    def num_layers(self) -> int: ...

    def sweep(self, index: int, collect: tuple[UnitKind, ...], weighting: Weightings, desc: str,
              dense: Any = None, neurons: Any = None) -> dict[UnitKind, AnyStats]:
        """Run layer ``index`` over all tokens from ``store.current`` into ``store.next``; stats for ``collect``.

        ``weighting`` is one token weighting, or a tuple of them (each unit's stats are then a ``StatsByWeighting``).

        With ``dense`` (from ``dense_targets``), fit targets restore the dense stream (see ``TorchLayerRunner``).
        ``neurons`` (a ``neuron_fit.NeuronEnergy``, only where ``reads_ffn_neurons``) sums the FFN's neuron energies.
        """
        ...

    def dense_sweep(self, index: int, dense: Any, desc: str) -> None: ...

    splits_layers: bool

    def sweep_attention(self, index: int, collect: bool, weighting: Weightings, desc: str) -> dict[UnitKind, AnyStats]:
        """Layer ``index`` up to its FFN's sub-block, where ``splits_layers``: the stream there is kept for
        ``sweep_mlp`` (``ActivationStore.mlp_inputs``), and with ``collect`` the attention's statistics returned."""
        ...

    def sweep_mlp(self, index: int, weighting: Weightings, desc: str, neurons: Any = None) -> dict[UnitKind, AnyStats]:
        """The rest of layer ``index`` from the kept stream: its outputs written, the FFN's statistics returned."""
        ...

    def dense_targets(self) -> Any: ...

    def install_bypass(self, index: int, kind: UnitKind, bypass: Bypass) -> Undoable: ...

    reads_ffn_neurons: bool

    def gated_ffn(self, index: int) -> GatedFFN | None: ...

    def scoring_only(self, rows: int) -> AbstractContextManager[None]: ...

    def only_rows(self, start: int, stop: int | None = None) -> AbstractContextManager[None]: ...

    def batches(self) -> Iterator[slice]: ...

    def close(self) -> None: ...
