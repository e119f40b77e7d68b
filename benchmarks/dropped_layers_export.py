"""A compressed stand-in for benchmarks until the SubFit rewrite lands: SmolLM2 with whole layers dropped.

Deletes ``--drop`` decoder layers from the PyTorch model, exports it with Optimum, then renames the KV tensors
back to the original layer indices, so the export has the same KV-index gaps a SubFit rewrite produces (for
layers 20-27 dropped: 0..19, 28, 29). Quality is not the point; speed, KV bytes and name-based discovery are.

    python benchmarks/dropped_layers_export.py assets/smollm2-135m-instruct assets/onnx/dev-smollm2-drop8-fp32
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

import onnx
import torch
from subfit_onnx.exporters.optimum_export import export_decoder
from transformers import AutoModelForCausalLM, AutoTokenizer

KV = re.compile(r"^(past_key_values|present)\.(\d+)\.(key|value)$")


def rename_kv(model_path: Path, kept: list[int]) -> None:
    model = onnx.load(str(model_path), load_external_data=False)

    def new(name: str) -> str:
        m = KV.match(name)
        return f"{m.group(1)}.{kept[int(m.group(2))]}.{m.group(3)}" if m else name

    for v in list(model.graph.input) + list(model.graph.output):
        v.name = new(v.name)
    for node in model.graph.node:
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
    onnx.save(model, str(model_path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--drop", default="20-27", help="layers to drop, e.g. 20-27 or 3,7,11")
    args = ap.parse_args()
    if "-" in args.drop:
        lo, hi = map(int, args.drop.split("-"))
        drop = set(range(lo, hi + 1))
    else:
        drop = {int(x) for x in args.drop.split(",")}
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    kept = [i for i in range(model.config.num_hidden_layers) if i not in drop]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in kept)
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(args.model_dir).save_pretrained(tmp)
        for extra in ("generation_config.json", "chat_template.jinja"):
            if (args.model_dir / extra).is_file():
                shutil.copy(args.model_dir / extra, Path(tmp) / extra)
        export_decoder(tmp, args.out_dir)
    rename_kv(args.out_dir / "model.onnx", kept)
    print(f"kept layers {kept} -> {args.out_dir}")


if __name__ == "__main__":
    main()
