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
        self._saved: Path | None = None
        self._mlp_inputs: tuple[np.memmap, np.memmap] | None = None

    def _open(self, name: str) -> np.memmap:
        return np.lib.format.open_memmap(self._dir / f"{name}.npy", mode="w+", dtype=np.float32, shape=self.shape)

    def extra(self, name: str) -> np.memmap:
        """Another array of the same shape, deleted with the store."""
        return self._open(name)

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

    def snapshot(self) -> None:
        """Keep a copy of the current boundary (the embeddings) to restart a pass from."""
        self.current.flush()
        self._saved = self._dir / "start.npy"
        shutil.copyfile(self.current.filename, self._saved)

    def restore(self) -> None:
        if self._saved is None:
            raise RuntimeError("no snapshot to restore")
        self.current[:] = np.load(self._saved, mmap_mode="r")

    def close(self) -> None:
        del self.current, self.next
        self._mlp_inputs = None
        shutil.rmtree(self._dir, ignore_errors=True)
