"""Export a Hugging Face decoder to the ONNX graph the rewrite expects, through Optimum and nothing else.

The rewrite is written against one graph shape: Optimum's ``text-generation-with-past`` export (TorchScript
exporter, one ``model.onnx`` with ``past_key_values.N.*`` inputs and ``present.N.*`` outputs). Pinning the task
and exporter in one helper keeps tests, benchmarks and the CLI producing exactly that shape. Validation is off:
Optimum's check runs at atol 1e-5 and flags correct 30-layer exports (differences near 3e-4); SubFit checks
its own output against the PyTorch reference instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from ..errors import SubFitError
from ..model_config import read_config, write_config
from ..names import CONFIG_FILE, ONNX_FILE
from ..progress import ProgressFactory, progress_bar, silent
from ..quiet import quiet
from ..staging import STAGED, staged_output

EXPORT_TASK = "text-generation-with-past"
DTYPES = ("fp32", "fp16")


def _quiet():
    """The exporter prints tracer warnings and progress; library code must not write to the terminal."""
    return quiet("optimum", "transformers", "torch.onnx")


def _record_source(folder: Path, src: Path) -> None:
    """Write the checkpoint's path back as ``_name_or_path``.

    transformers drops it when saving config.json, and it is how ``optimize model.onnx`` finds the PyTorch
    weights to calibrate from without ``--model``.
    """
    config = read_config(folder)
    if config is None:
        return
    config["_name_or_path"] = str(src.resolve())
    write_config(folder, config)


def export_decoder(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   dtype: Literal["fp32", "fp16"] = "fp32", overwrite: bool = False,
                   progress: ProgressFactory = silent) -> Path:
    """Export ``model_dir`` (a local HF folder) into ``out_dir``; returns the path of ``model.onnx``.

    Staged (``staging.staged_output``), so an interrupted export never leaves a folder that looks complete; an
    existing ``out_dir`` is refused unless ``overwrite``.
    """
    out = Path(out_dir)
    with staged_output(out, overwrite) as work:
        export_into(model_dir, work / STAGED, dtype=dtype, progress=progress)
    return out / ONNX_FILE


def export_into(model_dir: str | os.PathLike, folder: Path, *, dtype: Literal["fp32", "fp16"] = "fp32",
                progress: ProgressFactory = silent) -> Path:
    """``export_decoder`` into the new folder ``folder``, unstaged: the caller stages it (``optimize`` does)."""
    if dtype not in DTYPES:
        raise SubFitError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    src = Path(model_dir)
    if not (src / CONFIG_FILE).is_file():
        raise SubFitError(f"{src} is not a Hugging Face model folder (no {CONFIG_FILE})")
    with progress_bar(progress, f"exporting {src.name} ({dtype})", 1) as bar:
        from optimum.exporters.onnx import main_export

        with _quiet():
            main_export(str(src), folder, task=EXPORT_TASK, dtype=dtype, device="cpu",
                        do_validation=False, local_files_only=True)
        if not (folder / ONNX_FILE).is_file():
            raise SubFitError(f"Optimum produced no {ONNX_FILE} for {src}")
        _record_source(folder, src)
        bar.update(1)
    return folder / ONNX_FILE
