"""On-disk size of an export: ``model.onnx`` plus every external-data file its tensors point to.

The rewrite saves weights as external data (the memory-safe mode), the dense Optimum export of a small model is
one inline file; counting only referenced files keeps both right and ignores stray files in the folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..runtime import export_paths


def external_data_files(model_path: str | os.PathLike) -> list[Path]:
    """Files named by ``external_data`` locations in the graph (initializers, including those in subgraphs)."""
    import onnx

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    names: set[str] = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(model_path.parent / n for n in names)


def _tensors(graph):
    """Initializers and tensor-valued node attributes of a graph and its subgraphs (If/Loop bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def model_file_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of ``model.onnx`` and its external data (tokenizer and config files are not counted)."""
    _, model_path = export_paths(model_dir)
    files = [model_path] + external_data_files(model_path)
    return sum(f.stat().st_size for f in files if f.is_file())
