"""An ONNX file as SubFit's input: parsed with one clear error, checked, and its decoder structure proven.

What makes a graph a decoder SubFit can rewrite is decided in one place, ``passes.structure`` (plain export, no
fused operators, ``input_ids`` in and ``logits`` out, a KV cache, every unit where its layout says). This module
adds what depends on files and on the command: the file must parse, its config.json names the family, and an
input for calibration must not be SubFit's own output already.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SubFitError, UnsupportedModelError
from .identity import check_matches, config_facts, graph_facts
from .model_config import read_config
from .onnx_files import check_external_data, external_data_names


def load_onnx(path: str | Path) -> Any:
    """An ``onnx_ir`` model; a file that does not parse as ONNX, or whose external data lies outside its folder or
    is missing, gets one clear error before anything is read."""
    import onnx_ir as ir
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise SubFitError(f"{p} does not exist")
    try:
        model = ir.load(str(p))
    except (DecodeError, ValueError) as exc:
        raise SubFitError(f"{p} is not an ONNX model ({type(exc).__name__}: {str(exc)[:120]})") from None
    check_external_data(p, external_data_names(model))
    return model


def load_decoder_structure(onnx_file: Path) -> tuple[Any, dict[str, Any], Any]:
    """The graph, its config.json and its proven decoder structure: what rewrite and inspect both start from."""
    from .model_config import model_type
    from .passes.structure import find_decoder_structure

    model = load_onnx(onnx_file)
    config = read_config(onnx_file.parent) or {}
    try:
        structure = find_decoder_structure(model, model_type(config))
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{onnx_file}: {exc}") from None
    return model, config, structure


def require_dense(structure: Any, onnx_file: Path) -> None:
    """Calibration needs the dense graph: refuse one in which SubFit already replaced units."""
    bypassed = structure.bypassed_units()
    if bypassed:
        names = ", ".join(f"layer {u.layer} {u.kind}" for u in bypassed[:3]) + (", ..." if len(bypassed) > 3 else "")
        raise SubFitError(f"{onnx_file} is already compressed by SubFit ({len(bypassed)} units bypassed: {names}); "
                          "run SubFit on the original export")


@dataclass(frozen=True)
class ExportFacts:
    """What the checks learnt about an export; the graph itself is not kept (it can be gigabytes)."""

    onnx_file: Path
    config: dict[str, Any]  # its config.json
    facts: dict[str, Any]  # identity.graph_facts
    weights_dtype: str | None = None  # of its weights (``DecoderStructure.dtype``): "FLOAT" for an fp32 export

    def check_matches(self, identity: Any, what: str) -> None:
        """Refuse a checkpoint or plan (``what``) whose identity differs from this graph's."""
        check_matches(identity, what, f"the ONNX graph {self.onnx_file}", self.facts)


def check_export_family(export_dir: Path) -> None:
    """Refuse an unsupported family by config.json alone, before the graph is loaded."""
    config_facts(read_config(export_dir) or {})


def inspect_export(onnx_file: Path) -> ExportFacts:
    """Load the graph once, run the cheap checks and the structural pass, keep only the facts."""
    _, config, structure = load_decoder_structure(onnx_file)
    require_dense(structure, onnx_file)
    dtype = structure.dtype.name if structure.dtype is not None else None
    return ExportFacts(onnx_file, config, graph_facts(config, structure), dtype)
