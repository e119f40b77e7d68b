"""``inspect``: what SubFit sees in an export, and what a plan would remove from it, without changing anything.

Useful before a long calibration (does SubFit find every layer? which KV inputs belong to which?) and to
preview a saved plan on another export of the same model (for instance the fp16 one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SubFitError
from .graph_checks import load_decoder_structure
from .identity import check_matches, graph_facts
from .names import KV, KV_ROLES
from .onnx_files import external_data_names, model_file_bytes
from .sources import resolve_source


def inspect_model(path: str | Path, plan: Any = None) -> dict[str, Any]:
    """Layers, per-unit parameters and KV inputs of an export; with ``plan``, what a rewrite would remove."""
    src = resolve_source(path)
    if src.needs_export:
        raise SubFitError(f"{path} is a model, not an ONNX export; inspect reads model.onnx files")
    onnx_file = src.onnx_file
    model, config, structure = load_decoder_structure(onnx_file)
    layers = [{
        "layer": layer.index,
        "attention_params": layer.attention.params,
        "mlp_params": layer.mlp.params,
        "attention_bypassed": layer.attention.bypassed,
        "mlp_bypassed": layer.mlp.bypassed,
        "kv_inputs": [layer.kv.past_key, layer.kv.past_value] if layer.kv is not None else [],
    } for layer in structure.layers]
    summary = structure.summary()
    info: dict[str, Any] = {
        "path": str(onnx_file),
        "family": structure.family,
        "family_candidates": list(structure.family_candidates),
        "num_layers": structure.num_layers,
        "hidden_size": structure.hidden_size,
        "dtype": summary["dtype"],
        "kv_dtype": summary["kv_dtype"],
        "num_kv_heads": structure.num_kv_heads,
        "head_dim": structure.head_dim,
        "layers": layers,
        "block_params": sum(u.params for u in structure.units()),
        "kv_inputs": [name for row in layers for name in row["kv_inputs"]],
        "kv_bytes_per_token": structure.kv_bytes_per_token(),
        "file_bytes": model_file_bytes(onnx_file, external_data_names(model)),
    }
    if plan is not None:
        info["plan"] = _plan_preview(plan, structure, config, onnx_file, info)
    return info


def _plan_preview(plan_arg: Any, structure: Any, config: dict[str, Any], onnx_file: Path,
                  info: dict[str, Any]) -> dict[str, Any]:
    from .plan import as_calibrated_plan

    calibrated = as_calibrated_plan(plan_arg)
    plan = calibrated.plan
    check_matches(plan.model, f"the plan {calibrated.path or ''}".rstrip(), f"the ONNX graph {onnx_file}",
                  graph_facts(config, structure))
    gone_kv = {u.layer for u in plan.removed if u.kind == "attention"}
    kv_layers = [layer.index for layer in structure.layers if layer.kv is not None]
    per_layer = (info["kv_bytes_per_token"] / len(kv_layers)) if kv_layers and info["kv_bytes_per_token"] else None
    kept = [i for i in kv_layers if i not in gone_kv]
    itemsize = structure.dtype.itemsize if structure.dtype is not None else 4
    s = plan.sparsity
    return {
        "path": str(calibrated.path) if calibrated.path else None,
        "depth_map": plan.depth_map(),
        "removed": [{"layer": u.layer, "kind": u.kind, "params_removed": u.params_removed,
                     "bypass": u.bypass.form, "bypass_params": u.bypass.params,
                     "kv_inputs_removed": [KV.past_name(u.layer, role) for role in KV_ROLES]
                     if u.kind == "attention" and u.layer in kv_layers else []} for u in plan.removed],
        "sparsity": {"target": s.target, "achieved": s.achieved, "net": s.net},
        "params": {"block": s.block_params, "removed": s.removed_params, "bypass": s.bypass_params},
        "kv_bytes_per_token": {"before": info["kv_bytes_per_token"],
                               "after": int(per_layer * len(kept)) if per_layer is not None else None},
        "file_bytes_estimate": {"before": info["file_bytes"],
                                "after": info["file_bytes"] - (s.removed_params - s.bypass_params) * itemsize},
    }


def format_inspection(info: dict[str, Any]) -> str:
    """Human view of ``inspect_model``'s dict."""
    cands = info["family_candidates"]
    fam = info["family"] + (f" (graph layout shared by {', '.join(cands)})" if len(cands) > 1 else "")
    kv = info["kv_bytes_per_token"]
    lines = [
        f"{info['path']}",
        f"  family       {fam}",
        f"  layers       {info['num_layers']}, hidden size {info['hidden_size']}, weights {info['dtype']}",
        f"  KV cache     {len(info['kv_inputs'])} inputs, {info['num_kv_heads']} heads x {info['head_dim']} dims, "
        f"{info['kv_dtype']}, {kv:,} bytes per token" if kv is not None else
        f"  KV cache     {len(info['kv_inputs'])} inputs",
        (f"  parameters   {info['block_params']:,} in attention and FFN units (weight matrices; a SubFit bypass "
        "counts with its bias, as the plan counts it)"),
        "",
        f"  {'layer':>5} {'attention':>11} {'FFN':>11}  KV inputs",
    ]
    for row in info["layers"]:
        mark = lambda params, bypassed: f"{params:>11,}" + ("*" if bypassed else " ")
        lines.append(f"  {row['layer']:>5} {mark(row['attention_params'], row['attention_bypassed'])}"
                     f"{mark(row['mlp_params'], row['mlp_bypassed'])} {', '.join(row['kv_inputs']) or '-'}")
    if any(r["attention_bypassed"] or r["mlp_bypassed"] for r in info["layers"]):
        lines.append("  (* already replaced by a SubFit bypass)")
    plan = info.get("plan")
    if plan:
        sp, kvb = plan["sparsity"], plan["kv_bytes_per_token"]
        lines += ["", f"  with plan {plan['path'] or ''}".rstrip() + ":",
                  f"  removes      {plan['depth_map']}   (A attention, M FFN, X both, . kept)"]
        for u in plan["removed"]:
            kv_note = f", drops {', '.join(u['kv_inputs_removed'])}" if u["kv_inputs_removed"] else ""
            lines.append(f"               layer {u['layer']} {u['kind']}: {u['params_removed']:,} parameters -> "
                         f"{u['bypass']} bypass of {u['bypass_params']:,}{kv_note}")
        lines.append(f"  sparsity     target {sp['target']:.1%}  achieved {sp['achieved']:.1%}  net {sp['net']:.1%}")
        if kvb["before"] is not None and kvb["after"] is not None:
            lines.append(f"  KV cache     {kvb['before']:,} -> {kvb['after']:,} bytes per token")
        fb = plan["file_bytes_estimate"]
        lines.append(f"  file size    about {fb['before'] / 1e6:,.1f} MB -> {fb['after'] / 1e6:,.1f} MB")
    return "\n".join(lines)
