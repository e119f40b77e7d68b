"""Export a Hugging Face decoder to the ONNX graph the rewrite expects, through Optimum and nothing else.

The rewrite is written against one graph shape: Optimum's ``text-generation-with-past`` export (TorchScript
exporter, one ``model.onnx`` with ``past_key_values.N.*`` inputs and ``present.N.*`` outputs). Pinning the task
and exporter in one helper keeps tests, benchmarks and the CLI producing exactly that shape. Validation is off:
Optimum's check runs at atol 1e-5 and flags correct 30-layer exports (differences near 3e-4); SubFit checks
its own output against the PyTorch reference instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from ..errors import SubFitError
from ..model_config import read_config, write_config
from ..names import CONFIG_FILE, ONNX_FILE
from ..progress import ProgressFactory, silent
from ..quiet import quiet

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
                   dtype: Literal["fp32", "fp16"] = "fp32", progress: ProgressFactory = silent) -> Path:
    """Export ``model_dir`` (a local HF folder) into ``out_dir``; returns the path of ``model.onnx``.

    The export lands in a temporary folder beside ``out_dir`` and is renamed into place, so an interrupted
    export never leaves a folder that looks complete. An existing ``out_dir`` is refused.
    """
    if dtype not in DTYPES:
        raise SubFitError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    src = Path(model_dir)
    if not (src / CONFIG_FILE).is_file():
        raise SubFitError(f"{src} is not a Hugging Face model folder (no {CONFIG_FILE})")
    out = Path(out_dir)
    if out.exists():
        raise SubFitError(f"{out} already exists; remove it or choose another export folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = progress(f"exporting {src.name} ({dtype})", 1)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        from optimum.exporters.onnx import main_export

        with _quiet():
            main_export(str(src), tmp, task=EXPORT_TASK, dtype=dtype, device="cpu",
                        do_validation=False, local_files_only=True)
        if not (tmp / ONNX_FILE).is_file():
            raise SubFitError(f"Optimum produced no {ONNX_FILE} for {src}")
        _record_source(tmp, src)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.update(1)
        bar.close()
    return out / ONNX_FILE
