"""Split each SkipSimplifiedLayerNormalization into Add + SimplifiedLayerNormalization, for calibration only.

Layer-by-layer ONNX calibration cuts the graph at the residual stream between layers (``onnx_cut``). In a
model-builder graph that stream is output 3 of a fused norm which also adds the previous FFN's output and
normalizes for the next attention, so no single value separates one layer from the next. Splitting the fused
node restores that value: ``s = input + skip`` (named ``<norm scope>SkipAdd``; its users are output 3's) and
``SimplifiedLayerNormalization(s)`` (output 0's users). ONNX Runtime computes the fused op the same way (sum,
then RMS norm in float32), so calibration statistics match the deployed graph to float rounding.

Only the calibration backend's private copy is split; the deployed graph keeps the fused nodes. Both passes
change nothing in a graph without such nodes, so the backend runs them on every export.
"""

from __future__ import annotations

import onnx_ir as ir

from ..errors import SubFitError

SKIP_NORM = "SkipSimplifiedLayerNormalization"
SKIP_ADD = "SkipAdd"


def _scope(node: ir.Node) -> str:
    name = node.name or ""
    return name[: name.rfind("/") + 1] if "/" in name else name + "/"


class UnfuseSkipNormsPass(ir.passes.InPlacePass):
    """Replace every SkipSimplifiedLayerNormalization by Add (+ bias Add) and SimplifiedLayerNormalization."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for node in [n for n in graph if n.op_type == SKIP_NORM and n.domain == "com.microsoft"]:
            scope = _scope(node)
            x, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
            bias = node.inputs[3] if len(node.inputs) > 3 else None
            new: list[ir.Node] = [ir.Node("", "Add", [x, skip], name=f"{scope}{SKIP_ADD}", num_outputs=1)]
            new[0].outputs[0].name = f"{scope}{SKIP_ADD}/output_0"
            stream = new[0].outputs[0]
            if bias is not None:
                new.append(ir.Node("", "Add", [stream, bias], name=f"{scope}{SKIP_ADD}_bias", num_outputs=1))
                stream = new[-1].outputs[0]
            eps = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-5
            norm = ir.Node("", "SimplifiedLayerNormalization", [stream, gamma],
                           attributes=[ir.AttrFloat32("epsilon", eps), ir.AttrInt64("axis", -1),
                                       ir.AttrInt64("stash_type", 1)],
                           name=f"{scope}Norm", num_outputs=1)
            norm.outputs[0].name = f"{scope}Norm/output_0"
            new.append(norm)
            graph.insert_before(node, new)
            old_out = node.outputs[0]
            old_out.replace_all_uses_with(norm.outputs[0], replace_graph_outputs=True)
            if len(node.outputs) > 3 and node.outputs[3] is not None:
                node.outputs[3].replace_all_uses_with(stream, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            count += 1
        return ir.passes.PassResult(model, modified=bool(count))


class WidenSlidingWindowsPass(ir.passes.InPlacePass):
    """Turn GroupQueryAttention sliding windows off where they cannot bite: sequences of ``seq_len`` tokens.

    A sliding-window GroupQueryAttention (Gemma-2/3, ``local_window_size`` > 0) refuses a past shorter than its
    window, i.e. the empty past of a calibration prefill. When every calibration sequence fits in the window the
    window changes nothing, so the private calibration copy drops it; longer sequences are refused.
    """

    def __init__(self, seq_len: int) -> None:
        super().__init__()
        self.seq_len = seq_len

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed = False
        for node in model.graph:
            if node.op_type != "GroupQueryAttention" or "local_window_size" not in node.attributes:
                continue
            window = node.attributes["local_window_size"].as_int()
            if window <= 0:
                continue
            if window < self.seq_len:
                raise SubFitError(f"calibration sequences of {self.seq_len} tokens exceed the sliding window "
                                  f"({window}) of {node.name}; use --seq-len {window} or less")
            node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", -1)
            node.attributes.pop("sliding_window_cache", None)  # only valid with a window
            changed = True
        return ir.passes.PassResult(model, modified=changed)
