"""Drop the guard that exports put after attention's softmax, on the private copy calibration runs.

PyTorch's scaled-dot-product attention exports as ``Where(IsNaN(p), 0, p)`` after ``p = Softmax(scores)``: a row
whose every key is masked gives NaN, and the guard turns it into zeros. A calibration prefill never has such a row
(no padding, an empty past, and a causal mask that always keeps the token itself; sliding windows are widened to
the calibration length by ``WidenSlidingWindowsPass``), so there the guard returns ``p`` unchanged, bit for bit.
It is not free: on SmolLM2's cut layers (8 x 256 tokens, 2 cores) the two ops over the [batch, heads, seq, seq]
probabilities took 13% of a layer run's kernel time. The exported model keeps its guard; only calibration's
private copy loses it.
"""

from __future__ import annotations

import onnx_ir as ir


def _guarded_softmax(node: ir.Node) -> ir.Value | None:
    """The softmax output that ``node`` guards, if ``node`` is ``Where(IsNaN(p), c, p)`` with ``p`` a Softmax's."""
    if node.op_type != "Where" or len(node.inputs) != 3:
        return None
    condition, probabilities = node.inputs[0], node.inputs[2]
    check = condition.producer() if condition is not None else None
    if check is None or check.op_type != "IsNaN" or check.inputs[0] is not probabilities:
        return None
    source = probabilities.producer() if probabilities is not None else None
    return probabilities if source is not None and source.op_type == "Softmax" else None


class DropSoftmaxNanGuardPass(ir.passes.InPlacePass):
    """Readers of each guarded softmax's ``Where`` read the softmax output itself; the guard ops go."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        outputs = {id(value) for value in graph.outputs}
        dropped = 0
        for node in list(graph):
            probabilities = _guarded_softmax(node)
            if probabilities is None or id(node.outputs[0]) in outputs:
                continue
            check = node.inputs[0].producer()  # type: ignore[union-attr]
            node.outputs[0].replace_all_uses_with(probabilities)
            graph.remove(node, safe=True)
            if not check.outputs[0].uses():  # type: ignore[union-attr]
                graph.remove(check, safe=True)  # type: ignore[arg-type]
            dropped += 1
        return ir.passes.PassResult(model, modified=dropped > 0)
