"""Where each decoder family keeps its attention, FFN and their norms.

Calibration, the PyTorch reference and the ONNX rewrite all need the same facts about a layer: which module is
the unit, which norm feeds it (the bypass input), and which post-norm (Gemma) shapes what it adds to the residual
stream. One declarative row per family keeps those facts in one place; supporting a family means adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import UnsupportedModelError

UnitKind = Literal["attention", "mlp"]
UNIT_KINDS: tuple[UnitKind, ...] = ("attention", "mlp")


@dataclass(frozen=True)
class UnitLayout:
    """Attribute names, relative to one decoder layer, of a unit and the norms around it."""

    module: str
    pre_norm: str
    post_norm: str | None = None


@dataclass(frozen=True)
class FamilyLayout:
    """How one transformers model family lays out its decoder stack, for PyTorch and for its ONNX export."""

    name: str
    model_types: tuple[str, ...]
    base: str  # attribute of the *ForCausalLM holding the decoder stack (embeddings, layers, final norm)
    layers_path: str  # attribute path from that base to the ModuleList of decoder layers
    attention: UnitLayout
    mlp: UnitLayout
    onnx_layer_scope: str  # ONNX node-name scope of layer N, with {i} for the index
    onnx_attention_scope: str
    onnx_mlp_scope: str

    def unit(self, kind: UnitKind) -> UnitLayout:
        return self.attention if kind == "attention" else self.mlp


_LLAMA_LIKE = {
    "base": "model",
    "layers_path": "layers",
    "attention": UnitLayout(module="self_attn", pre_norm="input_layernorm"),
    "mlp": UnitLayout(module="mlp", pre_norm="post_attention_layernorm"),
    "onnx_layer_scope": "/model/layers.{i}/",
    "onnx_attention_scope": "self_attn",
    "onnx_mlp_scope": "mlp",
}
_GEMMA_POST_NORMED = {
    "base": "model",
    "layers_path": "layers",
    "attention": UnitLayout(module="self_attn", pre_norm="input_layernorm", post_norm="post_attention_layernorm"),
    "mlp": UnitLayout(module="mlp", pre_norm="pre_feedforward_layernorm", post_norm="post_feedforward_layernorm"),
    "onnx_layer_scope": "/model/layers.{i}/",
    "onnx_attention_scope": "self_attn",
    "onnx_mlp_scope": "mlp",
}

FAMILIES: tuple[FamilyLayout, ...] = (
    FamilyLayout(name="llama", model_types=("llama",), **_LLAMA_LIKE),
    FamilyLayout(name="mistral", model_types=("mistral",), **_LLAMA_LIKE),
    FamilyLayout(name="qwen2", model_types=("qwen2", "qwen3"), **_LLAMA_LIKE),
    FamilyLayout(name="phi3", model_types=("phi3",), **_LLAMA_LIKE),  # fused qkv_proj and gate_up_proj
    FamilyLayout(name="gemma", model_types=("gemma",), **_LLAMA_LIKE),
    FamilyLayout(name="gemma2", model_types=("gemma2", "gemma3_text"), **_GEMMA_POST_NORMED),
    FamilyLayout(
        name="gpt2",
        model_types=("gpt2",),
        base="transformer",
        layers_path="h",
        attention=UnitLayout(module="attn", pre_norm="ln_1"),
        mlp=UnitLayout(module="mlp", pre_norm="ln_2"),
        onnx_layer_scope="/transformer/h.{i}/",
        onnx_attention_scope="attn",
        onnx_mlp_scope="mlp",
    ),
)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str) -> FamilyLayout:
    """The layout for a transformers ``config.model_type``; unknown types are refused by name."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; SubFit supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
