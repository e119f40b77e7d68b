"""Weight-only int4/int8 quantization of a rewritten decoder graph with ONNX Runtime's own quantizer.

``onnxruntime.quantization.MatMulNBitsQuantizer`` turns every MatMul with a constant weight into
``MatMulNBits`` (blockwise, one float scale per block). What SubFit adds around it:

- **lm_head is quantized too.** Optimum's export of a tied model reads the lm_head weight through a Transpose
  of the embedding table, which the quantizer skips (no constant weight): 113 MB of fp32 read per token on
  SmolLM2. ``untie_lm_head`` gives the MatMul its own transposed initializer first.
- **Bypasses get their own precision** (``bypass_bits``): SubFit's bypass MatMuls live under ``.../subfit/``;
  measured on SmolLM2 25% (builder int4 graph): int8 bypasses keep the fp32 bypasses' perplexity (2.612 vs
  2.611) at a quarter of their bytes; int4 costs 1.2% (2.643).
- **int4 keeps the matrices int4 hurts most at int8** (``recommended_int4``): lm_head and the FFN down
  projections of the first and last eighth of the layers. lm_head's int8 blocks are 128 wide: ORT's 8-bit
  ``MatMulNBits`` kernel streams its per-block scales, and for SmolLM2's 576 x 49152 lm_head one decode step took
  1.54 ms at block 32, 1.01 ms at block 128 and 1.03 ms for int4 at block 32 (1 thread, random weights), at the
  same perplexity (wiki ratio 2.295 at block 32, 2.292 at block 128).
- **int4 quantizes the token embedding** too (``GatherBlockQuantized``, block 32, as the model builder does):
  measured on SmolLM2 at 25% (fused layout), 211 MB -> 120 MB on disk, wiki perplexity ratio 2.278 -> 2.295,
  onnxruntime-genai tokens/s +3% and +7% in two interleaved runs (less memory to stream past); on Gemma-3-270m
  dense (262k-token table), 928 MB -> 361 MB, BOS-led wiki perplexity ratio 1.399 -> 1.443.

Defaults are the model builder's int4 CPU settings (RTN ``DEFAULT`` algorithm, block 32, symmetric, accuracy
level 4): on SmolLM2 block 128 gave 1.64x dense perplexity against 1.30x for block 32, and asymmetric 1.32x.
The other algorithms, measured all-int4 on SmolLM2 at 25% (wiki perplexity / dense fp32, decode ms at 512):
RTN 2.594 / 10.3, k-quant 2.657 / 10.3, HQQ 2.052 / 135 (its float zero points take ``MatMulNBits`` off ORT's
fast CPU path). A block-16 or asymmetric int4 lm_head costs as much as block 32 (2.46-2.54 with the rest of
``recommended_int4``), and so does ORT's GPTQ on lm_head alone (2.528; calibrated on 16 x 512 C4 tokens), so
lm_head stays int8.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import InvalidQuantizeError
from ..passes.bias_fold import BYPASS_MARK

PRECISIONS = ("int4", "int8")


@dataclass(frozen=True)
class QuantizeSpec:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    bypass_bits: int | None = 8  # None: bypass MatMuls stay in the graph's float type
    lm_head_bits: int | None = None  # None: as ``bits``
    lm_head_block_size: int | None = None  # None: as ``block_size`` (used when lm_head has its own bits)
    algorithm: str = "default"  # "default" (RTN, ORT's C++ kernel), "hqq" (needs torch), "k_quant"
    int8_nodes: tuple[str, ...] = ()  # node names kept at 8 bits (mixed precision)
    embedding_bits: int | None = None  # 4: the token embedding becomes an int4 GatherBlockQuantized; None: float


@dataclass
class Quantized:
    """The quantized graph and what was quantized: (group, matrices, bits) for each group that had any."""

    model: Any
    block_size: int
    groups: list[tuple[str, int, int]] = field(default_factory=list)
    blocks: dict[str, int] = field(default_factory=dict)  # groups quantized at another block size than ``block_size``

    def describe(self) -> str:
        """One line for the run summary, from what was quantized (an int4 graph's MatMulNBits are not counted)."""
        if not self.groups:
            return "nothing to quantize (every weight matrix already MatMulNBits)"
        by_bits: dict[int, list[str]] = {}
        for name, count, bits in self.groups:
            label = name if name in ("lm_head", "embedding") else f"{count} {name}"
            if name in self.blocks:
                label += f" (block {self.blocks[name]})"
            by_bits.setdefault(bits, []).append(label)
        parts = [f"int{bits}: {', '.join(names)}" for bits, names in sorted(by_bits.items())]
        return f"MatMulNBits, block {self.block_size}; " + "; ".join(parts)


def check_precision(quantize: str | None) -> None:
    """Refuse a bad ``quantize`` value before any work."""
    if quantize is not None and quantize not in PRECISIONS:
        raise InvalidQuantizeError(quantize, PRECISIONS)


def last_matmuls(graph, scopes: list[str]) -> tuple[str, ...]:
    """Per name scope, the last MatMul in graph order: an FFN's down (output) projection, in any family."""
    last: dict[str, str] = {}
    for node in graph:
        if node.op_type == "MatMul" and BYPASS_MARK not in (node.name or ""):
            for scope in scopes:
                if (node.name or "").startswith(scope):
                    last[scope] = node.name
    return tuple(last[s] for s in scopes if s in last)


def recommended_int4(graph, structure) -> QuantizeSpec:
    """int4 body with lm_head and the FFN down projections of the first and last eighth of the layers at int8
    (the builder's "mixed" selection, narrowed to the down projections).

    Measured on SmolLM2 at 25% (wiki ppl / dense fp32; onnxruntime-genai tok/s / builder int4, quiet
    machine): all int4 2.594 / 1.346x; lm_head int8 2.395 / 1.262x; this 2.278 / 1.214x, with lm_head at
    block 32. With lm_head at block 128 and the int4 embedding, in one paired run of 15 rounds: all int4
    2.611 / 1.236x, this 2.292 / 1.233x, this with lm_head at block 32 2.295 / 1.136x.
    """
    count = structure.num_layers
    ends = max(1, -(-count // 8))
    layers = sorted(set(range(ends)) | set(range(count - ends, count)))
    scopes = [structure.unit(i, "mlp").scope for i in layers if not structure.unit(i, "mlp").bypassed]
    return QuantizeSpec(lm_head_bits=8, lm_head_block_size=128, int8_nodes=last_matmuls(graph, scopes),
                        embedding_bits=4)


def spec_for(precision: str, graph, structure) -> QuantizeSpec:
    check_precision(precision)
    return recommended_int4(graph, structure) if precision == "int4" else QuantizeSpec(bits=8)


@contextmanager
def _root_logger_kept() -> Iterator[None]:
    """Importing ``matmul_nbits_quantizer`` calls ``logging.basicConfig(level=INFO)`` on the root logger, after
    which every library's INFO records (onnx_ir's included) print to stderr for the rest of the process. The
    core prints nothing, so the root logger's level and handlers are put back afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def _is_lm_head(name: str) -> bool:
    return name.endswith("lm_head/MatMul")


def untie_lm_head(model) -> bool:
    """Give the lm_head MatMul its own [hidden, vocab] initializer when it reads a transposed embedding."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    head = next((n for n in graph.node if n.op_type == "MatMul" and _is_lm_head(n.name)), None)
    if head is None or head.input[1] in inits:
        return False
    source = producers.get(head.input[1])
    if source is None or source.op_type != "Transpose" or source.input[0] not in inits:
        return False
    table = numpy_helper.to_array(inits[source.input[0]])
    name = "lm_head.weight"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), name))
    head.input[1] = name
    readers = [n for n in graph.node for i in n.input if i == source.output[0]]
    if not readers and source.output[0] not in {o.name for o in graph.output}:
        graph.node.remove(source)  # else it keeps the float table alive once the embedding is quantized
    return True


def embedding_gathers(model) -> list[str]:
    """The Gather nodes that read a token embedding table: a constant 2-D float matrix indexed by ``input_ids``."""
    from onnx import TensorProto

    tables = {i.name for i in model.graph.initializer if len(i.dims) == 2 and i.data_type == TensorProto.FLOAT}
    return [n.name for n in model.graph.node
            if n.op_type == "Gather" and n.input[0] in tables and n.input[1] == "input_ids"]


def _int4_opset(model) -> None:
    """int4 tensors need opset 21 and IR 10. Optimum's exports are opset 18, and none of their ops changed meaning
    from 18 to 21 (those versions added types: int4, float8), so the version is raised in place, as ORT's quantizer
    would do itself after logging a warning the core must not print."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < 21:
            opset.version = 21
    model.ir_version = max(model.ir_version, 10)


def _quantize(model, nodes: list[str], others: list[str], bits: int, spec: QuantizeSpec, algorithm: str):
    with _root_logger_kept():
        from onnxruntime.quantization import matmul_nbits_quantizer as mq

    if algorithm == "gather":  # ORT writes int4 GatherBlockQuantized only (quantized along the hidden axis)
        _int4_opset(model)
        quantizer = mq.MatMulNBitsQuantizer(model, bits=4, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                            nodes_to_include=nodes, op_types_to_quantize=("Gather",),
                                            quant_axes=(("Gather", 1),))
    else:
        if algorithm == "hqq":
            config = mq.HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=bits)
        elif algorithm == "k_quant":
            config = mq.KQuantWeightOnlyQuantConfig()
        else:
            config = mq.DefaultWeightOnlyQuantConfig(block_size=spec.block_size, is_symmetric=spec.symmetric,
                                                     accuracy_level=spec.accuracy_level, bits=bits)
        quantizer = mq.MatMulNBitsQuantizer(model, bits=bits, block_size=spec.block_size,
                                            is_symmetric=spec.symmetric, accuracy_level=spec.accuracy_level,
                                            nodes_to_exclude=others, algo_config=config)
    with _root_logger_kept():
        quantizer.process()
    model = quantizer.model.model
    if algorithm == "hqq" and spec.accuracy_level:  # HQQ's nodes carry no accuracy level; give them ours
        import onnx

        for node in model.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", spec.accuracy_level))
    return model


def quantize_graph(model, spec: QuantizeSpec) -> Quantized:
    """Quantize an ``onnx.ModelProto`` in memory (lm_head untied first): the new ModelProto and what changed."""
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    untie_lm_head(model)
    constants = {i.name for i in model.graph.initializer}
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]  # weights
    bypass = [n for n in matmuls if BYPASS_MARK in n]
    head = [n for n in matmuls if _is_lm_head(n)]
    groups: list[tuple[str, list[str], int, str, int]] = []
    block = spec.block_size
    if spec.bypass_bits is not None and bypass:  # bypasses: plain RTN (measured: int8 loses nothing)
        groups.append(("bypass matrices", bypass, spec.bypass_bits, "default", block))
    if spec.lm_head_bits is not None and spec.lm_head_bits != spec.bits and head:
        groups.append(("lm_head", head, spec.lm_head_bits, "default", spec.lm_head_block_size or block))
    mixed = [n for n in matmuls if n not in bypass and n not in head and n in spec.int8_nodes]
    if mixed and spec.bits != 8:
        groups.append(("FFN down projections", mixed, 8, "default", block))
    special = {n for _, names, *_ in groups for n in names}
    body = [n for n in matmuls if n not in special and n not in bypass]
    included = " (lm_head included)" if head and head[0] in body else ""
    groups.append((f"other matrices{included}", body, spec.bits, spec.algorithm, block))
    if spec.embedding_bits == 4:  # after lm_head was untied from it
        groups.append(("embedding", embedding_gathers(model), 4, "gather", block))
    done = Quantized(model, block)
    for label, names, bits, algorithm, group_block in groups:
        if names:
            group_spec = spec if group_block == block else replace(spec, block_size=group_block)
            done.model = _quantize(done.model, names, [n for n in matmuls if n not in names], bits, group_spec,
                                   algorithm)
            done.groups.append((label, len(names), bits))
            if group_block != block:
                done.blocks[label] = group_block
    return done
