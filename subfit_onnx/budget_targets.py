"""The budget a run spends, built from what the user asked for and the graph that will be deployed.

``--kv-budget`` needs only the graph's KV layout; ``--target-speedup`` needs each unit's decode cost, measured on
that graph at ``--context`` (``unit_costs``); ``--sparsity`` is the parameter budget calibration builds itself.
``--max-ppl-ratio`` is a search over sparsities instead (``quality_budget``). After the rewrite, ``budget_report``
sets what the costs predicted against what the rewritten graph measures, so a wrong cost model shows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .calibration.budget import Budget, kv_budget, latency_budget
from .config import SubFitConfig
from .plan import Plan
from .progress import ProgressFactory, silent
from .unit_costs import UnitCosts, decode_ratio, measure_unit_costs, unit_kv_bytes


def output_tag(config: SubFitConfig) -> str | None:
    """What a budget run's default output folder is named after (``-speed1.3``, ``-kv0.5``, ``-ppl1.3``); None
    under ``--sparsity``, whose folder is named after the percentage (``sources.default_output``)."""
    for field, tag in (("target_speedup", "speed"), ("kv_budget", "kv"), ("max_ppl_ratio", "ppl")):
        value = getattr(config, field)
        if value is not None:
            return f"-{tag}{value:g}"
    return None


def build_budget(config: SubFitConfig, onnx_file: str | os.PathLike, progress: ProgressFactory = silent,
                 quantize: str | None = None) -> tuple[Budget | None, UnitCosts | None]:
    """The budget for ``config``'s request on ``onnx_file`` (None: the parameter budget), and the measured costs:
    a latency budget is timed at the precision the output is quantized to (``quantize``)."""
    from .graph_checks import load_decoder_structure

    if config.budget == "kv_budget":
        _, _, structure = load_decoder_structure(Path(onnx_file))
        assert config.kv_budget is not None
        return kv_budget({k: float(v) for k, v in unit_kv_bytes(structure).items()}, config.kv_budget), None
    if config.budget == "target_speedup":
        assert config.target_speedup is not None
        costs = measure_unit_costs(onnx_file, config.method, context=config.context, quantize=quantize,
                                   progress=progress)
        return latency_budget(costs.savings("latency"), costs.step_ms, config.target_speedup, config.context), costs
    return None, None


def budget_report(plan: Plan, costs: UnitCosts | None, dense_dir: Path, compressed_dir: Path,
                  rewrite: dict[str, Any], context: int, progress: ProgressFactory = silent) -> dict[str, Any] | None:
    """The report's ``budget``: what was asked, what the selection saved, and predicted against measured."""
    if plan.budget is None:
        return None
    out = dict(plan.budget)
    kv = rewrite.get("kv_bytes_per_token")
    if plan.budget["objective"] == "kv" and isinstance(kv, dict) and kv.get("before"):
        predicted = 1.0 - plan.budget["saved"] / plan.budget["total"] if plan.budget["total"] else 1.0
        out["kv_ratio"] = {"predicted": predicted, "measured": kv["after"] / kv["before"]}
    if costs is not None:
        measured = decode_ratio(dense_dir, compressed_dir, context=context, provider=costs.provider,
                                quantize=costs.quantize, progress=progress)
        out["decode_ratio"] = {"predicted": costs.predicted_ratio([(u.layer, u.kind) for u in plan.removed]),
                               "measured": measured["ratio"], "dense_ms": measured["dense_ms"],
                               "compressed_ms": measured["compressed_ms"], "context": context,
                               **({"precision": costs.quantize} if costs.quantize else {})}
    return out
