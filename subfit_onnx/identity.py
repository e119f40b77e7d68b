"""Which model a plan, checkpoint or graph is: built one way from any source, and compared one way.

Calibrating one model and rewriting another's graph would give a broken model without any error, so a plan and a
checkpoint are checked against the export (config.json plus the layers found in the graph) before anything
heavy runs, and a plan against the PyTorch model it is applied to. ``ModelIdentity`` is built by one function
whatever it is read from (a transformers config with the modules, or config.json with the graph), and every
check compares the same facts: family, layer count, hidden size, KV heads, head size and the parameters of
each unit, each wherever both sides know it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .architectures import UNIT_KINDS, UnitKind, family_for
from .errors import PlanMismatchError, SubFitError
from .model_config import config_value, kv_shape, model_type


class ModelIdentity(BaseModel):
    """Enough of the model's config to refuse a plan meant for another model."""

    name_or_path: str = ""
    model_type: str
    family: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_params_per_layer: int
    mlp_params_per_layer: int


def build_identity(config: Any, *, num_layers: int, hidden_size: int, attention_params: int, mlp_params: int,
                   name_or_path: str, where: str) -> ModelIdentity:
    """The identity from a config (dict or transformers object) and what the model or graph itself shows.

    ``where`` names the config in errors. KV heads and head size fall back as transformers does (``kv_shape``).
    """
    kind = model_type(config)
    if not kind:
        raise SubFitError(f"{where} has no model_type")
    family = family_for(kind)
    heads = config_value(config, "num_attention_heads")
    if heads is None:
        raise SubFitError(f"{where} gives no num_attention_heads")
    kv, head_dim = kv_shape(config, hidden_size)
    return ModelIdentity(
        name_or_path=name_or_path,
        model_type=kind,
        family=family.name,
        num_layers=int(num_layers),
        hidden_size=int(hidden_size),
        num_attention_heads=int(heads),
        num_key_value_heads=int(kv),  # type: ignore[arg-type]
        head_dim=int(head_dim),  # type: ignore[arg-type]
        attention_params_per_layer=int(attention_params),
        mlp_params_per_layer=int(mlp_params),
    )


# ---- facts about a graph, and the comparison ------------------------------------------------------------------
def config_facts(config: Mapping[str, Any]) -> dict[str, Any]:
    """family, num_layers and hidden_size from a config.json dict (an unknown family is refused by name)."""
    kind = model_type(config)
    facts: dict[str, Any] = {}
    if kind:
        facts["family"] = family_for(kind).name
    for field in ("num_layers", "hidden_size"):
        value = config_value(config, field)
        if value is not None:
            facts[field] = int(value)
    return facts


def structure_facts(structure: Any) -> dict[str, Any]:
    """What ``find_decoder_structure`` proved about a graph: layers, hidden size, candidate families, KV shape
    (when the graph's KV inputs have static dims) and the parameters of each unit.

    Families that share one graph layout (llama, mistral, qwen2, ...) cannot be told apart from the graph, so the
    graph contributes the candidates and config.json the name.
    """
    facts: dict[str, Any] = {"num_layers": structure.num_layers, "hidden_size": structure.hidden_size,
                             "family_candidates": tuple(structure.family_candidates),
                             "unit_params": {(layer.index, kind): layer.unit(kind).params
                                             for layer in structure.layers for kind in UNIT_KINDS}}
    intact = [layer for layer in structure.layers if not layer.attention.bypassed and not layer.mlp.bypassed]
    if intact:
        facts["attention_params_per_layer"] = intact[0].attention.params
        facts["mlp_params_per_layer"] = intact[0].mlp.params
    if structure.kv_layers():
        if structure.num_kv_heads is not None:
            facts["num_key_value_heads"] = structure.num_kv_heads
        if structure.head_dim is not None:
            facts["head_dim"] = structure.head_dim
    return facts


def graph_facts(config: Mapping[str, Any], structure: Any) -> dict[str, Any]:
    """config.json's facts and the graph's, the graph's winning where both speak (it is what gets rewritten)."""
    return {**config_facts(config), **structure_facts(structure)}


def identity_facts(identity: ModelIdentity) -> dict[str, Any]:
    return {k: getattr(identity, k) for k in _LABELS}


_LABELS = {"family": "family", "num_layers": "layers", "hidden_size": "hidden size",
           "num_key_value_heads": "KV heads", "head_dim": "head size",
           "attention_params_per_layer": "attention parameters per layer",
           "mlp_params_per_layer": "FFN parameters per layer"}


def mismatches(identity: ModelIdentity, facts: Mapping[str, Any]) -> list[str]:
    """Every fact where ``identity`` and ``facts`` differ, worded ``layers 2 vs 4`` (identity first)."""
    out = [f"{label} {getattr(identity, key)} vs {facts[key]}" for key, label in _LABELS.items()
           if key in facts and getattr(identity, key) != facts[key]]
    candidates = facts.get("family_candidates")
    if "family" not in facts and candidates and identity.family not in candidates:
        out.append(f"family {identity.family} vs {'/'.join(candidates)}")
    return out


def check_matches(identity: ModelIdentity, what: str, against: str, facts: Mapping[str, Any]) -> None:
    """Raise ``PlanMismatchError`` naming every fact where ``what`` (a plan or checkpoint) and ``against`` differ."""
    diffs = mismatches(identity, facts)
    if diffs:
        raise PlanMismatchError(f"{what} does not match {against}: " + "; ".join(diffs))


# ---- an export's identity (the ONNX backend has no checkpoint) -------------------------------------------------
def export_identity(config: Mapping[str, Any], facts: Mapping[str, Any],
                    export_dir: Path) -> tuple[ModelIdentity, dict[tuple[int, UnitKind], int]]:
    """Identity and per-unit parameter table of an export, from config.json and ``structure_facts``.

    Plans must be interchangeable between backends, so this is the same identity the checkpoint would give: heads
    and head size from config.json, layers, hidden size and unit parameters from the graph (the weight matrices
    of each unit's MatMul/Gemm nodes, as the PyTorch count takes its projection matrices).
    """
    where = f"{export_dir}/config.json"
    hidden = config_value(config, "hidden_size")
    if hidden is not None and int(hidden) != facts["hidden_size"]:
        raise PlanMismatchError(f"{where} says hidden size {hidden}, the graph has {facts['hidden_size']}")
    identity = build_identity(config, num_layers=facts["num_layers"], hidden_size=facts["hidden_size"],
                              attention_params=facts["unit_params"][(0, "attention")],
                              mlp_params=facts["unit_params"][(0, "mlp")],
                              name_or_path=str(config.get("_name_or_path") or export_dir), where=where)
    return identity, dict(facts["unit_params"])
