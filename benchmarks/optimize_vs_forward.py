"""How expensive is ``optimize`` compared with one plain forward pass over the same calibration tokens?

Reads an ``optimize`` output folder (its ``subfit_report.json`` has per-phase seconds and the calibration
source, N and L), rebuilds exactly those tokens, times one no-grad forward of the dense PyTorch model over them
(batches of the calibration batch size), and reports ``(total - export) / forward``. Export is excluded because
it is Optimum's cost, paid by any ONNX workflow.

    python benchmarks/optimize_vs_forward.py assets/smollm2-135m-instruct-subfit25 --model assets/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from subfit_onnx.calibration.text import calibration_tokens
from subfit_onnx.config import read_settings
from subfit_onnx.names import REPORT_FILE, SETTINGS_FILE


def timed_forward(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    """Seconds of one no-grad forward over ``tokens`` in batches (call once before, to warm up)."""
    with torch.no_grad():
        start = time.perf_counter()
        for i in range(0, tokens.shape[0], batch_size):
            model(tokens[i : i + batch_size], use_cache=False)
        return time.perf_counter() - start


def forward_seconds(model_dir: str, source: str, num_samples: int, seq_len: int, batch_size: int) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = torch.as_tensor(calibration_tokens(tokenizer, source, num_samples, seq_len))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model(tokens[:1, :8])  # warm-up: first-call allocations are not the forward's cost
    return timed_forward(model, tokens, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="an optimize output folder")
    parser.add_argument("--model", required=True, help="the PyTorch checkpoint that was compressed")
    parser.add_argument("--save", default="benchmarks/results/optimize_vs_forward.json")
    args = parser.parse_args()

    out = Path(args.output)
    report = json.loads((out / REPORT_FILE).read_text())
    settings = read_settings(out / SETTINGS_FILE)
    cal = report["plan"]["calibration"]
    forward = forward_seconds(args.model, cal["source"], cal["num_samples"], cal["seq_len"], settings.batch_size)
    seconds = report["seconds"]
    optimize = seconds["total"] - seconds.get("export", 0.0)
    result = {
        "output": str(out),
        "tokens": cal["num_samples"] * cal["seq_len"],
        "optimize_seconds": seconds,
        "optimize_excluding_export_s": round(optimize, 2),
        "forward_s": round(forward, 2),
        "ratio": round(optimize / forward, 2),
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
