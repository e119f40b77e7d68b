"""Where a plan's perplexity goes: each removed unit alone, and the plan without it.

Selection decides on local scores (a bypass's error against the stream it lands in). This measures what each
removal does to the output on its own, so one can see whether the loss is spread over the units or owned by a few,
and how far the removals compound:

- ``only U``: the dense model with U alone replaced by the plan's bypass;
- ``without U``: the plan with U kept (every other bypass as fitted);
- ``product of only``: what the plan would cost if removals did not interact.

Held-out wiki (second half of wiki.utf8), 16 windows of 512 tokens, BOS rule, PyTorch; perplexity ratios to dense.
The plan is ``subfit-onnx calibrate MODEL --sparsity S -c assets/text/c4_first_half.txt`` at the defaults unless
``--plan`` names one. Writes benchmarks/results/unit_damage_<model>.json.

    python benchmarks/unit_damage.py [--model smollm2|gemma3] [--sparsity 0.25] [--plan PLAN]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from subfit_onnx.assets import fetch_assets
from subfit_onnx.calibration.calibrate import calibrate_model
from subfit_onnx.calibration.text import (
    calibration_tokens,
    leading_bos,
    load_documents,
    token_windows,
    tokenize_documents,
)
from subfit_onnx.config import SubFitConfig
from subfit_onnx.plan import load_plan
from subfit_onnx.reference import apply_plan
from subfit_onnx.torch_eval import torch_perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", default="assets")
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--sparsity", type=float, default=0.25)
    ap.add_argument("--plan", default=None, help="a saved plan folder (default: calibrate at the defaults)")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/unit_damage_<model>.json")
    args = ap.parse_args()

    assets = fetch_assets(args.assets, mc=False, gemma=args.model == "gemma3")
    model_dir = assets.model if args.model == "smollm2" else assets.gemma3
    tok = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if args.plan:
        plan, tensors = load_plan(args.plan)
    else:
        cal = calibration_tokens(tok, assets.c4_calibration, 64, 256)
        result = calibrate_model(copy.deepcopy(dense), cal, SubFitConfig(sparsity=args.sparsity))
        plan, tensors = result.plan, result.tensors
    wiki = tokenize_documents(tok, load_documents(assets.wiki))
    windows = token_windows(wiki[wiki.size // 2:], args.eval_windows, 512, leading_bos(tok))
    dense_ppl = torch_perplexity(dense, windows)

    def ratio(units: list) -> float:
        model = apply_plan(copy.deepcopy(dense), plan.model_copy(update={"removed": units}), tensors)
        return torch_perplexity(model, windows) / dense_ppl

    plan_ratio = ratio(plan.removed)
    print(f"plan {plan.depth_map()}: x{plan_ratio:.4f}", flush=True)
    units = {}
    for unit in plan.removed:
        name = f"{unit.layer}{unit.kind[0]}"
        units[name] = {"only": ratio([unit]), "without": ratio([u for u in plan.removed if u is not unit]),
                       "params_removed": unit.params_removed, "stream_error": unit.stream_error}
        print(f"{name:5s} only x{units[name]['only']:.4f}  without x{units[name]['without']:.4f}", flush=True)
    product = math.prod(u["only"] for u in units.values())
    print(f"product of only: x{product:.4f}")
    out = Path(args.out or f"benchmarks/results/unit_damage_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model_dir), "depth_map": plan.depth_map(), "dense_ppl": dense_ppl,
                               "windows": f"{args.eval_windows} x 512, wiki second half", "plan_ratio": plan_ratio,
                               "product_of_only": product, "units": units}, indent=2))


if __name__ == "__main__":
    main()
