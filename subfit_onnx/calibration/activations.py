"""Residual-stream activations at one layer boundary, kept on disk.

Layer-by-layer calibration needs every calibration token's hidden state at the current layer boundary. Holding
them in RAM would make memory grow with the number of tokens; a pair of float32 memory maps (input and output of
the layer being processed) keeps RAM flat and swaps roles after each layer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..staging import owned_tempdir

STORE_PREFIX = "subfit-acts-"


class ActivationStore:
    def __init__(self, num_samples: int, seq_len: int, hidden: int, workdir: str | Path | None = None) -> None:
        self.shape = (num_samples, seq_len, hidden)
        self.workdir = workdir
        self._dir = owned_tempdir(STORE_PREFIX, workdir)
        self.current = self._open("a")
        self.next = self._open("b")
        self._saved: dict[str, Path] = {}
        self._mlp_inputs: tuple[np.memmap, np.memmap] | None = None

    def _open(self, name: str, shape: tuple[int, ...] | None = None) -> np.memmap:
        return np.lib.format.open_memmap(self._dir / f"{name}.npy", mode="w+", dtype=np.float32,
                                         shape=shape or self.shape)

    def extra(self, name: str) -> np.memmap:
        """Another array of the same shape, deleted with the store."""
        return self._open(name)

    def per_layer(self, name: str, layers: int, rows: int) -> np.memmap:
        """``rows`` sequences' boundary at each of ``layers`` layers, deleted with the store: on disk, since it is
        ``layers`` times one boundary (1 GB for one 2048-token row of a 32-layer, 4096-wide model)."""
        return self._open(name, (layers, rows, *self.shape[1:]))

    def mlp_inputs(self) -> tuple[np.memmap, np.memmap]:
        """The latest sweep's stream before the FFN and the FFN's input (pre-norm output).

        With them a layer whose FFN was just replaced gets its outputs as ``mid + bypass(x)`` without running
        the layer again.
        """
        if self._mlp_inputs is None:
            self._mlp_inputs = (self._open("mlp_mid"), self._open("mlp_x"))
        return self._mlp_inputs

    def advance(self) -> None:
        """The layer's outputs become the next layer's inputs."""
        self.current, self.next = self.next, self.current

    def snapshot(self, name: str = "start") -> None:
        """Keep a copy of the current boundary to restart a pass from: ``start`` holds the embeddings, and other
        names later boundaries (where the weighting check's candidates part ways)."""
        self.current.flush()
        self._saved[name] = self._dir / f"saved_{name}.npy"
        shutil.copyfile(self.current.filename, self._saved[name])

    def restore(self, name: str = "start") -> None:
        if name not in self._saved:
            raise RuntimeError(f"no snapshot {name!r} to restore")
        self.current[:] = np.load(self._saved[name], mmap_mode="r")

    def close(self) -> None:
        del self.current, self.next
        self._mlp_inputs = None
        shutil.rmtree(self._dir, ignore_errors=True)
