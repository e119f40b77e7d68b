"""SubFit for ONNX: remove Attention/FFN units of a decoder LLM, fit linear bypasses, rewrite the Optimum export.

The public API is re-exported lazily (PEP 562) so ``import subfit_onnx`` and ``subfit_onnx.passes`` stay free of
torch and transformers; they load only when ``optimize``/``calibrate`` actually calibrate.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "optimize": "api",
    "calibrate": "api",
    "rewrite": "api",
    "export": "api",
    "Result": "api",
    "CalibratedPlan": "plan",
    "DEFAULT_CALIBRATION": "config",
    "SubFitConfig": "config",
    "Portion": "config",
    "Plan": "plan",
    "load_plan": "plan",
    "save_plan": "plan",
    "SubFitError": "errors",
    "UnsupportedModelError": "errors",
    "CalibrationDataError": "errors",
    "PlanMismatchError": "errors",
    "silent": "progress",
    "tqdm_progress": "progress",
    "load_for_generation": "runtime",
    "apply_plan": "reference",
}

__all__ = [
    "DEFAULT_CALIBRATION",
    "CalibratedPlan",
    "CalibrationDataError",
    "Plan",
    "PlanMismatchError",
    "Portion",
    "Result",
    "SubFitConfig",
    "SubFitError",
    "UnsupportedModelError",
    "__version__",
    "apply_plan",
    "calibrate",
    "export",
    "load_for_generation",
    "load_plan",
    "optimize",
    "rewrite",
    "save_plan",
    "silent",
    "tqdm_progress",
]

if TYPE_CHECKING:  # pragma: no cover
    from .api import Result, calibrate, export, optimize, rewrite
    from .config import DEFAULT_CALIBRATION, Portion, SubFitConfig
    from .errors import CalibrationDataError, PlanMismatchError, SubFitError, UnsupportedModelError
    from .plan import CalibratedPlan, Plan, load_plan, save_plan
    from .progress import silent, tqdm_progress
    from .reference import apply_plan
    from .runtime import load_for_generation


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'subfit_onnx' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
