"""ONNX Runtime sessions for graphs cut out of an export, and the inputs a prefill from an empty cache needs.

Cut graphs are serialised in memory (never written next to the user's model). Their large tensors may still live
in the export's external data file; ONNX Runtime finds it through the session's external-initializer folder, so
an external-data export is read in place rather than copied. The CUDA provider is used when this onnxruntime
build has it, else the CPU one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ..errors import SubFitError
from ..names import KV
from ..runtime import ort_session_options

EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [CUDA, CPU] if CUDA in available else [CPU]


@dataclass(frozen=True)
class SessionFactory:
    """How every cut graph of one calibration is turned into an ``InferenceSession``."""

    model_dir: Path
    providers: tuple[str, ...]
    threads: int = 0  # 0: ONNX Runtime's default (one per physical core)

    @classmethod
    def create(cls, model_dir: str | os.PathLike, providers: list[str] | None = None, threads: int = 0) -> SessionFactory:
        chosen = list(providers) if providers else default_providers()
        missing = [p for p in chosen if p not in ort.get_available_providers()]
        if missing:
            raise SubFitError(f"onnxruntime here lacks {', '.join(missing)} (has {', '.join(ort.get_available_providers())})")
        return cls(Path(model_dir), tuple(chosen), threads)

    def options(self) -> ort.SessionOptions:
        # Calibration alternates short ORT runs with numpy statistics and fits: idle ORT threads must sleep, not
        # spin (the runtime's default options), or they take the cores the numpy work needs after each run.
        options = ort_session_options(intra_op_threads=self.threads or None)
        options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(self.model_dir.resolve()))
        return options

    def session(self, model: ir.Model) -> ort.InferenceSession:
        proto = ir.serde.serialize_model(model)
        return ort.InferenceSession(proto.SerializeToString(), self.options(), providers=list(self.providers))


def _static(dim: object, fallback: int | None, what: str) -> int:
    if isinstance(dim, int):
        return dim
    if fallback is None:
        raise SubFitError(f"the export's {what} has no static size and config.json does not give it")
    return fallback


def prefill_inputs(graph_inputs: list[ir.Value], batch: int, seq: int, kv_heads: int | None,
                   head_dim: int | None) -> dict[str, np.ndarray]:
    """Every graph input except ``input_ids`` for a prefill of ``seq`` tokens on an empty past (length 0).

    Only inputs the graph declares are produced: Gemma-3 exports, for one, take no ``position_ids``.
    """
    feeds: dict[str, np.ndarray] = {}
    for value in graph_inputs:
        name = value.name
        if name == "input_ids":
            continue
        if name == "attention_mask":
            feeds[name] = np.ones((batch, seq), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        elif name.startswith(KV.past_prefix):
            shape = value.shape
            dims = list(shape) if shape is not None else [None] * 4
            heads = _static(dims[1], kv_heads, f"{name} heads")
            size = _static(dims[3], head_dim, f"{name} head size")
            dtype = value.dtype.numpy() if value.dtype is not None else np.float32
            feeds[name] = np.zeros((batch, heads, 0, size), dtype=dtype)
        else:
            raise SubFitError(f"the export has an input {name!r} that calibration does not know how to fill")
    return feeds
