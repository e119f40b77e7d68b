"""``ModelIdentity`` and per-unit parameter counts from an export's graph and config.json, without torch.

Plans must be interchangeable between backends, so these follow ``torch_model.model_identity`` field by field:
head counts and head size come from config.json the way transformers reads them, layer count and hidden size from
the graph, and a unit's parameters are the weight matrices its MatMul/Gemm nodes read (norms and biases are not
counted, as in the PyTorch count).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..architectures import UNIT_KINDS, UnitKind, family_for
from ..errors import PlanMismatchError, SubFitError
from ..model_config import config_value, kv_shape, model_type
from ..passes.structure import DecoderStructure
from ..plan import ModelIdentity


def identity_from_counts(config: dict[str, Any], num_layers: int, hidden_size: int, attention_params: int,
                         mlp_params: int, export_dir: Path) -> ModelIdentity:
    """The identity from config.json plus what the graph says (layers, hidden size, unit parameters)."""
    kind = model_type(config)
    if not kind:
        raise SubFitError(f"{export_dir}/config.json has no model_type")
    family = family_for(kind)
    heads = config_value(config, "num_attention_heads")
    hidden = config_value(config, "hidden_size")
    if heads is None:
        raise SubFitError(f"{export_dir}/config.json gives no num_attention_heads")
    if hidden is not None and int(hidden) != hidden_size:
        raise PlanMismatchError(f"{export_dir}/config.json says hidden size {hidden}, the graph has {hidden_size}")
    kv, head_dim = kv_shape(config, hidden_size)
    return ModelIdentity(
        name_or_path=str(config.get("_name_or_path") or export_dir),
        model_type=kind,
        family=family.name,
        num_layers=int(num_layers),
        hidden_size=int(hidden_size),
        num_attention_heads=int(heads),
        num_key_value_heads=int(kv),
        head_dim=int(head_dim),
        attention_params_per_layer=int(attention_params),
        mlp_params_per_layer=int(mlp_params),
    )


def export_identity(config: dict[str, Any], structure: DecoderStructure, export_dir: Path) -> ModelIdentity:
    first = structure.layers[0]
    return identity_from_counts(config, structure.num_layers, structure.hidden_size, first.attention.params,
                                first.mlp.params, export_dir)


def export_unit_params(structure: DecoderStructure) -> dict[tuple[int, UnitKind], int]:
    return {(layer.index, kind): layer.unit(kind).params for layer in structure.layers for kind in UNIT_KINDS}
