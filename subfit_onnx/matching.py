"""Does this checkpoint (or plan) belong to this ONNX graph?

Calibrating one model and rewriting another's graph would produce a broken model without any error, so the
checkpoint's identity is compared with the export's config.json and with the layers found in the graph before
anything heavy runs. Only facts that must agree are compared: family, layer count, hidden size and, when the
graph's structure is known, the parameter count of each unit.
"""

from __future__ import annotations

from typing import Any

from .architectures import family_for
from .errors import PlanMismatchError
from .model_config import config_value, model_type
from .plan import ModelIdentity


def config_facts(config: dict[str, Any]) -> dict[str, Any]:
    """family, num_layers and hidden_size from a config.json dict (text config for multimodal ones)."""
    kind = model_type(config)
    facts: dict[str, Any] = {}
    if kind:
        facts["family"] = family_for(kind).name  # refuses unknown families by name
    layers = config_value(config, "num_layers")
    hidden = config_value(config, "hidden_size")
    if layers is not None:
        facts["num_layers"] = int(layers)
    if hidden is not None:
        facts["hidden_size"] = int(hidden)
    return facts


def structure_facts(structure: Any) -> dict[str, Any]:
    """Layer count, hidden size, candidate families and per-unit parameters from ``find_decoder_structure``.

    Families that share one graph layout (llama, mistral, qwen2, ...) cannot be told apart from the graph, so
    the graph contributes the set of candidates and config.json the name.
    """
    facts: dict[str, Any] = {"num_layers": structure.num_layers, "hidden_size": structure.hidden_size,
                             "family_candidates": tuple(structure.family_candidates)}
    intact = [layer for layer in structure.layers if not layer.attention.bypassed and not layer.mlp.bypassed]
    if intact:
        facts["attention_params_per_layer"] = intact[0].attention.params
        facts["mlp_params_per_layer"] = intact[0].mlp.params
    return facts


_LABELS = {"family": "family", "num_layers": "layers", "hidden_size": "hidden size",
           "attention_params_per_layer": "attention parameters per layer",
           "mlp_params_per_layer": "FFN parameters per layer"}


def _diffs(identity: ModelIdentity, facts: dict[str, Any]) -> list[str]:
    out = [f"{_LABELS[k]} {getattr(identity, k)} vs {v}" for k, v in facts.items()
           if k in _LABELS and getattr(identity, k) != v]
    candidates = facts.get("family_candidates")
    if candidates and identity.family not in candidates:
        out.append(f"family {identity.family} vs {'/'.join(candidates)}")
    return out


def check_identity_matches(identity: ModelIdentity, what: str, *facts_sources: dict[str, Any], graph: str) -> None:
    """Raise ``PlanMismatchError`` naming every fact where ``what`` (the model or plan) and the graph differ."""
    diffs: list[str] = []
    for facts in facts_sources:
        diffs += [d for d in _diffs(identity, facts) if d not in diffs]
    if diffs:
        raise PlanMismatchError(f"{what} does not match the ONNX graph {graph}: " + "; ".join(diffs))

