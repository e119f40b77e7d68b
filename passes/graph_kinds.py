"""Quantized and fused decoder graphs SubFit cannot read, each told apart so it gets one line with its remedy.

SubFit reads the graph layouts of ``architectures.GRAPH_LAYOUTS``: Optimum's plain export (float weights,
unfused) and onnxruntime-genai's model-builder graph (GroupQueryAttention + SkipSimplifiedLayerNormalization,
float or ``MatMulNBits`` weights). Graphs quantized or fused by other tools look alike from outside (they all
carry ``com.microsoft`` or quantization ops), but each needs its own remedy, named here.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

from ..architectures import GraphLayout

# ops that mark weights quantized by a tool SubFit cannot read
_QUANTIZED = {
    "DequantizeLinear": "QDQ-quantized (DequantizeLinear) weights",
    "MatMulInteger": "dynamically int8-quantized weights (MatMulInteger)",
    "DynamicQuantizeMatMul": "dynamically int8-quantized weights (DynamicQuantizeMatMul)",
    "MatMulIntegerToFloat": "dynamically int8-quantized weights (MatMulIntegerToFloat)",
    "MatMulBnb4": "bitsandbytes-4bit (MatMulBnb4) weights",
}
_OTHER_ATTENTION = ("MultiHeadAttention", "PagedAttention", "Attention", "SparseAttention")
_QUANTIZE_AFTER = "Run SubFit on the float export with --quantize int4"


def unreadable_reason(model: ir.Model, layouts: tuple[GraphLayout, ...]) -> str | None:
    """The one-line reason SubFit cannot read this graph's kind, or None when a layout may read it (or when the
    graph is merely fused by ORTOptimizer, which the caller words itself)."""
    graph = model.graph
    ops = Counter(n.op_type for n in graph)
    contrib = Counter(n.op_type for n in graph if n.domain == "com.microsoft")
    for op, what in _QUANTIZED.items():
        if ops.get(op):
            return (f"the graph has {what} x{ops[op]}; SubFit reads float graphs and MatMulNBits model-builder "
                    f"graphs. {_QUANTIZE_AFTER}")
    readers = [row for row in layouts if row.reads(set(contrib))]
    if readers:
        if contrib and "logits" not in {v.name for v in graph.outputs}:
            return (f"this {readers[0].exporter} graph has no logits output (built with exclude_lm_head?); "
                    "rebuild it with its lm_head")
        return None
    other = [op for op in _OTHER_ATTENTION if contrib.get(op)]
    if other and (contrib.get("SkipSimplifiedLayerNormalization") or contrib.get("RotaryEmbedding")):
        return (f"this looks like a model-builder graph with {other[0]} attention (the builder writes it for fp16 "
                "on CPU and for some other targets); SubFit reads builder graphs with GroupQueryAttention: build "
                "with -p int4 or -p fp32 for the CPU EP")
    if contrib.get("MatMulNBits") and not contrib.get("GroupQueryAttention"):
        return (f"this export is already weight-quantized (MatMulNBits x{contrib['MatMulNBits']}): the bypasses "
                f"are fitted to float weights. {_QUANTIZE_AFTER}")
    return None
