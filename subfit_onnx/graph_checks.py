"""Cheap checks on an ONNX file before any work: is it ONNX, a decoder LLM, with a KV cache, and not yet fused?

The structural pass (``subfit_onnx.passes.structure``) knows layers and units; these checks only look at the
graph's inputs, outputs and operator domains, so each common mistake gets a message that says what to do instead
of a failure deep inside the rewrite.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SubFitError, UnsupportedModelError
from .names import KV

CONTRIB_DOMAINS = ("com.microsoft",)  # ONNX Runtime's fused operators (ORTOptimizer O2+, onnxruntime-genai)


@dataclass(frozen=True)
class GraphSummary:
    path: Path
    inputs: list[str]
    outputs: list[str]
    kv_inputs: list[str]
    fused_ops: dict[str, int] = field(default_factory=dict)


def load_onnx(path: str | Path) -> Any:
    """An ``onnx_ir`` model; a file that does not parse as ONNX gets one clear error."""
    import onnx_ir as ir
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise SubFitError(f"{p} does not exist")
    try:
        return ir.load(str(p))
    except (DecodeError, ValueError) as exc:
        raise SubFitError(f"{p} is not an ONNX model ({type(exc).__name__}: {str(exc)[:120]})") from None


def summarize(model: Any, path: Path) -> GraphSummary:
    inputs = [v.name for v in model.graph.inputs]
    outputs = [v.name for v in model.graph.outputs]
    fused = Counter(n.op_type for n in model.graph if n.domain in CONTRIB_DOMAINS)
    return GraphSummary(path, inputs, outputs, [n for n in inputs if n.startswith(KV.past_prefix)], dict(fused))


def check_decoder_graph(model: Any, path: str | Path) -> GraphSummary:
    """Refuse graphs SubFit cannot rewrite, each with the remedy in the message."""
    p = Path(path)
    s = summarize(model, p)
    if "input_ids" not in s.inputs or "logits" not in s.outputs:
        raise UnsupportedModelError(
            f"{p} is not a decoder LLM export: SubFit needs an input_ids input and a logits output "
            f"(inputs: {', '.join(s.inputs[:5]) or 'none'}; outputs: {', '.join(s.outputs[:5]) or 'none'})"
        )
    if s.fused_ops:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(s.fused_ops.items()))
        raise UnsupportedModelError(
            f"{p} was already optimized by ONNX Runtime (fused nodes: {ops}); fused nodes lose the layer names "
            "SubFit needs. Run SubFit on the plain Optimum export, then ORTOptimizer on SubFit's output"
        )
    if not s.kv_inputs:
        raise UnsupportedModelError(
            f"{p} has no KV cache inputs (past_key_values.*): it was exported for text-generation, not "
            "text-generation-with-past. SubFit rewrites only KV-cache exports; pass the PyTorch model as SOURCE "
            "(SubFit then exports it itself) or re-export with "
            "`optimum-cli export onnx --task text-generation-with-past`"
        )
    return s


def load_decoder_structure(onnx_file: Path) -> tuple[Any, dict[str, Any], Any]:
    """The graph, its config.json and its proven decoder structure: what rewrite and inspect both start from."""
    from .model_config import model_type, read_config
    from .passes.structure import find_decoder_structure

    model = load_onnx(onnx_file)
    check_decoder_graph(model, onnx_file)
    config = read_config(onnx_file.parent) or {}
    try:
        structure = find_decoder_structure(model, model_type(config))
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{onnx_file}: {exc}") from None
    return model, config, structure
