"""Where each decoder family keeps its attention, FFN and their norms, in PyTorch and in each ONNX graph layout.

Calibration, the PyTorch reference and the ONNX rewrite all need the same facts about a layer: which module is
the unit, which norm feeds it (the bypass input), and which post-norm (Gemma-2) shapes what it adds to the
residual stream. ``FAMILIES`` holds one declarative row per transformers family (module names); supporting a
family means adding a row. ``GRAPH_LAYOUTS`` holds one row per way an exporter lays those layers out in ONNX (node
name scopes, which ops add a unit's output to the stream, KV names); structure finding tries the rows in order,
so a new exporter's layout is one more row, plus its test; onnxruntime-genai's model builder is two rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import UnsupportedModelError
from .names import KV, KVNames

UnitKind = Literal["attention", "mlp"]
UNIT_KINDS: tuple[UnitKind, ...] = ("attention", "mlp")


@dataclass(frozen=True)
class UnitLayout:
    """Names, relative to one decoder layer, of a unit and the norms around it.

    PyTorch attribute names in ``FamilyLayout``; ONNX node-name scopes in ``GraphLayout``.
    """

    module: str
    pre_norm: str
    post_norm: str | None = None


@dataclass(frozen=True)
class FamilyLayout:
    """How one transformers model family lays out its decoder stack in PyTorch."""

    name: str
    model_types: tuple[str, ...]
    base: str  # attribute of the *ForCausalLM holding the decoder stack (embeddings, layers, final norm)
    layers_path: str  # attribute path from that base to the ModuleList of decoder layers
    attention: UnitLayout
    mlp: UnitLayout
    gated_ffn: bool = True  # down(act(x Wg) * (x Wu)); False: down(act(x Wu)) (GPT-2)

    def unit(self, kind: UnitKind) -> UnitLayout:
        return self.attention if kind == "attention" else self.mlp


_LLAMA_LIKE = {
    "base": "model",
    "layers_path": "layers",
    "attention": UnitLayout(module="self_attn", pre_norm="input_layernorm"),
    "mlp": UnitLayout(module="mlp", pre_norm="post_attention_layernorm"),
}
_GEMMA_POST_NORMED = {
    "base": "model",
    "layers_path": "layers",
    "attention": UnitLayout(module="self_attn", pre_norm="input_layernorm", post_norm="post_attention_layernorm"),
    "mlp": UnitLayout(module="mlp", pre_norm="pre_feedforward_layernorm", post_norm="post_feedforward_layernorm"),
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
        gated_ffn=False,
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


@dataclass(frozen=True)
class GraphLayout:
    """How one exporter lays out a decoder layer in ONNX: everything structure finding looks for, as data.

    A unit is found in ``layer_scope`` + its ``module`` scope, its bypass input is the one value flowing in from
    its ``pre_norm`` scope, and its output reaches the residual stream (through ``post_norm`` where there is one)
    in a node of ``residual_ops`` at layer level, whose other operand is the stream entering the pre-norm.
    """

    exporter: str
    families: tuple[str, ...]  # families whose graphs take this layout; config.json's model_type names one
    layer_scope: str  # node-name scope of decoder layer N, with {i} for N
    attention: UnitLayout  # name scopes below the layer scope
    mlp: UnitLayout
    residual_ops: tuple[str, ...] = ("Add",)  # ops that add a unit's output to the stream
    residual_inputs: tuple[int, int] = (0, 1)  # the two inputs of such a node that it adds
    # True: the residual node is a direct child of the layer scope (Optimum's Add); False: it may sit anywhere,
    # as the model builder's residual is the next norm, in the next layer's scope for an FFN
    residual_in_layer: bool = True
    # com.microsoft ops this exporter writes: a graph is read with this row only when it holds every op of
    # ``signature_ops`` and no contrib op outside ``fused_ops`` (other fused graphs are refused as ORT-optimized)
    signature_ops: tuple[str, ...] = ()
    fused_ops: tuple[str, ...] = ()
    # True: the exporter writes its own genai_config.json, which a rewrite keeps (its layer count updated);
    # False: a genai_config.json beside the graph is regenerated for the rewritten graph (runtime_genai)
    own_genai_config: bool = False
    kv: KVNames = field(default=KV)

    def reads(self, contrib_ops: set[str]) -> bool:
        """Whether a graph holding these com.microsoft ops can be of this layout."""
        return set(self.signature_ops) <= contrib_ops <= set(self.fused_ops)

    def unit(self, kind: UnitKind) -> UnitLayout:
        return self.attention if kind == "attention" else self.mlp


def optimum_layouts(families: tuple[FamilyLayout, ...]) -> tuple[GraphLayout, ...]:
    """Optimum's TorchScript export names every node after the module that emitted it (``/model/layers.3/mlp/``),
    so its layout follows from the PyTorch table; families with the same module names share one row."""
    rows: list[GraphLayout] = []
    for family in families:
        *outer, last = [family.base, *family.layers_path.split(".")]
        row = GraphLayout(exporter="optimum", families=(family.name,),
                          layer_scope="/" + "/".join([*outer, f"{last}.{{i}}"]) + "/",
                          attention=family.attention, mlp=family.mlp)
        same = next((i for i, r in enumerate(rows) if replace(r, families=row.families) == row), None)
        if same is None:
            rows.append(row)
        else:
            rows[same] = replace(rows[same], families=(*rows[same].families, family.name))
    return tuple(rows)


# onnxruntime-genai's model builder (CPU EP, fp32 or int4) names nodes after modules too, but fuses what lies
# between the units: each norm is a SkipSimplifiedLayerNormalization whose input 0 is the stream, input 1 (skip)
# the contribution of the unit before it and output 3 the new stream, so a unit's residual node is the next norm
# on the chain (the next layer's input norm for an FFN, the final norm at /model/layers.N/ after the last one).
# The ONNX calibration backend splits those norms into Add + SimplifiedLayerNormalization in its private copy
# (passes.builder_unfuse), so an Add in the norm's scope is the residual node there.
_MODEL_BUILDER = {
    "exporter": "onnxruntime-genai",
    "layer_scope": "/model/layers.{i}/",
    "residual_ops": ("SkipSimplifiedLayerNormalization", "Add"),
    "residual_in_layer": False,
    "signature_ops": ("GroupQueryAttention",),
    "fused_ops": ("GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMulNBits", "GatherBlockQuantized"),
    "own_genai_config": True,
}

GRAPH_LAYOUTS: tuple[GraphLayout, ...] = (
    *optimum_layouts(FAMILIES),
    GraphLayout(families=("llama", "mistral", "qwen2", "phi3", "gemma"),
                attention=UnitLayout("attn", "input_layernorm"), mlp=UnitLayout("mlp", "post_attention_layernorm"),
                **_MODEL_BUILDER),
    GraphLayout(families=("gemma2",),
                attention=UnitLayout("attn", "input_layernorm", "post_attention_layernorm"),
                mlp=UnitLayout("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
                **_MODEL_BUILDER),
    # another exporter's layout: one GraphLayout row here (see GraphLayout), tested like test_structure's
    # test_a_new_graph_layout_is_one_table_row
)
