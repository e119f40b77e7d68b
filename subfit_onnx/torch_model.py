"""PyTorch side of the architecture table: find layers and units in a loaded transformers model."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .architectures import UNIT_KINDS, FamilyLayout, UnitKind, family_for
from .gated_ffn import GatedFFN, config_activation
from .identity import ModelIdentity, build_identity
from .model_config import config_value


def decoder_base(model: nn.Module, family: FamilyLayout) -> nn.Module:
    """The decoder stack without the LM head (calling it skips the vocabulary projection)."""
    return getattr(model, family.base) if hasattr(model, family.base) else model


def decoder_layers(model: nn.Module, family: FamilyLayout) -> nn.ModuleList:
    obj: Any = decoder_base(model, family)
    for part in family.layers_path.split("."):
        obj = getattr(obj, part)
    return obj


def unit_module(layer: nn.Module, family: FamilyLayout, kind: UnitKind) -> nn.Module:
    return getattr(layer, family.unit(kind).module)


def count_unit_params(module: nn.Module) -> int:
    """Projection weight matrices only: norms (q_norm/k_norm) and biases are not counted."""
    return sum(p.numel() for name, p in module.named_parameters() if p.ndim >= 2 and "norm" not in name)


def model_family(model: nn.Module) -> FamilyLayout:
    return family_for(getattr(model.config, "model_type", "unknown"))


def model_identity(model: nn.Module) -> ModelIdentity:
    family = model_family(model)
    layers = decoder_layers(model, family)
    first = layers[0]
    return build_identity(
        model.config, num_layers=len(layers), hidden_size=config_value(model.config, "hidden_size"),
        attention_params=count_unit_params(unit_module(first, family, "attention")),
        mlp_params=count_unit_params(unit_module(first, family, "mlp")),
        name_or_path=str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")),
        where="the model's config",
    )


def unit_param_table(model: nn.Module) -> dict[tuple[int, UnitKind], int]:
    family = model_family(model)
    return {
        (i, kind): count_unit_params(unit_module(layer, family, kind))
        for i, layer in enumerate(decoder_layers(model, family))
        for kind in UNIT_KINDS
    }


def first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def gated_ffn(model: nn.Module, layer_idx: int) -> GatedFFN | None:
    """Layer ``layer_idx``'s FFN as a ``GatedFFN``; None when it is not gated (GPT-2), has biases, or uses an
    activation SubFit cannot build in ONNX: such an FFN keeps the linear bypass."""
    family = model_family(model)
    mlp = unit_module(decoder_layers(model, family)[layer_idx], family, "mlp")
    activation = config_activation(model.config)
    if not family.gated_ffn:
        return None
    down = getattr(mlp, "down_proj", None)
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: one projection, the gate's half first
        gate_w, up_w = mlp.gate_up_proj.weight.chunk(2, dim=0)
        projections = [mlp.gate_up_proj, down]
    else:
        gate_w = getattr(getattr(mlp, "gate_proj", None), "weight", None)
        up_w = getattr(getattr(mlp, "up_proj", None), "weight", None)
        projections = [getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None), down]
    if activation is None or gate_w is None or up_w is None or down is None \
            or any(getattr(p, "bias", None) is not None for p in projections):
        return None
    as_numpy = lambda t: t.detach().float().cpu().numpy()
    return GatedFFN(gate=as_numpy(gate_w).T.copy(), up=as_numpy(up_w).T.copy(),
                    out_weight=(as_numpy(down.weight).astype(np.float64) ** 2).sum(0), activation=activation)
