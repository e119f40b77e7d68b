"""The compressed PyTorch reference: what the rewritten ONNX graph computes, in transformers.

A removed unit's module is swapped for ``BypassModule`` (``y = x W + b`` on the pre-norm output it already
receives, plus ``act(x Wg) * (x Wu) @ Wo`` for an FFN bypass that keeps neurons) and its post-norm, where the
family has one, for ``nn.Identity``: exactly the nodes the ONNX pass inserts. A removed attention keeps a one-wide entry in the KV cache (head_dim 1), so the cache still
counts positions for masks and ``generate`` while holding almost no bytes, as in the rewritten graph (head_dim 0
would hold none, but transformers' ``DynamicLayer.get_seq_length`` reports 0 for an empty tensor, which restarts
positions at 0 on every decode step when layer 0's attention is removed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .architectures import FamilyLayout, UnitKind
from .bypass import Bypass
from .identity import check_matches, identity_facts
from .plan import Plan, bypass_from_tensors
from .torch_model import decoder_layers, first_param, model_family, model_identity

TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": nn.functional.silu,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
}  # the keys of gated_ffn.ACTIVATIONS


class BypassModule(nn.Module):
    """Stands in for a removed attention or FFN module, with the same call signature and outputs."""

    def __init__(self, bypass: Bypass, kind: UnitKind, layer_idx: int, num_kv_heads: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.kind = kind
        self.layer_idx = layer_idx
        self.num_kv_heads = num_kv_heads
        as_param = lambda a: nn.Parameter(torch.as_tensor(np.asarray(a), dtype=dtype, device=device), requires_grad=False)
        self.bias = as_param(bypass.bias)
        self.weight = as_param(bypass.weight) if bypass.weight is not None else None
        self.down = as_param(bypass.down) if bypass.down is not None else None
        self.up = as_param(bypass.up) if bypass.up is not None else None
        self.neuron_gate = as_param(bypass.neuron_gate) if bypass.neuron_gate is not None else None
        self.neuron_up = as_param(bypass.neuron_up) if bypass.neuron_up is not None else None
        self.neuron_out = as_param(bypass.neuron_out) if bypass.neuron_out is not None else None
        self.activation = TORCH_ACTIVATIONS[bypass.activation] if bypass.activation is not None else None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            out = x @ self.weight
        elif self.down is not None and self.up is not None:
            out = (x @ self.down) @ self.up
        else:
            out = torch.zeros(*x.shape[:-1], self.bias.shape[0], dtype=x.dtype, device=x.device)
        if self.neuron_out is not None:
            assert self.neuron_gate is not None and self.neuron_up is not None and self.activation is not None
            out = out + (self.activation(x @ self.neuron_gate) * (x @ self.neuron_up)) @ self.neuron_out
        return out + self.bias

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        x = hidden_states if hidden_states is not None else kwargs["x"]
        y = self.project(x)
        if self.kind == "mlp":
            return y
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        if cache is not None and hasattr(cache, "update"):
            empty = x.new_zeros(x.shape[0], self.num_kv_heads, x.shape[1], 1)
            cache.update(empty, empty, self.layer_idx, {"cache_position": kwargs.get("cache_position")})
        return y, None


@dataclass
class UnitSwap:
    """Remembers what a bypass replaced so calibration can restore the user's model afterwards."""

    layer: nn.Module
    attrs: dict[str, nn.Module]

    def undo(self) -> None:
        for name, module in self.attrs.items():
            setattr(self.layer, name, module)


def install_bypass(model: nn.Module, family: FamilyLayout, layer_idx: int, kind: UnitKind, bypass: Bypass) -> UnitSwap:
    layer = decoder_layers(model, family)[layer_idx]
    layout = family.unit(kind)
    original = getattr(layer, layout.module)
    ref = first_param(original)
    identity = model_identity(model)
    swap = UnitSwap(layer=layer, attrs={layout.module: original})
    replacement = BypassModule(bypass, kind, layer_idx, identity.num_key_value_heads, ref.dtype, ref.device)
    for name, value in vars(original).items():  # flags the layer reads off its unit (Gemma3: is_sliding)
        if not name.startswith("_") and isinstance(value, (bool, int, float, str)) and not hasattr(replacement, name):
            setattr(replacement, name, value)
    setattr(layer, layout.module, replacement)
    if layout.post_norm:
        swap.attrs[layout.post_norm] = getattr(layer, layout.post_norm)
        setattr(layer, layout.post_norm, nn.Identity())
    return swap


def apply_plan(model: nn.Module, plan: Plan, tensors: dict[str, np.ndarray]) -> nn.Module:
    """Compress ``model`` in place to what ``plan`` describes and return it."""
    identity = model_identity(model)
    check_matches(plan.model, "the plan", f"the model {identity.name_or_path}".rstrip(), identity_facts(identity))
    family = model_family(model)
    for unit in plan.removed:
        install_bypass(model, family, unit.layer, unit.kind, bypass_from_tensors(unit, tensors))
    model.config.subfit = {"removed": [{"layer": u.layer, "kind": u.kind} for u in plan.removed]}
    return model
