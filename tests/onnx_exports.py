"""ONNX exports for the evaluation, runtime and CLI tests, built on conftest's tiny checkpoints and exports.

- ``dense``: the tiny Llama export (character tokenizer, 256-token vocab).
- ``gaps``: the same graph with KV inputs/outputs renamed 0,1,2,3 -> 0,2,3,7. To every runtime the layer index
  is only a name, so this exercises the name-based discovery a rewritten export needs, with the dense weights
  (so outputs must equal the dense model's exactly).
- ``nokv``: Optimum's plain ``text-generation`` export of the same checkpoint: no past inputs at all, which is
  what remains when every attention is removed.
- ``phi3``: a grouped-query Phi-3, a model type Optimum sizes the empty past wrongly for.
- ``tiny_compressed``: a real SubFit output (``subfit_onnx.optimize`` at sparsity 0.7, which the FFNs, 2/3 of
  the block parameters, cannot meet alone: attention and FFN units removed, bypasses inserted).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import onnx
import pytest

GAP_LAYERS = (0, 2, 3, 7)
_KV = re.compile(r"^(past_key_values|present)\.(\d+)\.(key|value)$")


def rename_kv_layers(model_path: Path, layers: tuple[int, ...] = GAP_LAYERS) -> None:
    """Rename KV layer i to ``layers[i]`` in graph inputs, outputs and node references (in place)."""
    model = onnx.load(str(model_path))

    def new(name: str) -> str:
        m = _KV.match(name)
        return f"{m.group(1)}.{layers[int(m.group(2))]}.{m.group(3)}" if m else name

    for v in list(model.graph.input) + list(model.graph.output):
        v.name = new(v.name)
    for node in model.graph.node:
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
    onnx.save(model, str(model_path))


def export_without_past(checkpoint: Path, out: Path) -> Path:
    from optimum.exporters.onnx import main_export

    from subfit_onnx.exporters.optimum_export import _quiet

    with _quiet():
        main_export(str(checkpoint), out, task="text-generation", do_validation=False, local_files_only=True)
    return out


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, tiny_checkpoint, tiny_export) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-exports")
    dense = tiny_export("llama")
    gaps = root / "llama-gaps"
    shutil.copytree(dense, gaps)
    rename_kv_layers(gaps / "model.onnx")
    return {"dense": dense, "gaps": gaps, "nokv": export_without_past(tiny_checkpoint("llama"), root / "llama-nokv"),
            "phi3": tiny_export("phi3")}


@pytest.fixture(scope="session")
def tiny_compressed(tmp_path_factory, tiny_checkpoint, tiny_calibration_text) -> Path:
    import subfit_onnx

    config = subfit_onnx.SubFitConfig(sparsity=0.7, calibration=str(tiny_calibration_text), num_samples=8, seq_len=32)
    out = tmp_path_factory.mktemp("eval-compressed") / "llama-subfit"
    return subfit_onnx.optimize(tiny_checkpoint("llama"), config=config, output=out).output
