"""An export's files: which file is the graph, which external data files it points to, and their size on disk.

A rewrite stores weights as external data when they would not fit a protobuf (or the input kept them outside),
a small dense Optimum export is one inline file; counting the files the graph references, and only those, keeps
sizes right for both and ignores stray files in the folder. Importing this module loads no ONNX library.

A model from somewhere else is untrusted input: an external-data location such as ``../secret.bin`` or an
absolute path would make a reader open a file outside the model's folder. onnx-ir and ONNX Runtime refuse such
paths too, but only when a tensor is first read (after a whole calibration, for SubFit) and in words that read
like a bug. ``check_external_data`` makes it what it is, bad input, before any work.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import SubFitError
from .names import CONFIG_FILE, GENAI_CONFIG_FILE, ONNX_FILE


def export_file(export: str | os.PathLike) -> Path:
    """``model.onnx`` of an export folder, or the file itself; one clear error when there is none."""
    path = Path(export)
    if path.is_dir():
        path = path / ONNX_FILE
    if not path.is_file():
        raise SubFitError(f"no ONNX model at {path}; pass an Optimum export folder or its {ONNX_FILE}")
    return path


def export_paths(model_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(folder, model.onnx) of an export that runs as it is (config.json included, or a model builder's
    genai_config.json, which ``model_config.read_config`` maps over), or one line naming the gap."""
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise SubFitError(f"{root} is not a folder (expected an Optimum ONNX export)")
    model = root / ONNX_FILE
    if not model.is_file():
        from .sources import is_checkpoint_dir

        if is_checkpoint_dir(root):
            raise SubFitError(f"{root} is a PyTorch model, not an ONNX export; make its dense export with "
                              f"`subfit-onnx export {root}`")
        raise SubFitError(f"{root} has no {ONNX_FILE} (expected an Optimum text-generation-with-past export)")
    if not (root / CONFIG_FILE).is_file() and not (root / GENAI_CONFIG_FILE).is_file():
        raise SubFitError(f"{root} has no {CONFIG_FILE} nor {GENAI_CONFIG_FILE} (expected an Optimum "
                          "text-generation-with-past export or a model-builder folder)")
    return root, model


def external_data_names(model: Any) -> set[str]:
    """Data files an ``onnx_ir`` model's tensors point to (initializers and node attributes, subgraphs too)."""
    import onnx_ir as ir

    tensors = [v.const_value for g in model.graphs() for v in g.initializers.values()]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                tensors.append(attr.value)
            elif attr.type == ir.AttributeType.TENSORS:
                tensors.extend(attr.value)
    return {t.location for t in tensors if isinstance(t, ir.ExternalTensor)}


def _file_data_names(onnx_file: Path) -> set[str]:
    """The same, read from the file without loading any weights."""
    import onnx

    names: set[str] = set()
    for tensor in _proto_tensors(onnx.load(str(onnx_file), load_external_data=False).graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in tensor.external_data if e.key == "location")
    return names


def _proto_tensors(graph: Any) -> Iterable[Any]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _proto_tensors(attr.g)
            for sub in attr.graphs:
                yield from _proto_tensors(sub)


def model_file_bytes(onnx_file: str | os.PathLike, data_files: Iterable[str] | None = None) -> int:
    """Bytes of the graph file plus the external data files it references (read from the file when not given).

    Pass ``data_files`` when they are known already (``external_data_names`` of the loaded model, or what a save
    just wrote), so a large inline graph is not parsed a second time.
    """
    path = Path(onnx_file)
    names = _file_data_names(path) if data_files is None else set(data_files)
    return path.stat().st_size + sum((path.parent / n).stat().st_size for n in names if (path.parent / n).is_file())


def check_external_data(onnx_file: str | os.PathLike, data_files: Iterable[str] | None = None) -> list[Path]:
    """The external data files of ``onnx_file``, each proven to be an existing file inside the model's folder.

    ``data_files`` (``external_data_names`` of a loaded model) saves parsing the file a second time.
    """
    path = Path(onnx_file)
    folder = path.parent.resolve()
    names = _file_data_names(path) if data_files is None else set(data_files)
    found = []
    for name in sorted(names):
        target = (folder / name).resolve()
        if Path(name).is_absolute() or not target.is_relative_to(folder):
            raise SubFitError(f"{path}: its weights point at {name!r}, outside the model's folder; refusing to "
                              "read them (external data must sit beside the .onnx file)")
        if not target.is_file():
            raise SubFitError(f"{path}: its weights are kept in {name}, which does not exist (copy the whole "
                              "export folder, not the .onnx file alone)")
        found.append(target)
    return found


def checked_exports(*model_dirs: str | os.PathLike | None) -> list[tuple[Path, Path]]:
    """``export_paths`` of every given folder, external data included, before any of them runs.

    Commands that compare a model with a reference check both first, so a wrong ``--reference`` is reported at
    once, not after the model has been evaluated.
    """
    found = [export_paths(d) for d in model_dirs if d is not None]
    for _, model in found:
        check_external_data(model)
    return found
