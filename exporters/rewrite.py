"""Apply a plan to an Optimum decoder export and write the compressed model folder.

The graph is loaded with ``onnx_ir``, whose external tensors stay on disk until the save streams them into the
new data file, so rewriting a model stored with external data needs memory for the graph's structure and the
bypass weights, not for the model. ``rewrite_export`` stages its output with ``staging.staged_output`` (renamed
into place only when complete); ``rewrite_into`` writes into a folder the caller stages, as ``optimize`` does for
its whole output. The input is only ever read.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel

from ..architectures import UnitKind
from ..bypass import Bypass
from ..errors import PlanMismatchError, SubFitError
from ..graph_checks import load_onnx
from ..identity import check_matches, graph_facts
from ..model_config import model_type, read_config, write_config
from ..names import CONFIG_FILE, DATA_FILE, GENAI_CONFIG_FILE, KV, ONNX_FILE, SUBFIT_FILES, unit_key
from ..onnx_files import export_file, external_data_names, model_file_bytes
from ..passes.bias_fold import FoldBypassBiasPass
from ..passes.external_data import LoadExternalTensorsPass
from ..passes.pipeline import SubFitRewritePass
from ..passes.structure import DecoderStructure, find_decoder_structure
from ..plan import Plan, bypass_from_tensors
from ..progress import ProgressFactory, progress_bar, silent
from ..staging import STAGED, staged_output
from .hf_config import subfit_config
from .quantize import check_precision, quantize_graph, spec_for

PROTOBUF_LIMIT = 2 * 1024**3
INLINE_MARGIN = 64 * 1024**2  # graph structure and metadata beside the weights
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inline in model.onnx


class RewriteReport(BaseModel):
    """What a rewrite changed, for the CLI, benchmarks and tests."""

    source: str
    output: str
    family: str
    removed_units: list[str]
    nodes_before: int
    nodes_after: int
    initializers_before: int
    initializers_after: int
    kv_inputs_before: int
    kv_inputs_after: int
    removed_kv_layers: list[int]
    unit_params_removed: int
    bypass_params: int
    file_bytes_before: int
    file_bytes_after: int
    kv_bytes_per_token_before: int | None
    kv_bytes_per_token_after: int | None
    external_data: bool
    quantize: str | None = None  # "int4" | "int8": weights quantized after the rewrite
    weights: str | None = None  # what the quantized weights are, in words
    config_overrides: dict[str, int]
    wall_seconds: float


def _refuse_input_inside(out: Path, source: Path) -> None:
    src_dir = source.parent.resolve()
    target = out.resolve()
    if target == src_dir or target in src_dir.parents:
        raise SubFitError(f"{out} holds the input export; write the rewritten model to another folder")


def _tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for g in model.graphs() for v in g.initializers.values()
               if v.const_value is not None)


def check_plan_matches(plan: Plan, structure: DecoderStructure, tensors: Mapping[str, np.ndarray],
                       config: Mapping[str, Any], source: Path) -> None:
    """Refuse a plan made for another model, or one whose units this graph cannot take."""
    check_matches(plan.model, "the plan", f"the ONNX graph {source}", graph_facts(config, structure))
    missing = [k for u in plan.removed for k in u.bypass.tensors.values() if k not in tensors]
    if missing:
        raise PlanMismatchError(f"the bypass tensors lack {', '.join(missing[:4])}")
    for unit in plan.removed:
        if not 0 <= unit.layer < structure.num_layers:
            raise PlanMismatchError(f"the plan removes layer {unit.layer} {unit.kind}, but the graph has "
                                    f"{structure.num_layers} layers")
        if structure.unit(unit.layer, unit.kind).bypassed:
            raise PlanMismatchError(f"layer {unit.layer} {unit.kind} is already a bypass in this graph")


def plan_bypasses(plan: Plan, tensors: Mapping[str, np.ndarray]) -> dict[tuple[int, UnitKind], Bypass]:
    available = dict(tensors)
    return {(u.layer, u.kind): bypass_from_tensors(u, available) for u in plan.removed}


# Files that describe the *source* graph or a previous SubFit run; copying them would describe the wrong model.
_NOT_COPIED = {GENAI_CONFIG_FILE, *SUBFIT_FILES}


def _copy_companions(src_dir: Path, dest: Path, skip: set[str]) -> None:
    """Tokenizer, generation config and anything else the export folder ships, except the graph and config."""
    for item in src_dir.iterdir():
        if (item.name in skip or item.name in _NOT_COPIED or item.suffix in (".onnx", ".onnx_data")
                or item.name.startswith(".")):
            continue
        if item.is_file():
            shutil.copy2(item, dest / item.name)


def rewrite_export(export: str | os.PathLike, plan: Plan, tensors: Mapping[str, np.ndarray],
                   out: str | os.PathLike, *, external_data: bool | None = None, overwrite: bool = False,
                   quantize: str | None = None, progress: ProgressFactory = silent) -> RewriteReport:
    """Write ``out``: the export with the plan's units replaced by bypasses and their KV cache dropped.

    ``external_data=None`` stores weights in ``model.onnx_data`` when they would not fit a 2 GB protobuf or the
    input keeps them outside too (an inline save would load every weight, losing the lazy path's low memory);
    True or False forces either layout. ``quantize`` ("int4" or "int8") quantizes the rewritten weights
    (``exporters.quantize``).
    """
    check_precision(quantize)
    source = export_file(export)
    out = Path(out)
    _refuse_input_inside(out, source)
    with staged_output(out, overwrite) as work:
        report = rewrite_into(source, plan, tensors, work / STAGED, external_data=external_data, quantize=quantize,
                              progress=progress)
    return report.model_copy(update={"output": str(out)})


def rewrite_into(source: Path, plan: Plan, tensors: Mapping[str, np.ndarray], out: Path, *,
                 external_data: bool | None = None, quantize: str | None = None,
                 progress: ProgressFactory = silent) -> RewriteReport:
    """``rewrite_export`` into the new folder ``out``, unstaged: the caller stages it (see module docstring)."""
    check_precision(quantize)
    start = time.perf_counter()
    export_config = read_config(source.parent) or {}
    kind = model_type(export_config)

    with progress_bar(progress, "rewriting" + (f" and quantizing to {quantize}" if quantize else ""), 5) as bar:
        model = load_onnx(source)  # external data checked before anything is read
        before = find_decoder_structure(model, kind)
        check_plan_matches(plan, before, tensors, export_config, source)
        counts = (model.graph.num_nodes(), len(model.graph.initializers),
                  sum(v.name.startswith(KV.past_prefix) for v in model.graph.inputs))
        source_data = external_data_names(model)  # the model builder's model.onnx.data is not an .onnx_data
        bytes_before = model_file_bytes(source, source_data)
        input_external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
        bar.update(1)

        removed = [unit_key(u.layer, u.kind) for u in plan.removed]
        rewritten = SubFitRewritePass(before, plan_bypasses(plan, tensors),
                                      {"format": 1, "sparsity": plan.sparsity.achieved})(model)
        after = find_decoder_structure(model, kind)
        bar.update(1)

        external = external_data if external_data is not None else \
            input_external or _tensor_bytes(model) > PROTOBUF_LIMIT - INLINE_MARGIN
        weights = None
        if quantize is not None:  # ORT's quantizer works on a whole in-memory ModelProto
            LoadExternalTensorsPass(None)(model)
            quantized = quantize_graph(ir.serde.serialize_model(model), spec_for(quantize, model.graph, after))
            model = ir.serde.deserialize_model(quantized.model)
            FoldBypassBiasPass()(model)  # the bypass Adds go into the MatMulNBits bias
            weights = quantized.describe()
        LoadExternalTensorsPass(EXTERNAL_THRESHOLD if external else None)(model)
        bar.update(1)

        out.mkdir(parents=True)
        target = out / ONNX_FILE
        if external:
            ir.save(model, target, external_data=DATA_FILE, size_threshold_bytes=EXTERNAL_THRESHOLD)
        else:
            ir.save(model, target)
        bar.update(1)
        section = {"format": 1, "removed": [{"layer": u.layer, "kind": u.kind} for u in plan.removed],
                   "kv_layers": after.kv_layers(), "sparsity": plan.sparsity.model_dump()}
        config = subfit_config(export_config, section, after.num_kv_heads, after.head_dim,
                               has_kv_cache=bool(after.kv_layers()))
        write_config(out, config)
        _copy_companions(source.parent, out, skip={CONFIG_FILE, *source_data})
        if (source.parent / GENAI_CONFIG_FILE).is_file():  # the source was set up for onnxruntime-genai
            from ..runtime_genai import write_genai_config, write_rewritten_genai_config

            if before.layout.own_genai_config:
                write_rewritten_genai_config(source.parent, out, after.kv_layers())
            else:
                write_genai_config(out)
        bytes_after = model_file_bytes(target, [DATA_FILE] if external else [])
        bar.update(1)

    unit_params = sum(before.unit(u.layer, u.kind).params for u in plan.removed)
    return RewriteReport(
        source=str(source), output=str(out), family=after.family, removed_units=removed,
        nodes_before=counts[0], nodes_after=model.graph.num_nodes(),
        initializers_before=counts[1], initializers_after=len(model.graph.initializers),
        kv_inputs_before=counts[2],
        kv_inputs_after=sum(v.name.startswith(KV.past_prefix) for v in model.graph.inputs),
        removed_kv_layers=sorted(set(before.kv_layers()) - set(after.kv_layers())),
        unit_params_removed=unit_params, bypass_params=rewritten.bypass_params,
        file_bytes_before=bytes_before, file_bytes_after=bytes_after,
        kv_bytes_per_token_before=before.kv_bytes_per_token(), kv_bytes_per_token_after=after.kv_bytes_per_token(),
        external_data=external, quantize=quantize, weights=weights,
        config_overrides={k: v for k, v in config.items()
                                                  if k in config["subfit"].get("original_config", {})},
        wall_seconds=time.perf_counter() - start,
    )
