"""Export a checkpoint straight to the fused decoder layout that onnxruntime-genai's model builder writes.

Why our own: the builder (onnxruntime-genai 0.18) needs transformers 5.x, which this project's pin excludes,
and Optimum's export (7,426 nodes for SmolLM2, attention unfused) spends a small model's decode step on
per-node overhead that nothing fuses afterwards (ORT's transformers optimizer and onnxscript's ORT fusions
find no attention in it). This writes the same op set and node names the builder uses (the model-builder rows
of ``architectures.GRAPH_LAYOUTS`` describe them), so the same structure finding, rewrite, ONNX calibration,
quantization and runtimes (onnxruntime-genai, and Optimum's ``ORTModelForCausalLM`` through a config.json)
apply to both.

Per layer: SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization carrying the residual, one packed
q/k/v MatMul (+ bias Add), GroupQueryAttention with RoPE from cos/sin tables (computed by transformers' own
RoPE initialisers, so every scaling type the checkpoint names is honoured), o_proj, the gated FFN. Weights are
read from safetensors with numpy; torch is only used by transformers' RoPE functions.

Families: the pre-norm ones without q/k norms (llama, mistral, qwen2, phi3, gemma), one ``FusedFamily`` row
each for what differs. Qwen3 (q_norm/k_norm) and Gemma-2/3 (sandwich norms, soft-capping, sliding windows) are
refused for now.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ..errors import UnsupportedModelError
from ..names import DATA_FILE, ONNX_FILE
from ..staging import STAGED, staged_output

OPSET = 21


@dataclass(frozen=True)
class FusedFamily:
    """What one model type's checkpoint does differently from Llama's, for this export."""

    packed_qkv: bool = False  # one qkv_proj weight (Phi-3)
    packed_gate_up: bool = False  # one gate_up_proj weight (Phi-3)
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    embed_scale: bool = False  # Gemma scales the embedding by sqrt(hidden)


FUSED_FAMILIES: dict[str, FusedFamily] = {  # transformers model_type -> row
    "llama": FusedFamily(),
    "mistral": FusedFamily(),
    "qwen2": FusedFamily(),
    "phi3": FusedFamily(packed_qkv=True, packed_gate_up=True),
    "gemma": FusedFamily(norm_offset=1.0, embed_scale=True),
}


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    eps: float
    activation: str
    max_positions: int


def _shape(cfg: Any) -> Shape:
    heads = cfg.num_attention_heads
    return Shape(hidden=cfg.hidden_size, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                 head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                 layers=cfg.num_hidden_layers, vocab=cfg.vocab_size, eps=float(cfg.rms_norm_eps),
                 activation=getattr(cfg, "hidden_activation", None) or cfg.hidden_act,
                 max_positions=cfg.max_position_embeddings)


def rope_tables(cfg: Any, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [positions, rotary_dim / 2] as GroupQueryAttention reads them (do_rotary=1)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = getattr(cfg, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    angles = np.outer(np.arange(positions, dtype=np.float64), inv_freq.double().numpy())
    return ((np.cos(angles) * attention_factor).astype(np.float32),
            (np.sin(angles) * attention_factor).astype(np.float32))


class _Weights:
    """Checkpoint tensors by name, from one or several safetensors files, as float32 numpy arrays."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise UnsupportedModelError(f"{folder} has no safetensors weights")
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), "np") as handle:
                self._where.update(dict.fromkeys(handle.keys(), f))

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        if name not in self._where:
            raise UnsupportedModelError(f"the checkpoint has no tensor {name}")
        with safe_open(str(self._where[name]), "pt") as handle:  # pt: bf16 checkpoints load too
            return handle.get_tensor(name).float().numpy()


class _Graph:
    """Nodes and initializers of the graph being written, named as the model builder names them."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        array = np.ascontiguousarray(array)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.initializers.append(value)
        return value

    def op(self, name: str, op_type: str, inputs: list[ir.Value | None], outputs: int = 1, domain: str = "",
           **attrs: Any) -> list[ir.Value]:
        attributes = []
        for key, val in attrs.items():
            if isinstance(val, float):
                attributes.append(ir.AttrFloat32(key, val))
            elif isinstance(val, int):
                attributes.append(ir.AttrInt64(key, val))
            elif isinstance(val, str):
                attributes.append(ir.AttrString(key, val))
            elif isinstance(val, (list, tuple)):
                attributes.append(ir.AttrInt64s(key, list(val)))
            else:
                raise TypeError(key)
        node = ir.Node(domain, op_type, inputs, attributes, name=name, num_outputs=outputs)
        base = name.rsplit("/", 1)[0]
        for i, out in enumerate(node.outputs):
            out.name = f"{base}/output_{i}" if "Norm" in op_type else f"{name}/output_{i}"
        self.nodes.append(node)
        return list(node.outputs)


def _gated_ffn(g: _Graph, w: _Weights, i: int, x: ir.Value, shape: Shape, family: FusedFamily) -> ir.Value:
    scope = f"/model/layers.{i}/mlp"
    prefix = f"model.layers.{i}.mlp"
    if family.packed_gate_up:
        gate_up = w.get(f"{prefix}.gate_up_proj.weight")
        gate_w, up_w = np.split(gate_up, 2, axis=0)
    else:
        gate_w, up_w = w.get(f"{prefix}.gate_proj.weight"), w.get(f"{prefix}.up_proj.weight")
    gate = g.op(f"{scope}/gate_proj/MatMul", "MatMul", [x, g.const(f"{prefix}.gate_proj.MatMul.weight", gate_w.T)])[0]
    up = g.op(f"{scope}/up_proj/MatMul", "MatMul", [x, g.const(f"{prefix}.up_proj.MatMul.weight", up_w.T)])[0]
    if shape.activation in ("silu", "swish"):
        sig = g.op(f"{scope}/act_fn/Sigmoid", "Sigmoid", [gate])[0]
        act = g.op(f"{scope}/act_fn/Mul", "Mul", [gate, sig])[0]
    elif shape.activation in ("gelu_pytorch_tanh", "gelu_tanh"):
        act = g.op(f"{scope}/act_fn/FastGelu", "Gelu", [gate], approximate="tanh")[0]
    elif shape.activation == "gelu":
        act = g.op(f"{scope}/act_fn/Gelu", "Gelu", [gate])[0]
    else:
        raise UnsupportedModelError(f"activation {shape.activation!r} is not supported by the fused export")
    mul = g.op(f"{scope}/Mul", "Mul", [act, up])[0]
    down = w.get(f"{prefix}.down_proj.weight")
    return g.op(f"{scope}/down_proj/MatMul", "MatMul", [mul, g.const(f"{prefix}.down_proj.MatMul.weight", down.T)])[0]


def _qkv(w: _Weights, i: int, family: FusedFamily) -> tuple[np.ndarray, np.ndarray | None]:
    prefix = f"model.layers.{i}.self_attn"
    if family.packed_qkv:
        return w.get(f"{prefix}.qkv_proj.weight"), None
    weight = np.concatenate([w.get(f"{prefix}.{p}_proj.weight") for p in "qkv"], axis=0)
    biases = [f"{prefix}.{p}_proj.bias" for p in "qkv"]
    bias = np.concatenate([w.get(b) for b in biases]) if all(w.has(b) for b in biases) else None
    return weight, bias


def build_graph(checkpoint: Path) -> tuple[ir.Model, Any]:
    """The fused-layout fp32 graph of ``checkpoint`` (an HF folder), and its transformers config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(checkpoint), local_files_only=True)
    family = FUSED_FAMILIES.get(cfg.model_type)
    if family is None:
        raise UnsupportedModelError(f"the fused export does not support {cfg.model_type} yet "
                                    f"(supported: {', '.join(FUSED_FAMILIES)})")
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and \
            cfg.sliding_window < cfg.max_position_embeddings and cfg.model_type != "qwen2":
        raise UnsupportedModelError("the fused export does not support sliding-window attention yet")
    shape = _shape(cfg)
    w = _Weights(checkpoint)
    g = _Graph()

    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch_size", "sequence_length"]))
    mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64),
                    shape=ir.Shape(["batch_size", "total_sequence_length"]))
    inputs, outputs = [ids, mask], []
    one = g.const("/model/constants/INT64/[1]", np.array([1], np.int64))
    total_sum = g.op("/model/attn_mask_reformat/attn_mask_subgraph/ReduceSum", "ReduceSum", [mask, one], keepdims=0)[0]
    seqlens = g.op("/model/attn_mask_reformat/attn_mask_subgraph/Sub", "Sub", [total_sum, one])[0]
    seqlens = g.op("/model/attn_mask_reformat/attn_mask_subgraph/Sub/Cast", "Cast", [seqlens], to=int(ir.DataType.INT32))[0]
    mshape = g.op("/model/attn_mask_reformat/attn_mask_subgraph/Shape", "Shape", [mask])[0]
    total = g.op("/model/attn_mask_reformat/attn_mask_subgraph/Gather", "Gather",
                 [mshape, g.const("/model/constants/INT64/1", np.array(1, np.int64))], axis=0)[0]
    total = g.op("/model/attn_mask_reformat/attn_mask_subgraph/Gather/Cast", "Cast", [total], to=int(ir.DataType.INT32))[0]
    cos, sin = rope_tables(cfg, shape.max_positions)
    cos_v, sin_v = g.const("cos_cache", cos), g.const("sin_cache", sin)

    embed = w.get("model.embed_tokens.weight")
    stream = g.op("/model/embed_tokens/Gather", "Gather", [g.const("model.embed_tokens.weight", embed), ids])[0]
    if family.embed_scale:
        scale = g.const("/model/constants/FLOAT/embed_scale", np.array(math.sqrt(shape.hidden), np.float32))
        stream = g.op("/model/embed_tokens/Mul", "Mul", [stream, scale])[0]

    def gamma(name: str) -> np.ndarray:
        return w.get(name) + family.norm_offset

    unit_out: ir.Value | None = None
    for i in range(shape.layers):
        scope = f"/model/layers.{i}"
        g_in = g.const(f"model.layers.{i}.input_layernorm.weight", gamma(f"model.layers.{i}.input_layernorm.weight"))
        if unit_out is None:
            x = g.op(f"{scope}/input_layernorm/LayerNorm", "SimplifiedLayerNormalization", [stream, g_in],
                     epsilon=shape.eps, axis=-1, stash_type=1)[0]
        else:
            x, _, _, stream = g.op(f"{scope}/input_layernorm/SkipLayerNorm", "SkipSimplifiedLayerNormalization",
                                   [stream, unit_out, g_in], outputs=4, domain="com.microsoft", epsilon=shape.eps)
        weight, bias = _qkv(w, i, family)
        qkv = g.op(f"{scope}/attn/qkv_proj/MatMul", "MatMul",
                   [x, g.const(f"model.layers.{i}.attn.qkv_proj.MatMul.weight", weight.T)])[0]
        if bias is not None:
            qkv = g.op(f"{scope}/attn/qkv_proj/Add", "Add", [qkv, g.const(f"model.layers.{i}.attn.qkv_proj.Add.bias", bias)])[0]
        past = [ir.Value(name=f"past_key_values.{i}.{r}", type=ir.TensorType(ir.DataType.FLOAT),
                         shape=ir.Shape(["batch_size", shape.kv_heads, "past_sequence_length", shape.head_dim]))
                for r in ("key", "value")]
        inputs += past
        attn, k_out, v_out = g.op(f"{scope}/attn/GroupQueryAttention", "GroupQueryAttention",
                                  [qkv, None, None, *past, seqlens, total, cos_v, sin_v], outputs=3,
                                  domain="com.microsoft", num_heads=shape.heads, kv_num_heads=shape.kv_heads,
                                  scale=1.0 / math.sqrt(shape.head_dim), local_window_size=-1, do_rotary=1,
                                  rotary_interleaved=0)
        for value, role in ((k_out, "key"), (v_out, "value")):
            value.name = f"present.{i}.{role}"
            value.dtype = ir.DataType.FLOAT
            value.shape = ir.Shape(["batch_size", shape.kv_heads, "total_sequence_length", shape.head_dim])
            outputs.append(value)
        o = w.get(f"model.layers.{i}.self_attn.o_proj.weight")
        attn_out = g.op(f"{scope}/attn/o_proj/MatMul", "MatMul",
                        [attn, g.const(f"model.layers.{i}.attn.o_proj.MatMul.weight", o.T)])[0]
        g_post = g.const(f"model.layers.{i}.post_attention_layernorm.weight",
                         gamma(f"model.layers.{i}.post_attention_layernorm.weight"))
        x, _, _, stream = g.op(f"{scope}/post_attention_layernorm/SkipLayerNorm", "SkipSimplifiedLayerNormalization",
                               [stream, attn_out, g_post], outputs=4, domain="com.microsoft", epsilon=shape.eps)
        unit_out = _gated_ffn(g, w, i, x, shape, family)
    final = g.const(f"model.layers.{shape.layers}.final_norm_layernorm.weight", gamma("model.norm.weight"))
    normed = g.op(f"/model/layers.{shape.layers}/final_norm_layernorm/SkipLayerNorm", "SkipSimplifiedLayerNormalization",
                  [stream, unit_out, final], outputs=1, domain="com.microsoft", epsilon=shape.eps)[0]
    head = w.get("lm_head.weight") if w.has("lm_head.weight") and not cfg.tie_word_embeddings else embed
    logits = g.op("/lm_head/MatMul", "MatMul", [normed, g.const("lm_head.MatMul.weight", head.T)])[0]
    logits.name = "logits"
    logits.dtype = ir.DataType.FLOAT
    logits.shape = ir.Shape(["batch_size", "sequence_length", shape.vocab])
    outputs.insert(0, logits)
    graph = ir.Graph(inputs, outputs, nodes=g.nodes, initializers=g.initializers,
                     opset_imports={"": OPSET, "com.microsoft": 1}, name="main_graph")
    return ir.Model(graph, ir_version=10, producer_name="subfit-onnx"), cfg


_COMPANIONS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


def export_fused(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``out``: model.onnx (+ its data file), genai_config.json, config.json and tokenizer files; returns
    the model.onnx path. Staged by ``staging.staged_output``: ``out`` appears only when complete."""
    with staged_output(out, overwrite) as work:
        export_fused_into(checkpoint, work / STAGED)
    return Path(out) / ONNX_FILE


def export_fused_into(checkpoint: str | os.PathLike, folder: Path) -> Path:
    """``export_fused`` into the new folder ``folder``, unstaged: the caller stages it (``optimize`` does)."""
    from ..runtime_genai import write_genai_config

    src = Path(checkpoint)
    model, _ = build_graph(src)
    folder.mkdir(parents=True)
    ir.save(model, folder / ONNX_FILE, external_data=DATA_FILE, size_threshold_bytes=1024)
    for name in _COMPANIONS:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    # GroupQueryAttention reads and writes the cache in place: onnxruntime-genai's static shared buffers
    write_genai_config(folder, share_buffer=True)
    return folder / ONNX_FILE
