"""The run report: one dict for machines (``--json``, ``subfit_report.json``) and its summary for people.

Both views come from the same dict so they cannot disagree. The summary is returned as text; only the CLI
prints it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .plan import Plan

REPORT_FORMAT = 1


def as_dict(obj: Any) -> dict[str, Any]:
    """A plain dict from a dataclass, a pydantic model, a dict or an object with attributes."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def _before_after(raw: dict[str, Any], name: str) -> dict[str, Any] | None:
    """``{"before": .., "after": ..}`` from ``name_before``/``name_after`` or a nested ``name`` dict."""
    if isinstance(raw.get(name), dict) and {"before", "after"} <= set(raw[name]):
        return {"before": raw[name]["before"], "after": raw[name]["after"]}
    if f"{name}_before" in raw and f"{name}_after" in raw:
        return {"before": raw[f"{name}_before"], "after": raw[f"{name}_after"]}
    return None


def plan_section(plan: Plan) -> dict[str, Any]:
    s = plan.sparsity
    return {
        "depth_map": plan.depth_map(),
        "removed": [{"layer": u.layer, "kind": u.kind, "params_removed": u.params_removed,
                     "bypass": u.bypass.form, "bypass_params": u.bypass.params, "fit_error": u.fit_error}
                    for u in plan.removed],
        "removed_attention": len(plan.removed_units("attention")),
        "removed_mlp": len(plan.removed_units("mlp")),
        "num_layers": plan.model.num_layers,
        "sparsity": {"target": s.target, "achieved": s.achieved, "net": s.net},
        "params": {"block": s.block_params, "removed": s.removed_params, "bypass": s.bypass_params},
    }


def build_report(*, source: str, output: Path, plan: Plan, rewrite: Any, seconds: dict[str, float],
                 plan_path: str | None = None, plan_reused: bool = False, export: str | None = None,
                 checkpoint: str | None = None, quality: dict[str, Any] | None = None) -> dict[str, Any]:
    raw = as_dict(rewrite)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "source": source,
        "export": export,
        "output": str(output),
        "model": {"checkpoint": checkpoint, "name_or_path": plan.model.name_or_path,
                  "family": plan.model.family, "model_type": plan.model.model_type},
        "plan": {"path": plan_path, "reused": plan_reused, "calibration": plan.calibration},
        **plan_section(plan),
    }
    for name in ("file_bytes", "kv_bytes_per_token", "nodes", "initializers", "kv_inputs"):
        pair = _before_after(raw, name)
        if pair is not None:
            report[name] = pair
    if raw.get("quantize"):
        report["quantize"] = {"precision": raw["quantize"], "weights": raw.get("weights")}
    if quality is not None:
        report["quality"] = quality
    report["rewrite"] = {k: v for k, v in raw.items() if isinstance(v, (int, float, str, bool, type(None)))}
    report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return report


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _change(pair: dict[str, Any], fmt: Any) -> str:
    before, after = pair["before"], pair["after"]
    delta = f" ({(after - before) / before:+.1%})" if before else ""
    return f"{fmt(before)} -> {fmt(after)}{delta}"


def _quality_lines(quality: dict[str, Any] | None) -> list[str]:
    if not quality:
        return []
    if not quality.get("measured"):
        return [f"  quality      not measured: {quality['why']}"]
    lines = [(f"  quality      held-out perplexity {quality['heldout_ppl_ratio']:.2f}x dense "
             f"({quality['compressed_ppl']:.2f} vs {quality['dense_ppl']:.2f}; {quality['windows']} x "
             f"{quality['window_len']} tokens of the calibration text no fit saw)")]
    if quality.get("warning"):
        lines.append(f"  WARNING      that is above --warn-ppl-ratio {quality['warn_ppl_ratio']:g}: expect visibly "
                     "worse text; try a lower --sparsity")
    return lines


def _budget_lines(budget: dict[str, Any] | None) -> list[str]:
    if not budget:
        return []
    lines = [f"  budget       {budget['request']}"]
    if "decode_ratio" in budget:
        d = budget["decode_ratio"]
        dense = f"dense {d['precision']}" if d.get("precision") else "dense"
        lines.append(f"               decode time {d['measured']:.2f} of {dense} measured ({d['compressed_ms']:.1f} vs "
                     f"{d['dense_ms']:.1f} ms/token at context {d['context']}), {d['predicted']:.2f} predicted")
    if "kv_ratio" in budget:
        k = budget["kv_ratio"]
        lines.append(f"               KV cache {k['measured']:.2f} of dense ({k['predicted']:.2f} predicted)")
    if budget.get("search"):
        steps = ", ".join(f"{t['sparsity']:.1%} -> {t['heldout_ppl_ratio']:.2f}x" for t in budget["search"])
        lines.append(f"               sparsity tried: {steps}")
    return lines


def _neuron_note(report: dict[str, Any]) -> str:
    """Which removed FFNs kept some of their neurons (``--ffn-bypass``): they decode a little slower."""
    layers = [u["layer"] for u in report.get("removed", []) if u.get("bypass") == "neurons"]
    if len(layers) == 1:
        return f"; the FFN bypass of layer {layers[0]} keeps some neurons"
    return f"; the FFN bypasses of layers {', '.join(map(str, layers))} keep some neurons" if layers else ""


def format_summary(report: dict[str, Any]) -> str:
    """Human summary of a report, one fact per line."""
    sp = report["sparsity"]
    lines = [
        f"SubFit: {report['source']} -> {report['output']}",
        f"  removed      {report['depth_map']}   (A attention, M FFN, X both, . kept)",
        (f"               {report['removed_attention']} attention + {report['removed_mlp']} FFN of "
         f"{report['num_layers']} layers{_neuron_note(report)}"),
        (f"  sparsity     target {sp['target']:.1%}  achieved {sp['achieved']:.1%}  net {sp['net']:.1%} "
         "(after bypass parameters)"),
        (f"  bypass       {report['params']['bypass']:,} parameters "
         f"(removed {report['params']['removed']:,} of {report['params']['block']:,} block parameters)"),
    ]
    if "file_bytes" in report:
        lines.append(f"  file size    {_change(report['file_bytes'], _bytes)}")
    if report.get("quantize"):
        lines.append(f"  weights      {report['quantize']['weights']}")
    if "kv_bytes_per_token" in report:
        lines.append(f"  KV cache     {_change(report['kv_bytes_per_token'], lambda b: f'{b:,} bytes/token')}")
    lines.extend(_quality_lines(report.get("quality")))
    lines.extend(_budget_lines(report.get("budget")))
    secs = report.get("seconds", {})
    if secs:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in secs.items() if k != "total")
        lines.append(f"  wall time    {secs.get('total', sum(secs.values())):.1f} s ({parts})")
    if report.get("plan", {}).get("reused"):
        lines.append(f"  plan         reused {report['plan']['path']}")
    elif report.get("plan", {}).get("calibration", {}).get("backend"):
        cal = report["plan"]["calibration"]
        chosen = f", {cal['weighting']} token weighting" if cal.get("weighting") else ""
        if cal.get("held_out_distance"):  # weighting="auto": say what the choice rested on
            checked = ", ".join(f"{w} {d:.4f}" for w, d in cal["held_out_distance"].items())
            chosen += f" (chosen by held-out stream distance: {checked})"
        lines.append(f"  calibration  {cal['backend']} backend{chosen}")
    return "\n".join(lines)
