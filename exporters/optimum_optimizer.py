"""``SubFitOptimizer``: SubFit in the shape of Optimum's ``ORTOptimizer``.

Optimum users already write ``ORTOptimizer.from_pretrained(model).optimize(config, save_dir)``; SubFit offers the
same two calls, so it slots into existing pipelines. Order matters: SubFit must run on the plain export *before*
``ORTOptimizer`` (O2 and up fuse nodes and lose the layer names SubFit needs); ``ORTOptimizer`` runs fine on
SubFit's output. The work is done by ``subfit_onnx.api.optimize``; the ``SubFitConfig`` used is saved as
``subfit_config.json`` beside the model, as ``ORTOptimizer`` saves ``ort_config.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import SubFitConfig
from ..errors import SubFitError
from ..names import ONNX_FILE
from ..progress import ProgressFactory


class SubFitOptimizer:
    """Remove attention/FFN units of one Optimum decoder export, replacing each by a fitted linear bypass."""

    def __init__(self, onnx_model_path: str | os.PathLike, *, model: Any = None) -> None:
        self.onnx_model_path = Path(onnx_model_path)
        self.model = model
        self.last_result: Any = None

    @classmethod
    def from_pretrained(cls, model_or_path: Any, file_name: str | None = None, *, model: Any = None) -> SubFitOptimizer:
        """From an export folder (or its ``.onnx`` file) or a loaded ``ORTModelForCausalLM``.

        ``model`` is the PyTorch checkpoint to calibrate from (path, hub id or loaded model); without it the
        checkpoint named in the export's config.json is used, and a missing one is reported when optimizing.
        """
        if hasattr(model_or_path, "path") and hasattr(model_or_path, "config"):  # an ORTModel, without importing it
            return cls(Path(model_or_path.path), model=model)
        path = Path(model_or_path)
        if path.is_dir():
            return cls(path / (file_name or ONNX_FILE), model=model)
        if path.is_file() and path.suffix == ".onnx":
            return cls(path, model=model)
        raise SubFitError(f"unable to load an ONNX export from {model_or_path}")

    def optimize(self, optimization_config: SubFitConfig, save_dir: str | os.PathLike, *, plan: Any = None,
                 overwrite: bool = False, progress: ProgressFactory | None = None,
                 quantize: str | None = None) -> Path:
        """Calibrate (or reuse ``plan``) and write the compressed model into ``save_dir``; returns ``save_dir``.

        ``quantize`` ("int4" or "int8") quantizes the compressed model's weights, as ``subfit_onnx.optimize``.

        The full report of the run is kept in ``self.last_result`` (and written as ``subfit_report.json``).
        """
        from ..api import optimize

        self.last_result = optimize(self.onnx_model_path, config=optimization_config, model=self.model,
                                    output=save_dir, plan=plan, overwrite=overwrite, progress=progress,
                                    quantize=quantize)
        return Path(save_dir)
